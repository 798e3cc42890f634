"""Training throughput benchmark: our loop against transformers.Trainer on the same records, model and batch.

In one process, on the same prepared records (the shipped sample data, prepared into a temporary folder), the same
model shape, sequence limit and effective batch, it measures these configurations, interleaved (a, b, b2, c, d,
a, b, ...) and repeated, and prints the median of each column and the ratios a/b, a/b2, c/a, d/a:

    a   our loop (src/training/train_enhanced.py) with every technique off, driven through train(parse_args([...]))
    b   transformers.Trainer, its usual set-up: our tokenised records and answer-only labels, a dynamic-padding
        collator (DataCollatorForSeq2Seq), fused AdamW, the same batch / accumulation / lr / schedule / max_steps
    b2  b with length-grouped batches (group_by_length; train_sampling_strategy="group_by_length" in transformers 5)
    c   our loop with the techniques of --profile quick (shape, batch and schedule flags kept explicit)
    d   our loop with the techniques of --profile rtx3060 (same)
    e   d without R-Drop (--no_rdrop): the issue's budget is 1.1x the plain step for every technique but R-Drop

It also reports where the time of our loop goes (timers around collation, forward, loss, backward, clipping,
optimizer, logging; plus the top torch ops) and the padding share of dynamic, length-grouped and packed batches
computed from the tokenised lengths. documentation/PERFORMANCE.md explains every column and the FLOP formula.

    .venv/bin/python tests/benchmarks/bench_training.py                        # both shapes, defaults
    .venv/bin/python tests/benchmarks/bench_training.py --shapes quick --steps 30 --repeats 3 --out /tmp/bench.json
    .venv/bin/python tests/benchmarks/bench_training.py --shapes gpt2-124m --steps 4 --configs a,b,b2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONFIGS = ("a", "b", "b2", "c", "d", "e")
CONFIG_TITLES = {"a": "ours, techniques off", "b": "Trainer, dynamic padding", "b2": "Trainer, group_by_length",
                 "c": "ours, quick techniques", "d": "ours, rtx3060 techniques",
                 "e": "ours, rtx3060 minus R-Drop"}
SHAPES = ("quick", "gpt2-124m")
DEFAULT_STEPS = {"quick": 30, "gpt2-124m": 4}
VALIDATION_KEPT = 8  # validation records kept in the bench data: the runs end with a validation we do not time


# ---------------------------------------------------------------------------------------------------------------
# The machine: matmul rate, peak memory
# ---------------------------------------------------------------------------------------------------------------

def matmul_gflops(device: str = "cpu", n: int = 2048, seconds: float = 1.5, dtype=torch.float32) -> float:
    """Best sustained rate of a square ``n x n`` matmul loop in GFLOP/s (2 n^3 FLOPs per product).

    The best of several ~0.3 s chunks: on a shared machine the best chunk is the closest to what the hardware
    can do, and MFU is meant to be measured against that.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):  # warm up threads and caches
        a @ b
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            a @ b
            reps += 1
            if device.startswith("cuda") and reps % 50 == 0:
                sync()
        sync()
        best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


class PeakRSS:
    """Peak resident memory of this process while a block runs, sampled every 10 ms by a daemon thread.

    ``ru_maxrss`` is a high-water mark for the whole process, useless for several runs in one process; sampling
    gives the peak of each run. Before a run, memory freed by earlier runs is handed back to the OS
    (``malloc_trim``) so that each run starts from a similar floor. On CUDA the peak allocated memory is kept too.
    """

    def __init__(self, device: str = "cpu"):
        import psutil

        self.proc, self.device = psutil.Process(), device
        self.peak = self.start = 0
        self.peak_gpu = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        if self.device.startswith("cuda"):
            self.peak_gpu = torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Dims:
    n_layer: int
    n_embd: int
    vocab: int
    n_inner: int

    @classmethod
    def of(cls, config) -> "Dims":
        return cls(config.n_layer, config.n_embd, config.vocab_size, config.n_inner or 4 * config.n_embd)

    @property
    def matmul_params(self) -> int:
        """N: weights that take part in a matmul per token: per block qkv (3d^2), attention out (d^2), MLP
        (2 d d_ff); plus the LM head (V d, tied to the token embedding). Not counted: biases, norms, the
        position table and the embedding lookup (no multiply-adds)."""
        d = self.n_embd
        return self.n_layer * (4 * d * d + 2 * d * self.n_inner) + self.vocab * d

    def train_flops(self, t: int) -> float:
        """Training FLOPs of one sequence of ``t`` tokens: 6 N t + 12 L d t^2.

        Forward: 2 N per token for the weight matmuls, plus per layer 2 d t for Q K^T and 2 d t for A V (the full
        t x t score matrix, as the PaLM appendix counts it); backward is twice the forward. So per token
        6 N + 12 L d t and per sequence 6 N t + 12 L d t^2.
        """
        return 6.0 * self.matmul_params * t + 12.0 * self.n_layer * self.n_embd * t * t


