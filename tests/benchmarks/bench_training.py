"""Training benchmark: the whole epoch a user waits for, our loop against transformers.Trainer on the same records.

In one process, on the same prepared records (the shipped sample data, prepared into a temporary folder and
sampled to ``--records``), the same model, sequence limit and batch, interleaved and repeated, it measures:

    a    our loop (src/training/train_enhanced.py), every technique off, driven only through
         train(parse_args([...])): its per-epoch validation, checkpoint and theta_best save included
    b    transformers.Trainer, its usual set-up: our tokenised records and answer-only labels, a dynamic-padding
         collator, fused AdamW, the same batch / lr / schedule; no evaluation or saving during training
    b2   b with length grouping (train_sampling_strategy="group_by_length"; group_by_length=True before 5.0)
    be   b with eval_strategy="epoch" and save_strategy="epoch": the same per-epoch work as ours
    b2e  b2 with eval_strategy="epoch" and save_strategy="epoch"
    c    our loop with --profile quick's techniques (shape, batch and schedule flags kept explicit)
    d    our loop with --profile rtx3060's techniques; e: d with --no_rdrop
    ap   a with --packing; ac: a with --compile (when train_enhanced.py has those flags)
    +X   a with only --use_X on (e.g. +ema, +rdrop): one technique's cost at a time

--mode epoch (the default) times whole epochs: each configuration runs for 1 epoch and for 2 epochs, and the
epoch is the difference of the two wall times, so start-up (imports, model load, tokenisation, the final save)
cancels and the per-epoch validation and checkpoint stay in. A stack sampler attributes the epoch's time to
forward, backward, optimizer, loss, data, logging, validation, checkpointing and other (the same difference of
the two runs). --mode steps times a few optimizer steps instead (for the 124M shape, where an epoch takes
hours on a CPU): median step time, useful tokens/s and MFU. --mode head measures the LM head and loss alone:
target-position chunked loss (src/training/lm_loss.py) against full logits, time and peak memory, at the
quick, 124M and 355M shapes. Ratios are medians of per-round ratios of interleaved runs.

    .venv/bin/python tests/benchmarks/bench_training.py --shapes quick --batch_sizes 4,8 --repeats 2
    .venv/bin/python tests/benchmarks/bench_training.py --mode steps --shapes gpt2-124m --steps 4 --configs a,b,b2
    .venv/bin/python tests/benchmarks/bench_training.py --mode head --out /tmp/head.json
    .venv/bin/python -m pytest tests/test_benchmarks_smoke.py -q                 # the harness still runs
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import inspect
import io
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONFIG_TITLES = {"a": "ours, techniques off", "b": "Trainer, dynamic padding", "b2": "Trainer, group_by_length",
                 "be": "Trainer, eval+save per epoch", "b2e": "Trainer, grouped, eval+save per epoch",
                 "c": "ours, quick techniques", "d": "ours, rtx3060 techniques", "e": "ours, rtx3060 minus R-Drop",
                 "ap": "ours, --packing", "ac": "ours, --compile", "a0": "ours at --baseline_tree (before)"}
CONFIGS = tuple(CONFIG_TITLES)
# "+X": config a with one technique on (--use_X at its default settings), for the per-technique overheads
ONE_TECHNIQUE = "+"


def config_title(config: str) -> str:
    if config.startswith(ONE_TECHNIQUE):
        return f"ours, only --use_{config[1:]}"
    return CONFIG_TITLES[config]


def ordered_configs(runs) -> list[str]:
    """The named configurations in their fixed order, then the one-technique ones in the order they ran."""
    return [c for c in CONFIGS if c in runs] + [c for c in runs if c.startswith(ONE_TECHNIQUE)]
TRAINER_CONFIGS = ("b", "b2", "be", "b2e")
SHAPES = ("quick", "gpt2-124m")
HEAD_SHAPES = {"quick": None, "gpt2-124m": (768, 50257), "gpt2-355m": (1024, 50257)}  # quick: theta-tiny's own
BUCKETS = ("forward", "backward", "optimizer", "loss", "data", "logging", "validation", "checkpointing", "other")


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


def load_average() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them (the machine is shared)."""
    try:
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


class PeakRSS:
    """Peak resident memory of this process while a block runs, sampled every ``period`` s by a daemon thread.

    ``ru_maxrss`` is a high-water mark for the whole process, useless for several runs in one process; sampling
    gives the peak of each run. Before a run, memory freed by earlier runs is handed back to the OS
    (``malloc_trim``) so that each run starts from a similar floor. On CUDA the peak allocated memory is kept too.
    """

    def __init__(self, device: str = "cpu", period: float = 0.01):
        import psutil

        self.proc, self.device, self.period = psutil.Process(), device, period
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
        while not self._stop.wait(self.period):
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
        6 N + 12 L d t and per sequence 6 N t + 12 L d t^2. Useful FLOPs count every record at its own length
        with the head at every position, whatever the loop skips (a target-only head does less work for the
        same useful tokens, which is the point).
        """
        return 6.0 * self.matmul_params * t + 12.0 * self.n_layer * self.n_embd * t * t


# ---------------------------------------------------------------------------------------------------------------
# Set-up: data, shapes, the trainer's flags
# ---------------------------------------------------------------------------------------------------------------

def prepare_data(work: Path, datasets_dir: Path, records: int = 0, val_records: int = 60,
                 seed: int = 0) -> tuple[Path, str]:
    """Prepare the shipped sample data into ``work`` and write the bench file: ``records`` training records
    (a seeded sample in file order; 0 = all) and the first ``val_records`` validation records."""
    prepared = work / "enhanced.json"
    cmd = [sys.executable, "-m", "src.data_processing.prepare_data_for_training", "--datasets_dir", str(datasets_dir),
           "--output", str(prepared)]
    how = "prepared now from " + str(datasets_dir)
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not prepared.is_file():
        fallback = datasets_dir / "enhanced_training_data.json"
        how = f"preparation failed (exit {proc.returncode}); using {fallback}"
        shutil.copy(fallback, prepared)
    data = json.loads(prepared.read_text(encoding="utf-8"))
    train = [r for r in data["records"] if r.get("split", "train") == "train"]
    if records and records < len(train):
        keep = sorted(random.Random(seed).sample(range(len(train)), records))
        train = [train[i] for i in keep]
        how += f"; {records} of {len(data['records'])} records sampled (seed {seed})"
    val = [r for r in data["records"] if r.get("split") == "validation"][:val_records]
    bench = work / "bench_data.json"
    bench.write_text(json.dumps({**data, "records": train + val}), encoding="utf-8")
    return bench, how + f"; {len(train)} training and {len(val)} validation records"


def build_shape(shape: str, work: Path, datasets_dir: Path) -> Path:
    """A model folder for ``shape``: ``quick`` is theta-tiny built from the sample data (the quick profile's
    model); ``gpt2-124m`` is GPT2Config() (12 x 768, vocabulary 50257, context 1024) with random weights and the
    theta-tiny tokenizer, whose ids are a subset of the 50257 rows (see PERFORMANCE.md)."""
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
                         pad_token_id=tok.pad_token_id, activation_function="gelu_pytorch_tanh")
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


@functools.lru_cache(maxsize=1)
def trainer_help() -> str:
    """train_enhanced.py's --help text: the public list of its flags (its internals are not ours to read)."""
    from src.training import train_enhanced as te

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        te.parse_args(["--help"])
    return out.getvalue()