# ---------------------------------------------------------------------------------------------------------------
# Set-up: data, shapes
# ---------------------------------------------------------------------------------------------------------------

def prepare_data(work: Path, datasets_dir: Path) -> tuple[Path, str]:
    """Prepare the shipped sample data into ``work`` and write the bench file: every training record, the first
    few validation records. Returns (path, how it was made)."""
    prepared = work / "enhanced.json"
    cmd = [sys.executable, "-m", "src.data_processing.prepare_data_for_training", "--datasets_dir", str(datasets_dir),
           "--output", str(prepared), "--test_set", str(datasets_dir / "test_set.json")]
    how = "prepared now from " + str(datasets_dir)
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not prepared.is_file():
        fallback = datasets_dir / "enhanced_training_data.json"
        how = f"preparation failed (exit {proc.returncode}); using {fallback}"
        shutil.copy(fallback, prepared)
    data = json.loads(prepared.read_text(encoding="utf-8"))
    train = [r for r in data["records"] if r.get("split", "train") == "train"]
    val = [r for r in data["records"] if r.get("split") == "validation"][:VALIDATION_KEPT]
    bench = work / "bench_data.json"
    bench.write_text(json.dumps({**data, "records": train + val}), encoding="utf-8")
    return bench, how


def build_shape(shape: str, work: Path, datasets_dir: Path) -> Path:
    """A model folder for ``shape``: ``quick`` is theta-tiny built from the sample data (the quick profile's
    model); ``gpt2-124m`` is GPT2Config() (12 x 768, vocabulary 50257, context 1024) with random weights and the
    theta-tiny tokenizer, whose 1024 ids are a subset of the 50257 rows (see PERFORMANCE.md)."""
    from src.model.theta_model import ThetaModel, build_tiny_model

    tiny = work / "theta-tiny"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny, datasets_dir)
    if shape == "quick":
        return tiny
    if shape != "gpt2-124m":
        raise ValueError(f"unknown shape {shape}")
    folder = work / "gpt2-124m"
    if not (folder / "config.json").exists():
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(tiny)
        torch.manual_seed(0)
        cfg = GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
        ThetaModel.from_parts(GPT2LMHeadModel(cfg), tok, device="cpu").save(folder)
    return folder


@dataclass
class Job:
    """What every configuration shares: one shape, one data file, one batch."""
    model_dir: Path
    data_path: Path
    datasets_dir: Path
    work: Path
    batch_size: int = 4
    accum: int = 1
    max_length: int = 512
    learning_rate: float = 5e-4
    device: str = "cpu"
    precision: str = "fp32"


def _val_ids(data_path: Path) -> set[str]:
    records = json.loads(Path(data_path).read_text(encoding="utf-8"))["records"]
    return {r.get("id", "") for r in records if r.get("split") == "validation"}


def technique_flags() -> dict[str, list[str]]:
    """``{"on": [--use_X ...], "off": [--no_use_X ...]}`` as train_enhanced.py's parser defines them now."""
    from src.training import train_enhanced as te

    on, off = [], []
    for action in te.build_parser()._actions:
        if not action.dest.startswith("use_"):
            continue
        for s in action.option_strings:
            (off if s.startswith("--no") else on).append(s)
    return {"on": sorted(set(on)), "off": sorted(set(off))}


# ---------------------------------------------------------------------------------------------------------------
# Per-step records: what each step processed and how long it took
# ---------------------------------------------------------------------------------------------------------------

class BatchLog:
    """Rows' real lengths and the padded length of each training micro-batch, in the order they were made."""

    def __init__(self):
        self.batches: list[tuple[list[int], int]] = []

    def add(self, attention_mask: torch.Tensor) -> None:
        self.batches.append((attention_mask.sum(1).tolist(), int(attention_mask.shape[1])))


def _steps_from(batches: list[tuple[list[int], int]], seconds: list[float], accum: int, dims: Dims,
                useful_check: list[float] | None = None) -> list[dict]:
    """Join micro-batches (``accum`` per optimizer step) with step times into per-step records."""
    steps = []
    for k, sec in enumerate(seconds):
        window = batches[k * accum:(k + 1) * accum]
        rows = [t for lens, _ in window for t in lens]
        useful = sum(rows)
        total = sum(len(lens) * T for lens, T in window)
        rec = {"seconds": sec, "useful": useful, "total": total,
               "flops_useful": sum(dims.train_flops(t) for t in rows),
               "flops_all": sum(len(lens) * dims.train_flops(T) for lens, T in window)}
        if useful_check is not None and (not window or abs(useful_check[k] - useful) > 0.5):
            # the batches seen do not match the loop's own count (a technique changed the data path):
            # keep the loop's useful tokens and leave padding unknown rather than guess
            rec = {"seconds": sec, "useful": useful_check[k], "total": None, "flops_useful": None, "flops_all": None}
        steps.append(rec)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# The runners
# ---------------------------------------------------------------------------------------------------------------

def _ours_argv(job: Job, out: Path, steps: int, seed: int) -> list[str]:
    """Every non-technique flag explicit, so a --profile added after them changes the techniques only."""
    return ["--model_name", str(job.model_dir), "--data_path", str(job.data_path),
            "--datasets_dir", str(job.datasets_dir), "--output_dir", str(out), "--epochs", "1",
            "--max_steps", str(steps), "--num_samples", "0", "--no_progress_bar", "--no_color",
            "--batch_size", str(job.batch_size), "--gradient_accumulation_steps", str(job.accum),
            "--learning_rate", str(job.learning_rate), "--max_length", str(job.max_length), "--seed", str(seed),
            "--warmup_proportion", "0.1", "--scheduler_type", "cosine", "--weight_decay", "0.01",
            "--max_grad_norm", "1.0", "--precision", job.precision, "--device", job.device, "--resume", "never",
            "--log_every_steps", "1000", "--eval_every_steps", "0", "--save_every_steps", "0",
            "--num_workers", "0", "--patience", "3", "--loss_on", "answer"]