def available_flags() -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", trainer_help()))


def technique_flags() -> dict:
    """``{"on": [--use_X ...], "off": [its off form ...], "off_of": {--use_X: its off form}}`` from the help
    ("--no_X  turn --use_X off"); a switch whose off form the trainer lacks has no entry in "off"/"off_of"."""
    text = re.sub(r"\s+", " ", trainer_help())
    flags = available_flags()
    on = sorted(f for f in flags if f.startswith("--use_"))
    off_of = {}
    for f in on:
        m = re.search(r"(--no[_-][\w-]+) turn " + re.escape(f) + r" off", text)
        off = m.group(1) if m else f"--no_{f[2:]}"
        if off in flags:
            off_of[f] = off
    return {"on": on, "off": list(off_of.values()), "off_of": off_of}


def _val_examples(job: Job, tokenizer):
    from src.training.lm_data import TokenizedDataset

    records = json.loads(Path(job.data_path).read_text(encoding="utf-8"))["records"]
    split = lambda s: [r for r in records if r.get("split", "train") == s]  # noqa: E731
    return (TokenizedDataset(split("train"), tokenizer, job.max_length),
            TokenizedDataset(split("validation"), tokenizer, job.max_length))


# ---------------------------------------------------------------------------------------------------------------
# Probes: what the model processed, where the time went
# ---------------------------------------------------------------------------------------------------------------

class TokenProbe:
    """Counts the tokens of every training-mode forward of the GPT-2 body (ours and Trainer's alike).

    Wraps ``GPT2Model.forward`` (the library's class, not our loop) for the length of a run: per forward, the
    padded size (rows x length) and, when the attention mask is 2-D, its sum (the real tokens) and the per-row
    lengths. Kept as device tensors and read at the end (no host sync per step).
    """

    def __init__(self):
        self.forwards: list[tuple[int, int, Any]] = []  # (rows, length, per-row real lengths or None)

    @contextlib.contextmanager
    def installed(self):
        from transformers.models.gpt2 import modeling_gpt2

        original = modeling_gpt2.GPT2Model.forward
        probe = self

        @functools.wraps(original)
        def forward(model, *args, **kwargs):
            if model.training:
                ids = kwargs.get("input_ids", args[0] if args else None)
                mask = kwargs.get("attention_mask")
                if ids is not None:
                    lens = mask.detach().sum(1) if mask is not None and mask.dim() == 2 else None
                    probe.forwards.append((int(ids.shape[0]), int(ids.shape[1]), lens))
            return original(model, *args, **kwargs)

        modeling_gpt2.GPT2Model.forward = forward
        try:
            yield self
        finally:
            modeling_gpt2.GPT2Model.forward = original

    def batches(self) -> list[tuple[list[int] | None, int]]:
        return [(lens.tolist() if lens is not None else None, T) for _, T, lens in self.forwards]

    def totals(self) -> dict:
        total = sum(B * T for B, T, _ in self.forwards)
        known = all(lens is not None for _, _, lens in self.forwards)
        useful = sum(int(lens.sum()) for _, _, lens in self.forwards) if known else None
        return {"total_tokens": total, "useful_tokens_seen": useful, "forwards": len(self.forwards)}


def _classify(frames: list[tuple[str, str, str]]) -> str:
    """The bucket of one stack sample, ``frames`` innermost first as (file, function, qualified name).

    Context first, from any frame: saving (checkpointing) and validation contain forwards that are not
    training. Otherwise the innermost frame that names an activity decides.
    """
    for path, name, qual in frames:
        if ("serialization.py" in path and "torch" in path) or "safetensors" in path or name in {
                "save_checkpoint", "_save_checkpoint", "save_model", "save_pretrained", "atomic_dir",
                "_save_optimizer_and_scheduler", "_save_rng_state"} or qual.endswith("ThetaModel.save"):
            return "checkpointing"
    for path, name, qual in frames:
        if name in {"evaluate", "validate", "evaluation_loop", "prediction_step", "_evaluate"} \
                or qual.endswith("ValidationMetrics.run") or (name == "generate" and "generation" in path):
            return "validation"
    for path, name, qual in frames:
        p = path.replace("\\", "/")
        if "lm_loss.py" in p or "loss_utils.py" in p or (name in {"cross_entropy", "nll_loss"}) or (
                "/src/" in p and "loss" in name.lower() and "accumulate" not in name):
            return "loss"
        if name in {"backward", "_engine_run_backward"} and ("torch/" in p or "accelerate" in p):
            return "backward"
        if "torch/optim/" in p or "clip_grad" in p or any(k in qual for k in (
                "CPUOffloadOptimizer", "ExponentialMovingAverage", "add_gradient_noise", "Ema")):
            return "optimizer"
        if "torch/utils/data/" in p or "collate" in name or "data_collator" in p or "Sampler" in qual \
                or name in {"pack_examples", "group_by_length", "batches", "global_order"}:
            return "data"
        if "tensorboard" in p or "logging/__init__" in p or "/json/" in p or "tqdm" in p \
                or "trainer_callback" in p or name in {"write", "flush", "add_scalar"}:
            return "logging"
        if "transformers/models/" in p or "torch/nn/modules/" in p or "torch/nn/functional" in p \
                or "torch/_dynamo" in p or "torch/_inductor" in p:
            return "forward"
    return "other"