def run_ours(job: Job, config: str, steps: int, seed: int, hooks: Callable | None = None) -> dict:
    """Our loop through ``train(parse_args(argv))``; step times and useful tokens from metrics.jsonl, padded
    shapes from the training batches that ``collate`` built."""
    from src.training import train_enhanced as te

    out = Path(tempfile.mkdtemp(prefix=f"ours_{config}_", dir=job.work))
    argv = _ours_argv(job, out, steps, seed)
    if config == "a":
        argv += technique_flags()["off"]
    elif config in ("c", "d", "e"):
        argv += ["--profile", {"c": "quick", "d": "rtx3060", "e": "rtx3060"}[config]]
        if config == "e":
            argv += ["--no_rdrop"]
    val_ids = _val_ids(job.data_path)
    log = BatchLog()
    original = te.collate

    def logging_collate(batch, pad_id):
        result = original(batch, pad_id)
        if batch and batch[0].get("id") not in val_ids:
            log.add(result["attention_mask"])
        return result

    te.collate = logging_collate
    console = io.StringIO()
    try:
        with PeakRSS(job.device) as mem, contextlib.redirect_stdout(console), (hooks() if hooks else
                                                                                 contextlib.nullcontext()):
            summary = te.train(te.parse_args(argv))
    finally:
        te.collate = original
    if summary.get("exit_code", 0) != 0:
        raise RuntimeError(f"train() ended with {summary.get('status')}; see {out / 'train.log'}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    seconds = [x["ms"] / 1000 for x in lines]
    useful = [x["tokens_per_sec"] * x["ms"] / 1000 for x in lines]
    from transformers import AutoConfig

    dims = Dims.of(AutoConfig.from_pretrained(job.model_dir))
    result = {"steps": _steps_from(log.batches, seconds, job.accum, dims, useful), "peak_rss": mem.peak,
              "rss_start": mem.start, "peak_gpu": mem.peak_gpu, "run_dir": str(out)}
    shutil.rmtree(out, ignore_errors=True)
    return result


class _TrainerDataset(torch.utils.data.Dataset):
    """Our tokenised examples as Trainer expects them: ``input_ids`` and ``labels`` only."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {"input_ids": ex["input_ids"], "labels": ex["labels"]}


def run_trainer(job: Job, config: str, steps: int, seed: int) -> dict:
    """transformers.Trainer on the same tokenised records (our TokenizedDataset: same answer-only labels)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from src.model.theta_model import ThetaModel
    from src.training.train_enhanced import TokenizedDataset

    records = json.loads(Path(job.data_path).read_text(encoding="utf-8"))["records"]
    train_recs = [r for r in records if r.get("split", "train") == "train"]
    out = Path(tempfile.mkdtemp(prefix=f"trainer_{config}_", dir=job.work))
    with PeakRSS(job.device) as mem:
        torch.manual_seed(seed)
        tm = ThetaModel.load(job.model_dir, device=job.device)
        ds = TokenizedDataset(train_recs, tm.tokenizer, job.max_length)
        base = DataCollatorForSeq2Seq(tm.tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
        log = BatchLog()

        def collator(features):
            batch = base(features)
            log.add(batch["attention_mask"])
            return batch

        ends: list[float] = []

        class StepTimes(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                if job.device.startswith("cuda"):
                    torch.cuda.synchronize()
                ends.append(time.perf_counter())

        targs = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=job.batch_size,
            gradient_accumulation_steps=job.accum, learning_rate=job.learning_rate, max_steps=steps,
            lr_scheduler_type="cosine", warmup_steps=int(round(0.1 * steps)), weight_decay=0.01,
            max_grad_norm=1.0, optim="adamw_torch_fused", use_cpu=not job.device.startswith("cuda"),
            bf16=job.precision == "bf16", fp16=job.precision == "fp16", report_to="none",
            logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=seed,
            dataloader_num_workers=0, skip_memory_metrics=True,
            train_sampling_strategy="group_by_length" if config == "b2" else "random")
        trainer = Trainer(model=tm.model, args=targs, train_dataset=_TrainerDataset(ds.examples),
                          data_collator=collator, processing_class=tm.tokenizer, callbacks=[StepTimes()])
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training metrics print
            trainer.train()
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    dims = Dims.of(tm.model.config)
    result = {"steps": _steps_from(log.batches, seconds, job.accum, dims), "peak_rss": mem.peak,
              "rss_start": mem.start, "peak_gpu": mem.peak_gpu}
    del trainer, tm
    shutil.rmtree(out, ignore_errors=True)
    return result


def measure(config: str, job: Job, steps: int, seed: int = 42, warmup: int = 1, matmul_rate: float | None = None,
            hooks: Callable | None = None) -> dict:
    """One run of ``config`` (a, b, b2, c or d): the harness's core measurement.

    The first ``warmup`` steps are dropped (allocator, thread pools, data-loader start-up). Rates are totals over
    the measured steps divided by their total time, not means of per-step rates.
    """
    run = run_trainer(job, config, steps, seed) if config in ("b", "b2") else run_ours(job, config, steps, seed,
                                                                                      hooks)
    kept = run["steps"][warmup:] or run["steps"][-1:]
    secs = sum(s["seconds"] for s in kept)
    useful = sum(s["useful"] for s in kept)
    known = all(s["total"] is not None for s in kept)
    total = sum(s["total"] for s in kept) if known else None
    res = {"config": config, "steps_measured": len(kept), "step_ms": 1000 * statistics.median(s["seconds"] for s in kept),
           "useful_tok_s": useful / secs, "total_tok_s": total / secs if known else None,
           "padding_share": 1 - useful / total if known and total else None,
           "useful_gflop_s": sum(s["flops_useful"] for s in kept) / secs / 1e9 if known else None,
           "all_gflop_s": sum(s["flops_all"] for s in kept) / secs / 1e9 if known else None,
           "peak_rss_mb": run["peak_rss"] / 2**20, "rss_start_mb": run["rss_start"] / 2**20,
           "peak_gpu_mb": run["peak_gpu"] / 2**20 if run["peak_gpu"] is not None else None}
    if matmul_rate:
        res["matmul_gflop_s"] = matmul_rate
        res["mfu"] = res["useful_gflop_s"] / matmul_rate if res["useful_gflop_s"] is not None else None
        res["mfu_all"] = res["all_gflop_s"] / matmul_rate if res["all_gflop_s"] is not None else None
    return res


# ---------------------------------------------------------------------------------------------------------------
# Where the time goes in our loop
# ---------------------------------------------------------------------------------------------------------------

class StepTimers:
    """Wall-clock timers around the parts of our loop's step, installed by patching for the length of one run:
    collation (``collate``), the model's training forward (a global forward hook on the top-level model), the loss
    (``token_losses``), ``Tensor.backward``, ``clip_grad_norm_``, the optimizer step (global optimizer hooks) and
    the tensorboard scalars. What no timer covers is the rest of the step (schedule, host syncs, metrics line)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _add(self, name: str, dt: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + dt
        self.counts[name] = self.counts.get(name, 0) + 1

    def _wrap(self, name: str, fn: Callable, when: Callable[[], bool] = lambda: True) -> Callable:
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if not when():
                return fn(*a, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._add(name, time.perf_counter() - t0)
        return wrapper

    @contextlib.contextmanager
    def installed(self, val_ids: set[str]):
        from torch.nn.modules import module as nn_module
        from torch.optim import optimizer as optim_module
        from torch.utils.tensorboard import SummaryWriter
        from transformers import GPT2LMHeadModel

        from src.training import train_enhanced as te

        saved = {"collate": te.collate, "token_losses": te.token_losses, "backward": torch.Tensor.backward,
                 "clip": torch.nn.utils.clip_grad_norm_, "scalar": SummaryWriter.add_scalar}
        orig_collate = te.collate

        def timed_collate(batch, pad_id):
            if batch and batch[0].get("id") in val_ids:
                return orig_collate(batch, pad_id)
            t0 = time.perf_counter()
            try:
                return orig_collate(batch, pad_id)
            finally:
                self._add("collate", time.perf_counter() - t0)

        te.collate = timed_collate
        te.token_losses = self._wrap("loss", saved["token_losses"], torch.is_grad_enabled)
        torch.Tensor.backward = self._wrap("backward", saved["backward"])
        torch.nn.utils.clip_grad_norm_ = self._wrap("clip_grad_norm", saved["clip"])
        SummaryWriter.add_scalar = self._wrap("tensorboard", saved["scalar"])
        starts: dict[int, float] = {}

        def fwd_pre(mod, args):
            if isinstance(mod, GPT2LMHeadModel) and mod.training:
                starts[id(mod)] = time.perf_counter()

        def fwd_post(mod, args, output):
            if isinstance(mod, GPT2LMHeadModel) and id(mod) in starts:
                self._add("forward", time.perf_counter() - starts.pop(id(mod)))

        opt_start: list[float] = []
        handles = [nn_module.register_module_forward_pre_hook(fwd_pre),
                   nn_module.register_module_forward_hook(fwd_post),
                   optim_module.register_optimizer_step_pre_hook(lambda o, a, k: opt_start.append(time.perf_counter())),
                   optim_module.register_optimizer_step_post_hook(
                       lambda o, a, k: self._add("optimizer", time.perf_counter() - opt_start.pop()))]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            te.collate, te.token_losses = saved["collate"], saved["token_losses"]
            torch.Tensor.backward = saved["backward"]
            torch.nn.utils.clip_grad_norm_ = saved["clip"]
            SummaryWriter.add_scalar = saved["scalar"]


def time_breakdown(job: Job, steps: int, seed: int = 42) -> dict:
    """Config (a) once with the timers, once under torch.profiler: per-step ms by part and the top ops."""
    from src.training import train_enhanced as te

    val_ids = _val_ids(job.data_path)
    timers = StepTimers()
    run = run_ours(job, "a", steps, seed, hooks=lambda: timers.installed(val_ids))
    step_total = sum(s["seconds"] for s in run["steps"][1:])
    n = max(len(run["steps"]) - 1, 1)
    # the timers cover every step including the first; scale them to per-step means over all steps
    all_total = sum(s["seconds"] for s in run["steps"])
    parts = {k: 1000 * v / len(run["steps"]) for k, v in timers.totals.items()}
    parts["step (measured, steps 2+)"] = 1000 * step_total / n
    parts["other (schedule, host syncs, metrics, loader)"] = max(
        0.0, 1000 * all_total / len(run["steps"]) - sum(v for k, v in parts.items() if not k.startswith("step")))
    # the forward hook covers the model call; the loss runs after it: forward + loss + backward + optimizer...
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if job.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run_ours(job, "a", steps, seed)
    groups = {"matmul (mm/addmm/bmm/linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
              "attention kernel (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
              "softmax / cross-entropy": ("aten::_log_softmax", "aten::_softmax", "aten::nll_loss",
                                          "aten::_log_softmax_backward", "aten::_softmax_backward"),
              "layer norm": ("aten::native_layer_norm",),
              "elementwise (gelu_new's mul/pow/tanh/add, residuals)": ("aten::gelu", "aten::tanh", "aten::pow",
                                                                       "aten::mul", "aten::add"),
              "AdamW (fused)": ("aten::_fused_adamw",),
              "embedding": ("aten::embedding",),
              "copies / fills / cat": ("aten::copy_", "aten::fill_", "aten::cat", "aten::zero_", "aten::clone")}
    grouped = {g: 0.0 for g in groups}
    top = []
    total_self = 0.0
    for ev in prof.key_averages():
        self_us = ev.self_cpu_time_total
        total_self += self_us
        top.append((ev.key, self_us, ev.count))
        for g, prefixes in groups.items():
            if ev.key.startswith(prefixes):
                grouped[g] += self_us
                break
    top.sort(key=lambda x: -x[1])
    return {"steps": len(run["steps"]), "per_step_ms": parts, "timer_counts": timers.counts,
            "op_groups_share": {g: v / total_self for g, v in grouped.items()},
            "top_ops": [{"op": k, "self_ms": us / 1000, "share": us / total_self, "calls": c} for k, us, c in top[:12]],
            "host_syncs_per_step": "see PERFORMANCE.md (read from the loop's code)",
            "note": f"{te.__name__}: timers wrap collate, forward, token_losses, backward, clip, optimizer, "
                    "tensorboard"}


# ---------------------------------------------------------------------------------------------------------------
# Padding share from the tokenised lengths
# ---------------------------------------------------------------------------------------------------------------

def _share(batches: list[list[int]]) -> float:
    useful = sum(sum(b) for b in batches)
    return 1 - useful / sum(len(b) * max(b) for b in batches)


def padding_shares(lengths: list[int], max_length: int, batch_sizes=(4, 8), epochs: int = 5) -> dict:
    """Padding share (padded tokens / all tokens processed) of each batching scheme, averaged over ``epochs``
    seeded orders; no training involved.

    fixed: every row padded to max_length. dynamic: random batches padded to their longest row (our loop now).
    grouped: Trainer's LengthGroupedSampler scheme (random mega-batches of 50 batches, sorted by length inside).
    sorted: batches cut from the globally sorted lengths (the best any grouping can do). packed: records
    concatenated in order into rows of at most max_length (records not split), rows batched and padded to the
    longest row; packed_ffd: first-fit-decreasing bins instead of the data order.
    """
    out = {"records": len(lengths), "mean_len": statistics.mean(lengths), "median_len": statistics.median(lengths),
           "p90_len": sorted(lengths)[int(0.9 * (len(lengths) - 1))], "max_len": max(lengths)}
    for B in batch_sizes:
        row = {"fixed": 1 - statistics.mean(lengths) / max_length}
        acc = {"dynamic": [], "grouped": [], "packed": []}
        for e in range(epochs):
            rng = random.Random(e)
            order = list(range(len(lengths)))
            rng.shuffle(order)
            acc["dynamic"].append(_share([[lengths[i] for i in order[k:k + B]] for k in range(0, len(order), B)]))
            mega = 50 * B
            grouped = []
            for m in range(0, len(order), mega):
                chunk = sorted(order[m:m + mega], key=lambda i: -lengths[i])
                grouped += [[lengths[i] for i in chunk[k:k + B]] for k in range(0, len(chunk), B)]
            acc["grouped"].append(_share(grouped))
            rows, cur = [], 0
            for i in order:  # next-fit in the sampler's order: keeps curriculum/epoch order
                if cur + lengths[i] > max_length and cur:
                    rows.append(cur)
                    cur = 0
                cur += lengths[i]
            rows.append(cur)
            acc["packed"].append(_share([rows[k:k + B] for k in range(0, len(rows), B)]))
        row.update({k: statistics.mean(v) for k, v in acc.items()})
        srt = sorted(lengths)
        row["sorted"] = _share([srt[k:k + B] for k in range(0, len(srt), B)])
        bins: list[int] = []
        for t in sorted(lengths, reverse=True):
            for j, used in enumerate(bins):
                if used + t <= max_length:
                    bins[j] += t
                    break
            else:
                bins.append(t)
        row["packed_ffd"] = _share([bins[k:k + B] for k in range(0, len(bins), B)])
        out[f"batch_{B}"] = row
    return out


def tokenised_lengths(job: Job) -> list[int]:
    from transformers import GPT2TokenizerFast

    from src.training.train_enhanced import TokenizedDataset

    records = json.loads(Path(job.data_path).read_text(encoding="utf-8"))["records"]
    tok = GPT2TokenizerFast.from_pretrained(job.model_dir)
    ds = TokenizedDataset([r for r in records if r.get("split", "train") == "train"], tok, job.max_length)
    return [len(ex["input_ids"]) for ex in ds.examples]


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

COLUMNS = [("useful_tok_s", "useful tok/s", "{:.0f}"), ("total_tok_s", "total tok/s", "{:.0f}"),
           ("padding_share", "padding", "{:.1%}"), ("step_ms", "step ms", "{:.0f}"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("peak_gpu_mb", "peak GPU MB", "{:.0f}"),
           ("mfu", "MFU useful", "{:.1%}"), ("mfu_all", "MFU all", "{:.1%}")]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def median_of(runs: list[dict]) -> dict:
    med = {"runs": len(runs)}
    for key in ("useful_tok_s", "total_tok_s", "padding_share", "step_ms", "peak_rss_mb", "peak_gpu_mb", "mfu",
                "mfu_all", "useful_gflop_s", "all_gflop_s", "matmul_gflop_s"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        med[key] = statistics.median(vals) if vals else None
    med["useful_tok_s_all"] = [round(r["useful_tok_s"], 1) for r in runs]
    return med


def ratios(runs: dict[str, list[dict]]) -> dict[str, float | None]:
    """Median over rounds of the per-round ratio: runs of one round are interleaved, so pairing them cancels
    most of the load changes of a shared machine (a ratio of medians does not)."""
    def r(x, y, key="useful_tok_s"):
        pairs = [(p[key], q[key]) for p, q in zip(runs.get(x, []), runs.get(y, [])) if p.get(key) and q.get(key)]
        return statistics.median(p / q for p, q in pairs) if pairs else None
    return {"a/b useful tok/s": r("a", "b"), "a/b2 useful tok/s": r("a", "b2"),
            "c/a step time": r("c", "a", "step_ms"), "d/a step time": r("d", "a", "step_ms"),
            "e/a step time": r("e", "a", "step_ms"),
            "c/a useful tok/s": r("c", "a"), "d/a useful tok/s": r("d", "a")}


def print_table(shape: str, med: dict[str, dict], rat: dict, skipped: dict[str, str], matmul: list[float]) -> None:
    print(f"\n## shape {shape}   (fp32 matmul rate: median {statistics.median(matmul):.1f} GFLOP/s over "
          f"{len(matmul)} measurements: {', '.join(f'{x:.0f}' for x in matmul)})")
    head = f"| {'config':<28} | " + " | ".join(f"{t:>11}" for _, t, _ in COLUMNS) + " | runs (useful tok/s) |"
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 2))
    for c in CONFIGS:
        if c in med:
            m = med[c]
            cells = " | ".join(f"{_fmt(m.get(k), f):>11}" for k, _, f in COLUMNS)
            print(f"| {c + ' ' + CONFIG_TITLES[c]:<28} | {cells} | {m['useful_tok_s_all']} |")
        elif c in skipped:
            print(f"| {c + ' ' + CONFIG_TITLES[c]:<28} | skipped: {skipped[c]} |")
    print("ratios (median of per-round ratios): " + ", ".join(f"{k} = {'-' if v is None else f'{v:.2f}'}" for k, v in rat.items()))


def print_breakdown(shape: str, bd: dict) -> None:
    print(f"\n## where the time goes in our loop (config a, shape {shape}, {bd['steps']} steps)")
    for k, v in sorted(bd["per_step_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<48} {v:8.1f} ms/step")
    print("  torch op groups (share of self CPU time, whole run incl. set-up and the final validation):")
    for k, v in sorted(bd["op_groups_share"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:<52} {v:6.1%}")
    print("  top ops: " + "; ".join(f"{o['op']} {o['share']:.1%}" for o in bd["top_ops"][:8]))


def print_padding(shape: str, pad: dict) -> None:
    print(f"\n## padding share from the tokenised lengths ({shape} tokenizer, {pad['records']} training records, "
          f"median {pad['median_len']:.0f}, p90 {pad['p90_len']}, max {pad['max_len']} tokens)")
    keys = ("fixed", "dynamic", "grouped", "sorted", "packed", "packed_ffd")
    print("| batch | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for k, row in pad.items():
        if k.startswith("batch_"):
            print(f"| {k[6:]} | " + " | ".join(f"{row[x]:.1%}" for x in keys) + " |")


def parse_steps(text: str, shapes: list[str]) -> dict[str, int]:
    if "=" not in text:
        return {s: int(text) for s in shapes}
    steps = dict(DEFAULT_STEPS)
    for part in text.split(","):
        name, value = part.split("=")
        steps[name.strip()] = int(value)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=str, default="quick,gpt2-124m", help="comma list of: quick, gpt2-124m")
    p.add_argument("--steps", type=str, default="quick=30,gpt2-124m=4",
                   help="optimizer steps per run: one number for every shape, or shape=N,... (first step dropped)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are over these (>= 3)")
    p.add_argument("--configs", type=str, default="a,b,b2,c,d,e", help="comma list of a, b, b2, c, d, e")
    p.add_argument("--batch_size", type=int, default=4, help="micro-batch (the rtx3060 profile's is 3)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (same for every config)")
    p.add_argument("--max_length", type=int, default=512, help="sequence limit in tokens")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate (same for every config)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="training precision")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the parts of our loop's step and profile its ops (quick shape)")
    p.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets", help="sample data folder")
    p.add_argument("--out", type=Path, default=None, help="write every result to this JSON file")
    p.add_argument("--keep_work", action="store_true", help="keep the temporary folder (models, data)")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s} (choose from {', '.join(SHAPES)})")
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown config {c} (choose from {', '.join(CONFIGS)})")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    steps = parse_steps(args.steps, shapes)

    import logging
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("src").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="theta_bench_"))
    flags = technique_flags()
    skipped = {}
    if "--use_ema" not in flags["on"]:
        for c in ("c", "d", "e"):
            if c in configs:
                skipped[c] = ("train_enhanced.py has no technique flags yet (no --use_ema in parse_args); "
                              "issue 5 adds them")
    elif "--no_rdrop" not in flags["off"] and "e" in configs:
        skipped["e"] = "train_enhanced.py has no --no_rdrop flag"
    configs = [c for c in configs if c not in skipped]
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "device": args.device,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "technique_flags": flags, "skipped": skipped, "shapes": {}}
    import hashlib

    te_file = PROJECT_ROOT / "src" / "training" / "train_enhanced.py"
    results["train_enhanced_sha256"] = hashlib.sha256(te_file.read_bytes()).hexdigest()[:12]
    print(f"theta bench: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, precision {args.precision}; train_enhanced.py "
          f"sha256 {results['train_enhanced_sha256']}; work dir {work}")
    try:
        data_path, how = prepare_data(work, args.datasets_dir)
        results["data"] = how
        print(f"data: {how}; bench file keeps every training record and {VALIDATION_KEPT} validation records")
        for shape in shapes:
            model_dir = build_shape(shape, work, args.datasets_dir)
            job = Job(model_dir, data_path, args.datasets_dir, work, args.batch_size, args.accum, args.max_length,
                      args.learning_rate, args.device, args.precision)
            from transformers import AutoConfig

            dims = Dims.of(AutoConfig.from_pretrained(model_dir))
            n_steps = steps.get(shape, DEFAULT_STEPS[shape])
            warmup = 1 if n_steps < 10 else 2
            print(f"\n# {shape}: {dims.n_layer} layers x {dims.n_embd}, vocabulary {dims.vocab}, N (matmul weights) "
                  f"= {dims.matmul_params / 1e6:.2f}M; batch {args.batch_size} x accumulation {args.accum}, "
                  f"max_length {args.max_length}, {n_steps} steps per run ({warmup} dropped), "
                  f"{args.repeats} rounds of {', '.join(configs)}", flush=True)
            runs: dict[str, list[dict]] = {c: [] for c in configs}
            matmul: list[float] = []
            errors: dict[str, str] = {}
            for rep in range(args.repeats):
                rate = matmul_gflops(args.device)
                matmul.append(rate)
                for c in configs:
                    if c in errors:
                        continue
                    t0 = time.perf_counter()
                    try:
                        r = measure(c, job, n_steps, seed=42 + rep, warmup=warmup, matmul_rate=rate)
                    except Exception as err:  # one failing config must not lose the others' results
                        errors[c] = f"{type(err).__name__}: {err}"
                        print(f"  round {rep + 1} {c}: FAILED {errors[c]}", flush=True)
                        continue
                    runs[c].append(r)
                    print(f"  round {rep + 1} {c:<2} {r['useful_tok_s']:8.0f} useful tok/s  {r['step_ms']:7.0f} ms/step"
                          f"  padding {_fmt(r['padding_share'], '{:.1%}')}  MFU {_fmt(r.get('mfu'), '{:.1%}')}"
                          f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            med = {c: median_of(v) for c, v in runs.items() if v}
            rat = ratios(runs)
            shape_skipped = {**skipped, **errors}
            print_table(shape, med, rat, shape_skipped, matmul)
            entry = {"dims": vars(dims), "matmul_params": dims.matmul_params, "steps": n_steps, "warmup": warmup,
                     "matmul_gflop_s": matmul, "runs": runs, "median": med, "ratios": rat, "errors": errors}
            pad = padding_shares(tokenised_lengths(job), args.max_length)
            entry["padding"] = pad
            print_padding(shape, pad)
            if args.breakdown and shape == "quick":
                bd = time_breakdown(job, min(n_steps, 20))
                entry["breakdown"] = bd
                print_breakdown(shape, bd)
            results["shapes"][shape] = entry
            if args.out:
                args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