class StackSampler:
    """Where the main thread's time goes, by sampling its Python stack every ``period`` seconds.

    Each sample adds the real time since the previous one to the bucket of the current stack (``_classify``),
    so a late sample still accounts for its interval. Knows nothing of either loop's internals beyond
    function and file names; costs about 1% (one stack walk per 5 ms, under the GIL, while torch ops run
    without it).
    """

    def __init__(self, period: float = 0.005):
        self.period = period
        self.seconds = {b: 0.0 for b in BUCKETS}
        self.other: dict[str, float] = {}
        self._stop = threading.Event()
        self._main = threading.main_thread().ident

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.period):
            frame = sys._current_frames().get(self._main)
            now = time.perf_counter()
            frames = []
            while frame is not None:
                code = frame.f_code
                frames.append((code.co_filename, code.co_name, getattr(code, "co_qualname", code.co_name)))
                frame = frame.f_back
            bucket = _classify(frames)
            self.seconds[bucket] += now - last
            if bucket == "other" and frames:
                key = f"{Path(frames[0][0]).name}:{frames[0][2]}"
                self.other[key] = self.other.get(key, 0.0) + now - last
            last = now

    def __enter__(self) -> "StackSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------------
# The runners: one run of one configuration
# ---------------------------------------------------------------------------------------------------------------

def _ours_argv(job: Job, out: Path, epochs: int, steps: int, seed: int, config: str) -> list[str]:
    """Every non-technique flag explicit (a --profile after them changes the techniques only); flags this
    version of the trainer does not have are left out."""
    pairs = [("--model_name", job.model_dir), ("--data_path", job.data_path), ("--datasets_dir", job.datasets_dir),
             ("--output_dir", out), ("--epochs", epochs), ("--max_steps", steps), ("--num_samples", 0),
             ("--no_progress_bar", None), ("--no_color", None), ("--batch_size", job.batch_size),
             ("--gradient_accumulation_steps", job.accum), ("--learning_rate", job.learning_rate),
             ("--max_length", job.max_length), ("--seed", seed), ("--warmup_proportion", 0.1),
             ("--scheduler_type", "cosine"), ("--weight_decay", 0.01), ("--max_grad_norm", 1.0),
             ("--precision", job.precision), ("--device", job.device), ("--resume", "never"),
             ("--eval_every_steps", 0), ("--save_every_steps", 0), ("--num_workers", 0), ("--patience", 100),
             ("--loss_on", "answer")]
    flags = available_flags()
    argv = [x for k, v in pairs if k in flags for x in ((k,) if v is None else (k, str(v)))]
    if config in ("a", "ap", "ac", "a0"):
        argv += technique_flags()["off"]
    elif config.startswith(ONE_TECHNIQUE):
        tf = technique_flags()
        on = f"--use_{config[1:]}"
        argv += [off for flag, off in tf["off_of"].items() if flag != on] + [on]
    elif config in ("c", "d", "e"):
        argv += ["--profile", {"c": "quick", "d": "rtx3060", "e": "rtx3060"}[config]]
        if config == "e":
            argv += ["--no_rdrop"]
    if config == "ap":
        argv += ["--packing"]
    if config == "ac":
        argv += ["--compile"]
    elif "--no_compile" in flags:
        argv += ["--no_compile"]  # timed runs compare the eager loop unless asked
    return argv


BASELINE_RUNNER = """
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))  # the harness's thread count: the same for every configuration
from src.training import train_enhanced as te
t0, c0 = time.perf_counter(), time.process_time()
summary = te.train(te.parse_args(sys.argv[3:]))
print("BASELINE " + json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                "exit_code": summary.get("exit_code", 0)}))
"""


def run_baseline(job: Job, epochs: int, steps: int, seed: int, tree: Path) -> dict:
    """Config a0: our loop as it is in another checkout (``tree``, e.g. ``git archive`` of an older commit), in
    a subprocess; wall and CPU time are taken inside it around ``train()``, as for the in-process runs."""
    out = Path(tempfile.mkdtemp(prefix="ours_a0_", dir=job.work))
    # the same records; only the prepared file's version stamp is set to what that checkout reads
    contract = (tree / "src" / "utils" / "data_contract.py").read_text(encoding="utf-8")
    version = int(re.search(r"PREPARED_FORMAT_VERSION\s*=\s*(\d+)", contract).group(1))
    data = json.loads(Path(job.data_path).read_text(encoding="utf-8"))
    stamped = out.with_suffix(".data.json")
    stamped.write_text(json.dumps({**data, "format_version": version}), encoding="utf-8")
    job = dataclasses.replace(job, data_path=stamped)
    # the flags this checkout's trainer knows; the baseline's help may differ only in new flags we leave out
    argv = [a for a in _ours_argv(job, out, epochs, steps, seed, "a0") if a not in ("--no_compile", "--no_packing")]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with PeakRSS(job.device):
        proc = subprocess.run([sys.executable, "-c", BASELINE_RUNNER, str(tree), str(torch.get_num_threads()), *argv],
                              cwd=tree, env=env,
                              capture_output=True, text=True, timeout=3600)
    info = next((json.loads(x[9:]) for x in proc.stdout.splitlines() if x.startswith("BASELINE ")), None)
    if proc.returncode != 0 or info is None or info["exit_code"] != 0:
        raise RuntimeError(f"baseline run failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-800:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    result = {"wall_s": info["wall_s"], "cpu_s": info["cpu_s"], "lines": lines, "probe": TokenProbe(),
              "buckets": None, "other": {}, "peak_rss": 0, "rss_start": 0, "peak_gpu": None, "useful_by_epoch": {}}
    for x in lines:
        e = x.get("epoch", 1)
        result["useful_by_epoch"][e] = result["useful_by_epoch"].get(e, 0.0) + x["tokens_per_sec"] * x["ms"] / 1000
    shutil.rmtree(out, ignore_errors=True)
    return result


def run_ours(job: Job, config: str, epochs: int = 1, steps: int = 0, seed: int = 42, sample: bool = True) -> dict:
    """Our loop through ``train(parse_args(argv))``, in this process. Wall time of the whole call; step lines
    from its metrics.jsonl; tokens from the probe; time buckets from the stack sampler."""
    from src.training import train_enhanced as te

    out = Path(tempfile.mkdtemp(prefix=f"ours_{config}_", dir=job.work))
    argv = _ours_argv(job, out, epochs, steps, seed, config)
    probe, sampler = TokenProbe(), StackSampler()
    with PeakRSS(job.device) as mem, probe.installed(), (sampler if sample else contextlib.nullcontext()), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        t0, c0 = time.perf_counter(), time.process_time()
        summary = te.train(te.parse_args(argv))
        if job.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if summary.get("exit_code", 0) != 0:
        raise RuntimeError(f"train() ended with {summary.get('status')}; see {out / 'train.log'}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    result = {"wall_s": wall, "cpu_s": cpu, "lines": lines, "probe": probe, "buckets": dict(sampler.seconds) if sample else None,
              "other": dict(sampler.other), "peak_rss": mem.peak, "rss_start": mem.start, "peak_gpu": mem.peak_gpu,
              "useful_by_epoch": {}}
    for x in lines:
        e = x.get("epoch", 1)
        result["useful_by_epoch"][e] = result["useful_by_epoch"].get(e, 0.0) + x["tokens_per_sec"] * x["ms"] / 1000
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


def trainer_arguments(**kw):
    """TrainingArguments across transformers 4.x and 5: ``group_by_length`` (bool) becomes 5's
    ``train_sampling_strategy``; ``eval_strategy`` was ``evaluation_strategy`` and ``use_cpu`` was ``no_cuda``
    in older 4.x."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    grouped = kw.pop("group_by_length", False)
    if "train_sampling_strategy" in fields:
        kw["train_sampling_strategy"] = "group_by_length" if grouped else "random"
    else:
        kw["group_by_length"] = grouped
    if "eval_strategy" not in fields and "eval_strategy" in kw:
        kw["evaluation_strategy"] = kw.pop("eval_strategy")
    if "use_cpu" not in fields and "use_cpu" in kw:
        kw["no_cuda"] = kw.pop("use_cpu")
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields or k in {"evaluation_strategy",
                                                                                   "no_cuda", "group_by_length"}})


def run_trainer(job: Job, config: str, epochs: int = 1, steps: int = 0, seed: int = 42, sample: bool = True) -> dict:
    """transformers.Trainer on the same tokenised records (our TokenizedDataset: the same answer-only labels)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    from src.model.theta_model import ThetaModel

    out = Path(tempfile.mkdtemp(prefix=f"trainer_{config}_", dir=job.work))
    probe, sampler = TokenProbe(), StackSampler()
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if job.device.startswith("cuda"):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    per_epoch = config in ("be", "b2e")
    with PeakRSS(job.device) as mem, probe.installed(), (sampler if sample else contextlib.nullcontext()), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        tm = ThetaModel.load(job.model_dir, device=job.device)
        train_ds, val_ds = _val_examples(job, tm.tokenizer)
        collator = DataCollatorForSeq2Seq(tm.tokenizer, padding="longest", label_pad_token_id=-100,
                                          return_tensors="pt")
        n_steps = steps or epochs * math.ceil(len(train_ds) / (job.batch_size * job.accum))
        targs = trainer_arguments(
            output_dir=str(out), per_device_train_batch_size=job.batch_size, per_device_eval_batch_size=job.batch_size,
            gradient_accumulation_steps=job.accum, learning_rate=job.learning_rate, num_train_epochs=epochs,
            max_steps=steps or -1, lr_scheduler_type="cosine", warmup_steps=int(round(0.1 * n_steps)),
            weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch_fused",
            use_cpu=not job.device.startswith("cuda"), bf16=job.precision == "bf16", fp16=job.precision == "fp16",
            report_to="none", logging_strategy="no", disable_tqdm=True, seed=seed, dataloader_num_workers=0,
            skip_memory_metrics=True, group_by_length=config in ("b2", "b2e"),
            eval_strategy="epoch" if per_epoch else "no", save_strategy="epoch" if per_epoch else "no",
            save_total_limit=2 if per_epoch else None)
        kind = "processing_class" if "processing_class" in inspect.signature(Trainer.__init__).parameters \
            else "tokenizer"
        trainer = Trainer(model=tm.model, args=targs, train_dataset=_TrainerDataset(train_ds.examples),
                          eval_dataset=_TrainerDataset(val_ds.examples) if per_epoch and len(val_ds) else None,
                          data_collator=collator, callbacks=[StepTimes()], **{kind: tm.tokenizer})
        trainer.train()
        if job.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    seconds = [b - a for a, b in zip(ends, ends[1:])]
    result = {"wall_s": wall, "cpu_s": cpu, "step_seconds": seconds, "probe": probe,
              "buckets": dict(sampler.seconds) if sample else None, "other": dict(sampler.other),
              "peak_rss": mem.peak, "rss_start": mem.start, "peak_gpu": mem.peak_gpu,
              "dims": Dims.of(tm.model.config)}
    del trainer, tm
    shutil.rmtree(out, ignore_errors=True)
    return result


BASELINE_TREE: list[Path] = []  # set from --baseline_tree


def run_config(job: Job, config: str, epochs: int, steps: int, seed: int, sample: bool = True) -> dict:
    if config == "a0":
        if not BASELINE_TREE:
            raise ValueError("config a0 needs --baseline_tree")
        return run_baseline(job, epochs, steps, seed, BASELINE_TREE[0])
    runner = run_trainer if config in TRAINER_CONFIGS else run_ours
    return runner(job, config, epochs=epochs, steps=steps, seed=seed, sample=sample)


# ---------------------------------------------------------------------------------------------------------------
# Mode "epoch": the whole epoch, as the difference of a 2-epoch and a 1-epoch run
# ---------------------------------------------------------------------------------------------------------------

def measure_epoch(config: str, job: Job, seed: int, dims: Dims, flops_per_useful_token: float,
                  matmul_rate: float | None = None, sample: bool = True) -> dict:
    """One epoch of ``config``: wall(2 epochs) - wall(1 epoch), same seed, so start-up and the final save
    cancel and epoch 1's validation and checkpoint stay in. Useful tokens of the epoch: our loop's own count
    (metrics.jsonl, epoch 2) or the probe's difference for Trainer; padding from the probe."""
    one = run_config(job, config, 1, 0, seed, sample)
    two = run_config(job, config, 2, 0, seed, sample)
    epoch_s = two["wall_s"] - one["wall_s"]
    p1, p2 = one["probe"].totals(), two["probe"].totals()
    if config in TRAINER_CONFIGS or not two.get("useful_by_epoch"):
        useful = (p2["useful_tokens_seen"] or 0) - (p1["useful_tokens_seen"] or 0)
    else:
        useful = two["useful_by_epoch"].get(2, 0.0)
    total = p2["total_tokens"] - p1["total_tokens"]
    seen = None if p2["useful_tokens_seen"] is None or p1["useful_tokens_seen"] is None else \
        p2["useful_tokens_seen"] - p1["useful_tokens_seen"]
    res = {"config": config, "epoch_s": epoch_s, "wall_1": one["wall_s"], "wall_2": two["wall_s"],
           "epoch_cpu_s": two["cpu_s"] - one["cpu_s"],
           "useful_tokens": useful, "useful_tokens_seen": seen,
           "useful_tok_s": useful / epoch_s if epoch_s > 0 else None,
           "padding_share": 1 - seen / total if seen is not None and total else None,
           "peak_rss_mb": two["peak_rss"] / 2**20,
           "peak_gpu_mb": two["peak_gpu"] / 2**20 if two["peak_gpu"] is not None else None}
    if "lines" in two:
        ms = [x["ms"] for x in two["lines"] if x.get("epoch") == 2][1:]
        res["step_ms"] = statistics.median(ms) if ms else None
        res["steps_per_epoch"] = sum(1 for x in two["lines"] if x.get("epoch") == 2)
    else:
        n1 = len(one["step_seconds"])
        res["step_ms"] = 1000 * statistics.median(two["step_seconds"][n1 + 1:] or two["step_seconds"])
        res["steps_per_epoch"] = len(two["step_seconds"]) - n1
    if sample and one["buckets"] is not None:
        res["breakdown_s"] = {b: two["buckets"][b] - one["buckets"][b] for b in BUCKETS}
        res["other_top"] = sorted(((k, two["other"].get(k, 0) - one["other"].get(k, 0)) for k in two["other"]),
                                  key=lambda kv: -kv[1])[:6]
    if matmul_rate and res["useful_tok_s"]:
        res["mfu"] = res["useful_tok_s"] * flops_per_useful_token / (matmul_rate * 1e9)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Mode "steps": a few optimizer steps (the 124M shape on a CPU)
# ---------------------------------------------------------------------------------------------------------------

def _steps_from(batches: list[tuple[list[int] | None, int]], seconds: list[float], per_step: int, dims: Dims,
                useful_check: list[float] | None = None) -> list[dict]:
    """Join training forwards (``per_step`` per optimizer step) with step times into per-step records."""
    steps = []
    for k, sec in enumerate(seconds):
        window = batches[k * per_step:(k + 1) * per_step]
        known = window and all(lens is not None for lens, _ in window)
        rows = [t for lens, _ in window for t in lens] if known else []
        useful = sum(rows)
        rec = {"seconds": sec, "useful": useful, "total": sum(len(lens) * T for lens, T in window) if known else None,
               "flops_useful": sum(dims.train_flops(t) for t in rows) if known else None,
               "flops_all": sum(len(lens) * dims.train_flops(T) for lens, T in window) if known else None}
        if useful_check is not None and (not known or abs(useful_check[k] - useful) > 0.5):
            # the forwards seen do not match the loop's own count (R-Drop's doubled batch, packing): keep the
            # loop's useful tokens, leave padding unknown rather than guess
            rec = {"seconds": sec, "useful": useful_check[k], "total": None, "flops_useful": None, "flops_all": None}
        steps.append(rec)
    return steps


def measure(config: str, job: Job, steps: int, seed: int = 42, warmup: int = 1,
            matmul_rate: float | None = None) -> dict:
    """``steps`` optimizer steps of ``config``; the first ``warmup`` dropped (allocator, thread pools, loader
    start-up). Rates are totals over the measured steps divided by their total time."""
    run = run_config(job, config, 1, steps, seed, sample=False)
    from transformers import AutoConfig

    dims = Dims.of(AutoConfig.from_pretrained(job.model_dir))
    if config in TRAINER_CONFIGS:
        recs = _steps_from(run["probe"].batches(), run["step_seconds"], job.accum, dims)
    else:
        lines = run["lines"]
        recs = _steps_from(run["probe"].batches(), [x["ms"] / 1000 for x in lines], job.accum, dims,
                           [x["tokens_per_sec"] * x["ms"] / 1000 for x in lines])
    kept = recs[warmup:] or recs[-1:]
    secs = sum(s["seconds"] for s in kept)
    useful = sum(s["useful"] for s in kept)
    known = all(s["total"] is not None for s in kept)
    total = sum(s["total"] for s in kept) if known else None
    res = {"config": config, "steps_measured": len(kept),
           "step_ms": 1000 * statistics.median(s["seconds"] for s in kept),
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
# Mode "head": the LM head and loss alone, target positions in chunks against full logits
# ---------------------------------------------------------------------------------------------------------------

def head_case(kind: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> float:
    """Forward and backward of the head and loss, ``kind`` "full" (logits at every position, the shifted
    cross-entropy as the loop computed it) or "targets" (src/training/lm_loss.py); returns the loss."""
    from src.training.lm_loss import TargetIndex, head_loss

    if str(PROJECT_ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT / "tests"))
    from full_logits import full_logits_token_losses  # the tests' oracle: the loss as the loop once computed it

    hidden.grad = weight.grad = None
    if kind == "full":
        tok, mask = full_logits_token_losses(hidden @ weight.T, labels)  # (B, T, V) logits, (B, T-1, V) fp32 copy
        loss = (tok * mask).sum()
    else:
        loss = head_loss(hidden, weight, TargetIndex.from_labels(labels).to(hidden.device)).loss
    loss.backward()
    return float(loss.detach())


def bench_head(shapes: list[str], batch: int, length: int, target_share: float, repeats: int, device: str,
               tiny_dims: tuple[int, int]) -> dict:
    """Time and peak memory of ``head_case`` per shape, interleaved (full, targets, full, ...), medians.

    Memory on CPU: peak resident set (psutil, sampled every 1 ms, after ``malloc_trim``) minus the resident
    set before the call, with the inputs already allocated; on CUDA ``max_memory_allocated`` minus the
    allocation before the call. The gradients of the hidden states and the weight are inside both.
    """
    out = {}
    for shape in shapes:
        C, V = HEAD_SHAPES[shape] or tiny_dims
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(batch, length, C, generator=g).to(device).requires_grad_()
        weight = (0.02 * torch.randn(V, C, generator=g)).to(device).requires_grad_()
        labels = torch.randint(0, V, (batch, length), generator=g)
        prompt = int(round(length * (1 - target_share)))
        labels[:, :prompt] = -100  # the prompt: not a target
        labels = labels.to(device)
        rows: dict[str, list[dict]] = {"full": [], "targets": []}
        losses = {}
        for _ in range(repeats):
            for kind in ("full", "targets"):
                sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
                with PeakRSS(device, period=0.001) as mem:
                    base_gpu = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
                    t0 = time.perf_counter()
                    losses[kind] = head_case(kind, hidden, weight, labels)
                    sync()
                    dt = time.perf_counter() - t0
                peak = (mem.peak_gpu - base_gpu) if mem.peak_gpu is not None else (mem.peak - mem.start)
                rows[kind].append({"seconds": dt, "peak_mb": peak / 2**20})
        med = {k: {"ms": 1000 * statistics.median(r["seconds"] for r in v),
                   "peak_mb": statistics.median(r["peak_mb"] for r in v)} for k, v in rows.items()}
        n_targets = int((labels[:, 1:] != -100).sum())
        out[shape] = {"hidden": C, "vocab": V, "batch": batch, "length": length, "targets": n_targets,
                      "full_logits_mb": batch * length * V * 4 / 2**20, "median": med, "runs": rows,
                      "loss_rel_diff": abs(losses["full"] - losses["targets"]) / max(abs(losses["full"]), 1e-9),
                      "speedup": med["full"]["ms"] / med["targets"]["ms"],
                      "memory_ratio": med["full"]["peak_mb"] / max(med["targets"]["peak_mb"], 1e-9)}
        del hidden, weight, labels
    return out


# ---------------------------------------------------------------------------------------------------------------
# Padding share from the tokenised lengths
# ---------------------------------------------------------------------------------------------------------------

def _share(batches: list[list[int]]) -> float:
    useful = sum(sum(b) for b in batches)
    return 1 - useful / sum(len(b) * max(b) for b in batches)


def padding_shares(lengths: list[int], max_length: int, batch_sizes=(4, 8), epochs: int = 5) -> dict:
    """Padding share (padded tokens / all tokens processed) of each batching scheme, averaged over ``epochs``
    seeded orders; no training involved.

    fixed: every row padded to max_length. dynamic: random batches padded to their longest row.
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


def tokenised(job: Job) -> tuple[list[int], float]:
    """Training records' token lengths and the share of their positions that are targets."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(job.model_dir)
    train_ds, _ = _val_examples(job, tok)
    lengths = [len(ex["input_ids"]) for ex in train_ds.examples]
    targets = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in train_ds.examples)
    return lengths, targets / max(sum(lengths), 1)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def per_round_ratio(runs: dict[str, list[dict]], x: str, y: str, key: str) -> float | None:
    """Median over rounds of x/y: runs of one round are interleaved, so pairing them cancels most of the load
    changes of a shared machine (a ratio of medians does not)."""
    pairs = [(p.get(key), q.get(key)) for p, q in zip(runs.get(x, []), runs.get(y, []))]
    vals = [p / q for p, q in pairs if p and q]
    return statistics.median(vals) if vals else None


def epoch_ratios(runs: dict[str, list[dict]]) -> dict[str, float | None]:
    """How many times longer than ours each configuration's epoch is (Trainer), or ours with techniques."""
    out = {f"{c}/a epoch time": per_round_ratio(runs, c, "a", "epoch_s") for c in runs if c != "a"}
    out.update({f"{c}/a epoch CPU time": per_round_ratio(runs, c, "a", "epoch_cpu_s") for c in runs if c != "a"})
    return out


def step_ratios(runs: dict[str, list[dict]]) -> dict[str, float | None]:
    out = {"a/b useful tok/s": per_round_ratio(runs, "a", "b", "useful_tok_s"),
           "a/b2 useful tok/s": per_round_ratio(runs, "a", "b2", "useful_tok_s"),
           "d/a step time": per_round_ratio(runs, "d", "a", "step_ms")}
    return {k: v for k, v in out.items() if v is not None}  # only the pairs this run measured


def median_of(runs: list[dict], keys: tuple[str, ...]) -> dict:
    med = {"runs": len(runs)}
    for key in keys:
        vals = [r[key] for r in runs if r.get(key) is not None]
        med[key] = statistics.median(vals) if vals else None
    return med


EPOCH_COLUMNS = [("epoch_s", "epoch s", "{:.1f}"), ("epoch_cpu_s", "epoch CPU s", "{:.1f}"), ("useful_tok_s", "useful tok/s", "{:.0f}"),
                 ("padding_share", "padding", "{:.1%}"), ("step_ms", "step ms", "{:.0f}"),
                 ("steps_per_epoch", "steps", "{:.0f}"), ("mfu", "MFU useful", "{:.1%}"),
                 ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("peak_gpu_mb", "peak GPU MB", "{:.0f}")]
STEP_COLUMNS = [("useful_tok_s", "useful tok/s", "{:.0f}"), ("total_tok_s", "total tok/s", "{:.0f}"),
                ("padding_share", "padding", "{:.1%}"), ("step_ms", "step ms", "{:.0f}"),
                ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("peak_gpu_mb", "peak GPU MB", "{:.0f}"),
                ("mfu", "MFU useful", "{:.1%}"), ("mfu_all", "MFU all", "{:.1%}")]


def print_table(title: str, runs: dict[str, list[dict]], columns, ratios: dict, skipped: dict[str, str]) -> dict:
    print(f"\n## {title}")
    print("| config | " + " | ".join(t for _, t, _ in columns) + " | per round |")
    print("|---|" + "---:|" * len(columns) + "---|")
    med = {}
    key0 = columns[0][0]
    for c in ordered_configs({**runs, **skipped}):
        if runs.get(c):
            m = med[c] = median_of(runs[c], tuple(k for k, _, _ in columns))
            cells = " | ".join(_fmt(m.get(k), f) for k, _, f in columns)
            per = ", ".join(_fmt(r.get(key0), columns[0][2]) for r in runs[c])
            print(f"| {c} {config_title(c)} | {cells} | {per} |")
        elif c in skipped:
            print(f"| {c} {config_title(c)} | skipped: {skipped[c]} |")
    print("ratios (median of per-round ratios): " + ", ".join(f"{k} = {_fmt(v, '{:.2f}')}" for k, v in ratios.items()))
    return med


def print_breakdown(title: str, runs: dict[str, list[dict]]) -> dict:
    """Seconds per epoch in each bucket (median over rounds), one column per configuration."""
    cols = [c for c in ordered_configs(runs) if runs.get(c) and runs[c][0].get("breakdown_s")]
    if not cols:
        return {}
    table = {c: {b: statistics.median(r["breakdown_s"][b] for r in runs[c]) for b in BUCKETS} for c in cols}
    print(f"\n## where the epoch's time goes ({title}; seconds per epoch from the stack sampler, 2-epoch minus "
          "1-epoch run, median over rounds)")
    print("| part | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for b in BUCKETS:
        print(f"| {b} | " + " | ".join(f"{table[c][b]:.2f}" for c in cols) + " |")
    print("| epoch (wall) | " + " | ".join(f"{statistics.median(r['epoch_s'] for r in runs[c]):.2f}" for c in cols)
          + " |")
    # the model's own cost per token (forward + backward + loss over the tokens it was given, padding included):
    # equal here means the loops differ only in how many tokens they compute and in their per-epoch work
    for label, useful_only in (("model us per processed token", False), ("model us per useful token", True)):
        cells = []
        for c in cols:
            vals = []
            for r in runs[c]:
                model = sum(r["breakdown_s"][b] for b in ("forward", "backward", "loss"))
                tokens = r.get("useful_tokens") or 0
                if not useful_only and r.get("padding_share") is not None:
                    tokens = tokens / (1 - r["padding_share"])
                vals.append(1e6 * model / tokens if tokens else None)
            vals = [v for v in vals if v is not None]
            cells.append(f"{statistics.median(vals):.0f}" if vals else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for c in cols:
        top = runs[c][0].get("other_top") or []
        if top:
            print(f"  {c} 'other' (first round): " + "; ".join(f"{k} {v:.2f}s" for k, v in top if v > 0.05))
    return table


def print_padding(shape: str, pad: dict) -> None:
    print(f"\n## padding share from the tokenised lengths ({shape} tokenizer, {pad['records']} training records, "
          f"median {pad['median_len']:.0f}, p90 {pad['p90_len']}, max {pad['max_len']} tokens)")
    keys = ("fixed", "dynamic", "grouped", "sorted", "packed", "packed_ffd")
    print("| batch | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for k, row in pad.items():
        if k.startswith("batch_"):
            print(f"| {k[6:]} | " + " | ".join(f"{row[x]:.1%}" for x in keys) + " |")


def print_head(res: dict, device: str) -> None:
    mem = "peak RSS above the start (psutil, 1 ms sampling)" if device == "cpu" else "max_memory_allocated"
    print(f"\n## LM head and loss alone: full logits vs target positions in chunks (fp32, {device}; memory: {mem})")
    print("| shape | C x V | B x T | targets | full ms | targets ms | speed-up | full MB | targets MB | "
          "memory ratio | [B,T,V] fp32 MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape, r in res.items():
        f, t = r["median"]["full"], r["median"]["targets"]
        print(f"| {shape} | {r['hidden']} x {r['vocab']} | {r['batch']} x {r['length']} | {r['targets']} | "
              f"{f['ms']:.0f} | {t['ms']:.0f} | {r['speedup']:.2f}x | {f['peak_mb']:.0f} | {t['peak_mb']:.0f} | "
              f"{r['memory_ratio']:.1f}x | {r['full_logits_mb']:.0f} |")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def skipped_configs(configs: list[str]) -> dict[str, str]:
    """Configurations this trainer cannot run, with the reason (read from its --help)."""
    flags = available_flags()
    out = {}
    for c in configs:
        if c in ("c", "d", "e") and "--use_ema" not in flags:
            out[c] = "train_enhanced.py has no technique flags"
        elif c == "e" and "--no_rdrop" not in flags:
            out[c] = "train_enhanced.py has no --no_rdrop"
        elif c == "ap" and "--packing" not in flags:
            out[c] = "train_enhanced.py has no --packing"
        elif c == "ac" and "--compile" not in flags:
            out[c] = "train_enhanced.py has no --compile"
    return out


def interleaved_rounds(configs: list[str], repeats: int, device: str, measure_one, describe):
    """Run every configuration once per round, interleaved, so load changes hit all of them alike.

    ``measure_one(config, round, matmul_rate)`` returns a result dict (given a ``load`` key here) and
    ``describe(result)`` its console line. A configuration that fails is reported and left out of later rounds,
    without losing the others' results. Returns ``(runs per config, errors per config, matmul rate per round)``.
    """
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    errors: dict[str, str] = {}
    rates: list[float] = []
    for rep in range(repeats):
        rate = matmul_gflops(device)  # the machine's speed this round: MFU and load drift
        rates.append(rate)
        for c in configs:
            if c in errors:
                continue
            try:
                r = measure_one(c, rep, rate)
            except Exception as err:  # one failing config must not lose the others' results
                errors[c] = f"{type(err).__name__}: {err}"
                print(f"  round {rep + 1} {c}: FAILED {errors[c]}", flush=True)
                continue
            r["load"] = load_average()
            runs[c].append(r)
            print(f"  round {rep + 1} {c:<3} {describe(r)}", flush=True)
    return runs, errors, rates


def run_epoch_mode(args, job_for, shapes, configs, skipped, results) -> None:
    for shape in shapes:
        for B in args.batch_sizes:
            job = job_for(shape, B)
            from transformers import AutoConfig

            dims = Dims.of(AutoConfig.from_pretrained(job.model_dir))
            lengths, share = tokenised(job)
            flops_tok = sum(dims.train_flops(t) for t in lengths) / sum(lengths)
            print(f"\n# {shape}, batch {B}: {dims.n_layer} layers x {dims.n_embd}, vocabulary {dims.vocab}; "
                  f"{len(lengths)} training records, {sum(lengths)} tokens ({share:.0%} targets); "
                  f"{args.repeats} rounds of {', '.join(configs)}; {load_average()}", flush=True)
            runs, errors, rates = interleaved_rounds(
                configs, args.repeats, args.device,
                lambda c, rep, rate: measure_epoch(c, job, 42 + rep, dims, flops_tok, rate, sample=args.breakdown),
                lambda r: (f"epoch {r['epoch_s']:7.1f} s  {_fmt(r['useful_tok_s'], '{:.0f}'):>6} useful tok/s  "
                           f"padding {_fmt(r['padding_share'], '{:.1%}')}  (runs {r['wall_1']:.0f} s + "
                           f"{r['wall_2']:.0f} s; {r['load']})"))
            loads = [r["load"] for c in configs for r in runs[c]]
            title = (f"{shape}, batch {B}: whole epoch (2-epoch minus 1-epoch wall time); fp32 matmul rate "
                     f"{statistics.median(rates):.0f} GFLOP/s")
            rat = epoch_ratios(runs)
            med = print_table(title, runs, EPOCH_COLUMNS, rat, {**skipped, **errors})
            bd = print_breakdown(f"{shape}, batch {B}", runs) if args.breakdown else {}
            pad = padding_shares(lengths, args.max_length, batch_sizes=(B,))
            print_padding(shape, pad)
            results["epoch"][f"{shape}/batch_{B}"] = {
                "dims": vars(dims), "records": len(lengths), "target_share": share, "matmul_gflop_s": rates,
                "runs": runs, "median": med, "ratios": rat, "breakdown": bd, "errors": errors, "loads": loads,
                "padding": pad}
            if args.out:
                args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


def run_steps_mode(args, job_for, shapes, configs, skipped, results) -> None:
    steps = args.steps
    warmup = 1 if steps < 10 else 2
    for shape in shapes:
        for B in args.batch_sizes:
            job = job_for(shape, B)
            from transformers import AutoConfig

            dims = Dims.of(AutoConfig.from_pretrained(job.model_dir))
            print(f"\n# {shape}, batch {B}: N (matmul weights) = {dims.matmul_params / 1e6:.2f}M; {steps} steps per "
                  f"run ({warmup} dropped), {args.repeats} rounds of {', '.join(configs)}; {load_average()}",
                  flush=True)
            runs, errors, rates = interleaved_rounds(
                configs, args.repeats, args.device,
                lambda c, rep, rate: measure(c, job, steps, seed=42 + rep, warmup=warmup, matmul_rate=rate),
                lambda r: (f"{r['useful_tok_s']:8.0f} useful tok/s  {r['step_ms']:7.0f} ms/step  "
                           f"MFU {_fmt(r.get('mfu'), '{:.1%}')}  ({r['load']})"))
            title = (f"{shape}, batch {B}: {steps} steps ({warmup} dropped); fp32 matmul rate "
                     f"{statistics.median(rates):.0f} GFLOP/s ({', '.join(f'{x:.0f}' for x in rates)})")
            rat = step_ratios(runs)
            med = print_table(title, runs, STEP_COLUMNS, rat, {**skipped, **errors})
            results["steps"][f"{shape}/batch_{B}"] = {"dims": vars(dims), "matmul_params": dims.matmul_params,
                                                      "steps": steps, "matmul_gflop_s": rates, "runs": runs,
                                                      "median": med, "ratios": rat, "errors": errors}
            if args.out:
                args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")


def build_cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["epoch", "steps", "head"], default="epoch",
                   help="epoch: whole-epoch wall time (default); steps: a few steps (124M); head: LM head + loss only")
    p.add_argument("--shapes", type=str, default=None,
                   help="comma list: quick, gpt2-124m (head mode also gpt2-355m); default by mode")
    p.add_argument("--configs", type=str, default=None,
                   help=f"comma list of {', '.join(CONFIGS)}, or +X for config a with only --use_X on "
                        "(e.g. +ema,+rdrop; default: epoch a,b,b2,be,b2e; steps a,b,b2)")
    p.add_argument("--batch_sizes", type=str, default="4,8", help="micro-batch sizes, comma list")
    p.add_argument("--records", type=int, default=540, help="training records sampled from the prepared file (0 = all)")
    p.add_argument("--val_records", type=int, default=60, help="validation records kept (our loop and be/b2e use them)")
    p.add_argument("--steps", type=int, default=4, help="steps mode: optimizer steps per run (first dropped)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; medians and ratios over these")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (same for every config)")
    p.add_argument("--max_length", type=int, default=512, help="sequence limit in tokens")
    p.add_argument("--learning_rate", type=float, default=5e-4, help="peak learning rate (same for every config)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="training precision")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="epoch mode: sample the stacks to split the epoch's time by part")
    p.add_argument("--head_repeats", type=int, default=3, help="head mode: interleaved repeats per shape")
    p.add_argument("--baseline_tree", type=Path, default=None,
                   help="config a0: our loop from this checkout (e.g. git archive <commit> | tar -x -C DIR)")
    p.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets", help="sample data folder")
    p.add_argument("--out", type=Path, default=None, help="write every result to this JSON file")
    p.add_argument("--keep_work", action="store_true", help="keep the temporary folder (models, data)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_cli()
    args = p.parse_args(argv)
    default_shapes = {"epoch": "quick", "steps": "gpt2-124m", "head": "quick,gpt2-124m,gpt2-355m"}[args.mode]
    shapes = [s.strip() for s in (args.shapes or default_shapes).split(",") if s.strip()]
    configs = [c.strip() for c in (args.configs or ("a,b,b2,be,b2e" if args.mode == "epoch" else "a,b,b2")).split(",")]
    allowed = HEAD_SHAPES if args.mode == "head" else SHAPES
    for s in shapes:
        if s not in allowed:
            p.error(f"--shapes: unknown shape {s} (choose from {', '.join(allowed)})")
    for c in configs:
        if c.startswith(ONE_TECHNIQUE):
            if f"--use_{c[1:]}" not in technique_flags()["on"]:
                names = ", ".join("+" + f[len("--use_"):] for f in technique_flags()["on"])
                p.error(f"--configs: the trainer has no --use_{c[1:]} (one-technique configs: {names})")
        elif c not in CONFIGS:
            p.error(f"--configs: unknown config {c} (choose from {', '.join(CONFIGS)}, or +X)")
    try:
        args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--batch_sizes: a comma list of integers, e.g. 4,8")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    import logging
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="theta_bench_"))
    if args.baseline_tree:
        BASELINE_TREE[:] = [args.baseline_tree.resolve()]
    elif "a0" in configs:
        p.error("--configs a0 needs --baseline_tree")
    skipped = skipped_configs(configs)
    configs = [c for c in configs if c not in skipped]
    te_file = PROJECT_ROOT / "src" / "training" / "train_enhanced.py"
    import hashlib

    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "device": args.device, "load_at_start": load_average(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_enhanced_sha256": hashlib.sha256(te_file.read_bytes()).hexdigest()[:12],
        "skipped": skipped, "epoch": {}, "steps": {}, "head": {}}
    print(f"theta bench ({args.mode}): torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device}, {args.precision}; train_enhanced.py sha256 "
          f"{results['train_enhanced_sha256']}; {load_average()}; work dir {work}", flush=True)
    try:
        data_path, how = prepare_data(work, args.datasets_dir, args.records, args.val_records)
        results["data"] = how
        print(f"data: {how}", flush=True)

        def job_for(shape: str, batch: int) -> Job:
            return Job(build_shape(shape, work, args.datasets_dir), data_path, args.datasets_dir, work, batch,
                       args.accum, args.max_length, args.learning_rate, args.device, args.precision)

        if args.mode == "epoch":
            run_epoch_mode(args, job_for, shapes, configs, skipped, results)
        elif args.mode == "steps":
            run_steps_mode(args, job_for, shapes, configs, skipped, results)
        else:
            from transformers import AutoConfig

            job = job_for("quick", args.batch_sizes[0])
            cfg = AutoConfig.from_pretrained(job.model_dir)
            _, share = tokenised(job)
            print(f"target share of the positions in the data: {share:.1%}; {load_average()}", flush=True)
            res = bench_head(shapes, args.batch_sizes[0], args.max_length, share, args.head_repeats, args.device,
                             (cfg.n_embd, cfg.vocab_size))
            results["head"] = res
            print_head(res, args.device)
        results["machine"]["load_at_end"] = load_average()
        print(f"\n{load_average()} at the end", flush=True)
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
