"""Fine-tune GPT-2 (or the offline theta-tiny) into a domain question-answering assistant.

One training loop you can read top to bottom: shifted next-token cross-entropy on answer tokens, normalised by
the target tokens of the whole accumulated batch; AdamW without decay on biases and norms; warmup then a
linear, cosine or restarting-cosine schedule; validation every epoch; early stopping; atomic resumable
checkpoints; tensorboard, ``metrics.jsonl``, ``loss_history.json`` and ``train.log`` in the run folder.

    python src/training/train_enhanced.py --profile quick
    python -m src.training.train_enhanced --model_name gpt2 --data_path Datasets/enhanced_training_data.json \
        --output_dir models/theta_enhanced_20260101_230000 --epochs 5 --batch_size 4
    torchrun --nproc_per_node 2 -m src.training.train_enhanced --profile quick     # DDP (gloo on CPU)

Exit codes: 0 done, 2 a user error (the message names the flag or file), 3 interrupted by SIGINT/SIGTERM after
saving a checkpoint (run the same command again to resume), 4 too many non-finite steps in a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from src.model.theta_model import ThetaModel, split_prompt
from src.utils.common import (PROJECT_ROOT, UserError, atomic_write_json, new_run_id, read_json,
                              run_entry_point, setup_logging)

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
DATA_FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
EXIT_INTERRUPTED = 3
EXIT_NONFINITE = 4
IGNORE_INDEX = -100

# Profiles (DESIGN.md). Explicit flags override these values.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(model_name="theta-tiny", epochs=4, batch_size=8, gradient_accumulation_steps=2,
                  learning_rate=2e-3, warmup_proportion=0.1, scheduler_type="cosine", weight_decay=0.01,
                  max_length=256, patience=3),
    "rtx3060": dict(model_name="gpt2-medium", epochs=20, batch_size=3, gradient_accumulation_steps=4,
                    learning_rate=3e-5, warmup_proportion=0.15, scheduler_type="cosine_hard_restarts",
                    num_cycles=4, weight_decay=0.01, patience=5, max_length=512),
}


# ---------------------------------------------------------------------------------------------------------------
# Data: tokenised records, dynamic padding, the epoch sampler
# ---------------------------------------------------------------------------------------------------------------

class TokenizedDataset(Dataset):
    """Prepared records tokenised once: ``input_ids`` (prompt + answer + EOS) and ``labels``.

    ``labels`` are -100 on the prompt when ``loss_on == "answer"`` (the default), so the loss covers the answer
    and the end-of-text token only. Records longer than ``max_length`` are cut at the end and counted in
    ``truncated``; a record whose prompt alone leaves no answer token is skipped and counted in ``skipped``.
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int, loss_on: str = "answer"):
        self.examples: list[dict] = []
        self.truncated = self.skipped = 0
        domains = sorted({r.get("domain", "unknown") for r in records})
        self.domain_names = domains
        domain_index = {d: i for i, d in enumerate(domains)}
        eos = tokenizer.eos_token_id
        for rec in records:
            prompt, _ = split_prompt(rec["question"], None, rec.get("context"))
            p_ids = tokenizer(prompt)["input_ids"]
            a_ids = tokenizer(" " + rec["answer"].strip())["input_ids"] + [eos]
            ids = p_ids + a_ids
            labels = ([IGNORE_INDEX] * len(p_ids) if loss_on == "answer" else list(p_ids)) + a_ids
            if len(ids) > max_length:
                self.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels[1:]):
                self.skipped += 1
                continue
            self.examples.append({"input_ids": ids, "labels": labels, "id": rec.get("id", ""),
                                  "domain": domain_index[rec.get("domain", "unknown")],
                                  "question": rec["question"]})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def target_tokens(self) -> int:
        return sum(sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX) for ex in self.examples)


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest record of the batch (not to max_length); labels -100 on padding."""
    T = max(len(ex["input_ids"]) for ex in batch)
    B = len(batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "domain": torch.tensor([ex["domain"] for ex in batch])}


class EpochSampler:
    """A seeded permutation per epoch (seed + epoch), sharded by rank, resumable at a batch position.

    The order depends only on ``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self) -> list[list[int]]:
        """All batches of the current epoch for this rank (each rank gets the same number)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world if self.world > 1 else self.n
        order = order[self.rank:per_rank * self.world:self.world] if self.world > 1 else order
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:
        return len(self.batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}


def load_prepared_records(path: Path) -> list[dict]:
    """Records of the prepared file; the format version is checked so stale files fail with a hint."""
    data = read_json(path, "prepared data file (--data_path)")
    hint = "Re-run data preparation: python -m src.data_processing.prepare_data_for_training"
    if not isinstance(data, dict) or "records" not in data:
        raise UserError(f"--data_path {path} is not a prepared file (no 'records'). {hint}")
    if data.get("format_version") != DATA_FORMAT_VERSION:
        raise UserError(f"--data_path {path} has format_version {data.get('format_version')}, this trainer reads "
                        f"{DATA_FORMAT_VERSION}. {hint}")
    records = data["records"]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) \
                or not isinstance(rec.get("answer"), str):
            raise UserError(f"--data_path {path}: record {i} has no question/answer strings. {hint}")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------------------------------------------

def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy and the target mask, both (B, T-1).

    Position t predicts token t+1: logits[:, :-1] against labels[:, 1:]. Masked positions carry 0 loss.
    """
    logits = logits[:, :-1, :].float()  # (B, T-1, V); fp32 for a stable log-softmax under autocast
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    return loss, mask


def count_target_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model, loader_batches: list[dict], device: torch.device, autocast_ctx, domain_names: list[str],
             world: int = 1) -> dict:
    """Validation loss (token-weighted), perplexity, token accuracy and per-domain loss/perplexity/accuracy."""
    was_training = model.training
    model.eval()
    n_domains = len(domain_names)
    sums = torch.zeros(3 + 3 * n_domains, dtype=torch.float64)  # loss, tokens, correct, then per domain
    for batch in loader_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_ctx:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, mask = token_losses(logits, batch["labels"])
        correct = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask
        per_rec = torch.stack([loss.sum(1), mask.sum(1).to(loss.dtype), correct.sum(1).to(loss.dtype)], 1).double()
        sums[:3] += per_rec.sum(0).cpu()
        for d in batch["domain"].unique().tolist():
            sel = batch["domain"] == d
            sums[3 + 3 * d: 6 + 3 * d] += per_rec[sel].sum(0).cpu()
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    total_loss, tokens, correct = sums[:3].tolist()
    val_loss = total_loss / max(tokens, 1)
    out = {"loss": val_loss, "perplexity": safe_exp(val_loss), "token_accuracy": correct / max(tokens, 1),
           "tokens": int(tokens), "domains": {}}
    for d, name in enumerate(domain_names):
        d_loss, d_tok, d_cor = sums[3 + 3 * d: 6 + 3 * d].tolist()
        if d_tok > 0:
            out["domains"][name] = {"loss": d_loss / d_tok, "perplexity": safe_exp(d_loss / d_tok),
                                    "token_accuracy": d_cor / d_tok, "tokens": int(d_tok)}
    return out


def safe_exp(x: float) -> float:
    """Perplexity without overflow: exp capped at exp(50)."""
    return math.exp(min(x, 50.0))


# ---------------------------------------------------------------------------------------------------------------
# Helpers: device and precision, model, optimizer, schedule, checkpoints
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Precision:
    name: str  # fp32, fp16 or bf16
    autocast: Any
    scaler: Any  # torch.amp.GradScaler for fp16, else None


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """fp32 on CPU by default (bf16/fp16 autocast is 10-20x slower on CPUs without those units); on CUDA, bf16
    where supported, else fp16 with a GradScaler. TF32 matmuls on Ampere and newer."""
    if device.type != "cuda":
        if requested in ("fp16",):
            raise UserError("--precision fp16 needs a CUDA GPU; use --precision fp32 (or bf16) on CPU")
        name = "bf16" if requested == "bf16" else "fp32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            raise UserError("--precision bf16: this GPU does not support bf16; use --precision fp16")
        name = requested if requested != "auto" else ("bf16" if bf16_ok else "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
    ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
    return Precision(name, ctx, scaler)


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (every 1-D parameter); fused kernels where available."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    # Fused AdamW exists on CPU and CUDA in current torch and is the fastest; foreach is the fallback.
    try:
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def build_scheduler(optimizer, args: argparse.Namespace, total_steps: int):
    """Warmup then linear / cosine / cosine with hard restarts (transformers' schedules).

    Each group's learning rate is ``learning_rate * lr_scale`` times the schedule's factor.
    """
    from transformers import get_scheduler

    for group in optimizer.param_groups:
        group["lr"] = args.learning_rate * group.get("lr_scale", 1.0)
    warmup = int(round(args.warmup_proportion * total_steps))
    name = {"linear": "linear", "cosine": "cosine", "cosine_hard_restarts": "cosine_with_restarts"}[args.scheduler_type]
    kwargs = {"num_cycles": args.num_cycles} if args.scheduler_type == "cosine_hard_restarts" else None
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    if os.name != "nt":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt_dir: Path, state: dict, keep_last: int) -> Path:
    """``checkpoints/step_<N>/state.pt`` written in a temporary folder, fsynced, renamed, then marked complete.

    A folder without the marker is an interrupted save: resume skips it. The newest ``keep_last`` are kept.
    """
    final = ckpt_dir / f"step_{state['global_step']}"
    tmp = ckpt_dir / f".tmp_step_{state['global_step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "state.pt", "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(final / COMPLETE_MARKER, "w") as fh:
        fh.write(f"{state['global_step']}\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(ckpt_dir)
    complete = sorted(list_checkpoints(ckpt_dir), key=lambda p: int(p.name.split("_")[1]))
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
            and p.name.split("_")[1].isdigit()]


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete, loadable checkpoint; incomplete or corrupt ones are skipped with a warning."""
    for path in sorted(list_checkpoints(ckpt_dir), key=lambda p: int(p.name.split("_")[1]), reverse=True):
        if not (path / COMPLETE_MARKER).exists():
            logger.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE_MARKER)
            continue
        try:
            return path, load_checkpoint_file(path)
        except Exception as err:  # a torn or corrupt file: fall back to an older one
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None


def load_checkpoint_file(path: Path) -> dict:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')} (expected {CHECKPOINT_VERSION})")
    return state


# ---------------------------------------------------------------------------------------------------------------
# Run state, notifier calls, signals
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """Everything the loop carries between steps that a checkpoint must restore."""
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    epoch_loss_sum: float = 0.0  # summed token losses of the current epoch so far (for its mean train loss)
    epoch_tokens: int = 0
    micro_split: int = 1  # each sampler batch runs as this many micro-batches (raised by CUDA OOM)
    history: list[dict] = field(default_factory=list)


class SafeNotifier:
    """Calls a notifier's methods so that one that raises or hangs never stops or slows training.

    Each call runs in a daemon thread and is waited on for at most ``timeout`` seconds.
    """

    def __init__(self, notifier: Any = None, timeout: float = 2.0):
        self.notifier, self.timeout, self.failures = notifier, timeout, 0

    def __call__(self, method: str, *args) -> None:
        fn = getattr(self.notifier, method, None) if self.notifier is not None else None
        if fn is None:
            return

        def target():
            try:
                fn(*args)
            except Exception as err:
                self.failures += 1
                logger.warning("notifier %s failed: %s", method, err)

        thread = threading.Thread(target=target, daemon=True, name=f"notify-{method}")
        thread.start()
        thread.join(self.timeout)


class StopFlag:
    """SIGINT/SIGTERM set the flag; the loop finishes its step, checkpoints and exits. A second Ctrl-C exits now."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received %s: finishing this step, saving a checkpoint, then exiting "
                       "(Ctrl-C again to exit at once)", signal.Signals(signum).name)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def add_switch(group, name: str, default: bool, help_text: str, off: str | None = None) -> None:
    """A boolean with an on and an off form: ``--<name>`` / ``--<off>`` (default ``--no_<name>``)."""
    off = off or f"no_{name}"
    group.add_argument(f"--{name}", dest=name, action="store_true", help=f"{help_text} (default {'on' if default else 'off'})")
    group.add_argument(f"--{off}", dest=name, action="store_false", help=f"turn --{name} off")
    group.set_defaults(**{name: default})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_enhanced.py", description="Fine-tune GPT-2 for domain Q&A "
                                "(see documentation/HYPERPARAMETERS.md).")
    g = p.add_argument_group("run")
    g.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="preset values (DESIGN.md); explicit flags override them")
    g.add_argument("--model_name", type=str, default="gpt2",
                   help="gpt2, gpt2-medium, a local model folder, or theta-tiny (offline)")
    g.add_argument("--data_path", type=Path, default=PROJECT_ROOT / "Datasets" / "enhanced_training_data.json",
                   help="prepared data file from prepare_data_for_training.py")
    g.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets",
                   help="raw data folder (theta-tiny trains its tokenizer on it)")
    g.add_argument("--output_dir", type=Path, default=None,
                   help="run folder (default: models/theta_enhanced_<YYYYMMDD_HHMMSS>)")
    g.add_argument("--log_file", type=Path, default=None, help="extra log file (train.log is always written)")
    add_switch(g, "color", True, "colour on a terminal", off="no_color")
    add_switch(g, "progress_bar", True, "a tqdm bar on a terminal (never in log files)")
    g.add_argument("--log_every_steps", type=int, default=10, help="console step line every N steps "
                   "(metrics.jsonl and tensorboard get every step)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, order and dropout")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--num_workers", type=int, default=0, help="data loader worker processes")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=3, help="training epochs")
    o.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    o.add_argument("--batch_size", type=int, default=4, help="micro-batch size per device")
    o.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--learning_rate", type=float, default=5e-5, help="peak learning rate")
    o.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    o.add_argument("--warmup_proportion", type=float, default=0.1, help="share of steps spent warming up")
    o.add_argument("--scheduler_type", choices=["linear", "cosine", "cosine_hard_restarts"], default="cosine",
                   help="learning-rate schedule after warmup")
    o.add_argument("--num_cycles", type=int, default=1, help="restarts of cosine_hard_restarts")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 = off)")
    o.add_argument("--max_length", type=int, default=512, help="longest sequence in tokens (longer are cut)")
    o.add_argument("--loss_on", choices=["answer", "all"], default="answer",
                   help="loss on the answer and EOS only, or on the whole text")
    o.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="auto: fp32 on CPU, bf16 (else fp16) on CUDA")
    add_switch(o, "gradient_checkpointing", False, "recompute activations in backward to save memory")
    o.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop after this many non-finite steps in a row")
    e = p.add_argument_group("validation and early stopping")
    e.add_argument("--eval_every_steps", type=int, default=0, help="also validate every N steps (0 = per epoch)")
    e.add_argument("--patience", type=int, default=3, help="epochs without improvement before stopping")
    e.add_argument("--min_delta", type=float, default=0.0, help="smallest validation-loss drop that counts")
    e.add_argument("--num_samples", type=int, default=2, help="generated validation samples per epoch")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save_every_steps", type=int, default=0, help="checkpoint every N steps (0 = per epoch)")
    c.add_argument("--keep_last_n_checkpoints", type=int, default=2, help="checkpoints kept")
    add_switch(c, "keep_best_only", False, "delete step checkpoints once training completes "
               "(theta_best/ and theta_final/ stay)")
    o.add_argument("--min_micro_batch", type=int, default=1,
                   help="CUDA out of memory halves the micro-batch (same effective batch) down to this size")
    c.add_argument("--resume", type=str, default="auto",
                   help="auto (newest complete checkpoint in --output_dir), never, or a checkpoint folder")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; a profile's values become defaults that explicit flags override."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.profile:
        parser.set_defaults(**PROFILES[pre.profile])
    args = parser.parse_args(argv)
    checks = [
        (args.epochs < 1, "--epochs must be at least 1"),
        (args.batch_size < 1, "--batch_size must be at least 1"),
        (args.gradient_accumulation_steps < 1, "--gradient_accumulation_steps must be at least 1"),
        (not args.learning_rate > 0, "--learning_rate must be > 0"),
        (args.weight_decay < 0, "--weight_decay must be >= 0"),
        (not 0 <= args.warmup_proportion < 1, "--warmup_proportion must be in [0, 1)"),
        (args.num_cycles < 1, "--num_cycles must be at least 1"),
        (args.max_grad_norm < 0, "--max_grad_norm must be >= 0"),
        (args.max_length < 8, "--max_length must be at least 8"),
        (args.max_steps < 0, "--max_steps must be >= 0"),
        (args.patience < 1, "--patience must be at least 1"),
        (args.min_delta < 0, "--min_delta must be >= 0"),
        (args.eval_every_steps < 0, "--eval_every_steps must be >= 0"),
        (args.save_every_steps < 0, "--save_every_steps must be >= 0"),
        (args.keep_last_n_checkpoints < 1, "--keep_last_n_checkpoints must be at least 1"),
        (args.num_workers < 0, "--num_workers must be >= 0"),
        (args.num_samples < 0, "--num_samples must be >= 0"),
        (args.max_nonfinite_steps < 1, "--max_nonfinite_steps must be at least 1"),
        (args.log_every_steps < 1, "--log_every_steps must be at least 1"),
        (args.min_micro_batch < 1, "--min_micro_batch must be at least 1"),
    ]
    for bad, message in checks:
        if bad:
            parser.error(message)
    if args.resume not in ("auto", "never") and not Path(args.resume).is_dir():
        parser.error(f"--resume {args.resume}: not auto, never, or an existing checkpoint folder")
    if args.output_dir is None:
        args.output_dir = PROJECT_ROOT / "models" / new_run_id()
    return args


# ---------------------------------------------------------------------------------------------------------------
# train(args)
# ---------------------------------------------------------------------------------------------------------------

def _color(text: str, color: str, enabled: bool) -> str:
    if not enabled:
        return text
    from colorama import Fore, Style
    return f"{getattr(Fore, color)}{text}{Style.RESET_ALL}"


def _arrow(new: float, old: float | None) -> str:
    if old is None:
        return ""
    return "↓" if new < old else ("↑" if new > old else "=")


def _json_args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


def _environment(device: torch.device, precision: str, world: int) -> dict:
    import transformers
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "precision": precision, "world_size": world}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun: DDP with NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return rank, world, device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is available; use --device cpu")
    return 0, 1, device


def _model_summary_lines(args, tm, train_ds, val_ds, effective, world, device, precision, steps_per_epoch,
                         total_steps) -> list[str]:
    model, tokenizer = tm.model, tm.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"model {args.model_name}: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
        f"context {model.config.n_positions}",
        f"device {device}, precision {precision.name}, world size {world}"
        + (", gradient checkpointing" if args.gradient_checkpointing else ""),
        f"examples: {len(train_ds)} train, {len(val_ds)} validation ({train_ds.truncated + val_ds.truncated} "
        f"truncated to {args.max_length} tokens, {train_ds.skipped + val_ds.skipped} skipped); "
        f"{train_ds.target_tokens()} target tokens per epoch",
        f"batch {args.batch_size} x accumulation {args.gradient_accumulation_steps} x {world} process(es) = "
        f"effective batch {effective}; {steps_per_epoch} steps per epoch, {total_steps} steps in all",
        f"optimizer AdamW lr {args.learning_rate:.2e} (weight decay {args.weight_decay:g}, not on biases/norms), "
        f"{args.scheduler_type} schedule, warmup {100 * args.warmup_proportion:.0f}%, clip {args.max_grad_norm:g}; "
        f"loss on {args.loss_on}",
    ]
    for ex in train_ds.examples[:2]:
        shown = "".join(tokenizer.decode([tid]) if lab == IGNORE_INDEX else f"[{tokenizer.decode([tid])}]"
                        for tid, lab in zip(ex["input_ids"], ex["labels"]))
        lines.append("sample (loss on [bracketed] tokens): " + shown[:400].replace("\n", "\\n"))
    return lines


def _split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Cut a padded batch into ``parts`` smaller ones along the batch dimension (for CUDA OOM recovery)."""
    if parts <= 1:
        return [batch]
    chunks = {k: torch.tensor_split(v, parts) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(parts) if chunks["input_ids"][i].shape[0] > 0]


def train(args: argparse.Namespace, notifier: Any = None) -> dict:
    """Run training as ``args`` says; returns the summary dict (also in ``training_config.json``)."""
    from torch.utils.data import DataLoader
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    rank, world, device = _setup_distributed(args)
    is_main = rank == 0
    out = Path(args.output_dir)
    tty = sys.stdout.isatty()
    color = args.color and tty
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        setup_logging(out / "train.log")
        if args.log_file:
            extra = logging.FileHandler(args.log_file, encoding="utf-8")
            extra.setFormatter(logging.getLogger().handlers[-1].formatter)
            logging.getLogger().addHandler(extra)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == "cuda":
        # Fewer fragmentation OOMs on 12 GB cards (the RTX 3060 notes); read at the first CUDA allocation.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    notify = SafeNotifier(notifier if is_main else None)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # --- data and model -----------------------------------------------------------------------------------
    records = load_prepared_records(Path(args.data_path))
    train_recs = [r for r in records if r.get("split", "train") == "train"]
    val_recs = [r for r in records if r.get("split") == "validation"]
    if not train_recs:
        raise UserError(f"--data_path {args.data_path} has no training records")
    if not val_recs:
        raise UserError(f"--data_path {args.data_path} has no validation records; prepare with "
                        "--validation_fraction > 0")
    tm = ThetaModel(args.model_name, device=device, datasets_dir=args.datasets_dir)
    model, tokenizer = tm.model, tm.tokenizer
    if args.max_length > model.config.n_positions:
        raise UserError(f"--max_length {args.max_length} exceeds the model's context of "
                        f"{model.config.n_positions} tokens")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    precision = resolve_precision(args.precision, device)
    domain_names = sorted({r.get("domain", "unknown") for r in records})
    train_ds = TokenizedDataset(train_recs, tokenizer, args.max_length, args.loss_on)
    val_ds = TokenizedDataset(val_recs, tokenizer, args.max_length, args.loss_on)
    for ds in (train_ds, val_ds):  # one domain index space for both splits
        remap = {i: domain_names.index(n) for i, n in enumerate(ds.domain_names)}
        for ex in ds.examples:
            ex["domain"] = remap[ex["domain"]]
    pad_id = tokenizer.pad_token_id
    collate_fn = functools.partial(collate, pad_id=pad_id)
    sampler = EpochSampler(len(train_ds), args.batch_size, args.seed, shuffle=True, rank=rank, world=world)
    val_sampler = EpochSampler(len(val_ds), args.batch_size, args.seed, shuffle=False, rank=rank, world=world)
    val_batches = [collate_fn([val_ds[i] for i in b]) for b in val_sampler.batches()]
    steps_per_epoch = math.ceil(len(sampler) / args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, args, device)
    scheduler = build_scheduler(optimizer, args, total_steps)
    state = RunState()

    # --- resume -------------------------------------------------------------------------------------------
    ckpt_dir = out / "checkpoints"
    found = None
    if args.resume == "auto":
        found = find_resume_checkpoint(ckpt_dir)
    elif args.resume != "never":
        try:
            found = (Path(args.resume), load_checkpoint_file(Path(args.resume)))
        except Exception as err:
            raise UserError(f"--resume {args.resume}: not a loadable checkpoint ({err})") from err
    if found:
        path, ckpt = found
        now = _json_args(args)
        for key, old in sorted(ckpt["args"].items()):
            if key not in ("resume", "output_dir", "log_file") and now.get(key) != old:
                logger.warning("resume: --%s was %r in the checkpoint, now %r; the new value wins", key, old,
                               now.get(key))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if precision.scaler is not None and ckpt.get("scaler"):
            precision.scaler.load_state_dict(ckpt["scaler"])
        state = RunState(**ckpt["run_state"])
        set_rng_state(ckpt["rng"])
        logger.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", path, state.global_step,
                    state.epoch + 1, state.batch_in_epoch)

    # --- run summary --------------------------------------------------------------------------------------
    effective = args.batch_size * args.gradient_accumulation_steps * world
    env = _environment(device, precision.name, world)
    if is_main:
        atomic_write_json(out / "training_config.json", {"args": _json_args(args), "environment": env,
                                                          "status": "running"})
        logger.info(_color("=" * 78, "CYAN", color))
        logger.info("Theta training run %s", out.name)
        for line in _model_summary_lines(args, tm, train_ds, val_ds, effective, world, device, precision,
                                         steps_per_epoch, total_steps):
            logger.info("%s", line)
        logger.info(_color("=" * 78, "CYAN", color))
    notify("start_training_notification", args)

    # purge_step: after a resume, drop events a crashed run wrote past its checkpoint (no overlapping curves)
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=state.global_step + 1 if state.global_step else None) \
        if is_main else None
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if is_main else None
    bar = tqdm(total=total_steps, initial=state.global_step, disable=not (is_main and tty and args.progress_bar),
               dynamic_ncols=True, leave=False)
    stop = StopFlag()
    stop.install()

    def checkpoint(reason: str) -> None:
        if not is_main:
            return
        payload = {"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(),
                   "scaler": precision.scaler.state_dict() if precision.scaler else None,
                   "run_state": dataclasses.asdict(state), "rng": rng_state(), "args": _json_args(args),
                   "sampler": sampler.state_dict(), "global_step": state.global_step}
        logger.info("checkpoint (%s): %s", reason, save_checkpoint(ckpt_dir, payload, args.keep_last_n_checkpoints))

    def validate() -> dict:
        metrics = evaluate(model, val_batches, device, precision.autocast, domain_names, world)
        if writer is not None:
            for key in ("loss", "perplexity", "token_accuracy"):
                writer.add_scalar(f"val/{key}", metrics[key], state.global_step)
            for name, d in metrics["domains"].items():
                writer.add_scalar(f"val/loss_{name}", d["loss"], state.global_step)
                writer.add_scalar(f"val/perplexity_{name}", d["perplexity"], state.global_step)
        return metrics

    def stop_requested() -> bool:
        """Every rank stops together: the flag is agreed with an all-reduce under DDP."""
        if world == 1:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def forward_backward(window: list[dict], n_targets: torch.Tensor) -> torch.Tensor:
        """Backward over the micro-batches of one optimizer step; returns their summed token loss."""
        step_loss = torch.zeros((), device=device)
        micro = [m for b in window for m in _split_batch(b, state.micro_split)]
        for k, batch in enumerate(micro):
            batch = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
            sync = nullcontext() if world == 1 or k == len(micro) - 1 else ddp_model.no_sync()
            with sync:
                with precision.autocast:
                    logits = ddp_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                tok_loss, _ = token_losses(logits, batch["labels"])
                # Sum over this micro-batch / target tokens of the whole accumulated (and, under DDP, global)
                # batch, x world as DDP averages gradients over ranks: the step's gradient is that of the mean
                # over every target token of the step, however the tokens are split into micro-batches.
                loss = tok_loss.sum() * world / n_targets
                (precision.scaler.scale(loss) if precision.scaler is not None else loss).backward()
            step_loss += tok_loss.detach().sum()
        return step_loss

    # --- the loop -----------------------------------------------------------------------------------------
    exit_code, status, started = 0, "completed", time.time()
    accum = args.gradient_accumulation_steps
    tokens_since_log, t_log = 0, time.perf_counter()
    model.train()
    try:
        while state.epoch < args.epochs and not (args.max_steps and state.global_step >= args.max_steps):
            epoch_start = time.time()
            sampler.set_epoch(state.epoch, state.batch_in_epoch)
            batches = sampler.batches()
            loader = iter(DataLoader(train_ds, batch_sampler=batches[state.batch_in_epoch:], collate_fn=collate_fn,
                                     num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                     # its own generator: creating the iterator must not draw from the global RNG,
                                     # or a resumed run's dropout masks would drift from an uninterrupted run's
                                     generator=torch.Generator().manual_seed(args.seed + state.epoch)))
            while state.batch_in_epoch < len(batches):
                # ---- one optimizer step over up to `accum` micro-batches --------------------------------------
                window = [next(loader) for _ in range(min(accum, len(batches) - state.batch_in_epoch))]
                n_targets = torch.tensor(float(sum(count_target_tokens(b["labels"]) for b in window)))
                if world > 1:  # normalise by the target tokens of the global batch
                    torch.distributed.all_reduce(n_targets)
                n_targets = n_targets.to(device)
                while True:
                    try:
                        step_loss = forward_backward(window, n_targets)
                        break
                    except torch.cuda.OutOfMemoryError:
                        optimizer.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        if args.batch_size // (state.micro_split * 2) < args.min_micro_batch:
                            raise
                        state.micro_split *= 2
                        logger.warning("CUDA out of memory: micro-batch now %d x %d accumulation (same effective "
                                       "batch)", math.ceil(args.batch_size / state.micro_split),
                                       accum * state.micro_split)
                if precision.scaler is not None:
                    precision.scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(step_loss))
                if finite:
                    if precision.scaler is not None:
                        precision.scaler.step(optimizer)
                    else:
                        optimizer.step()
                    state.nonfinite_in_row = 0
                else:
                    state.nonfinite_total += 1
                    state.nonfinite_in_row += 1
                    logger.warning("step %d: non-finite loss or gradient norm, optimizer step skipped (%d in a row, "
                                   "%d in all)", state.global_step + 1, state.nonfinite_in_row, state.nonfinite_total)
                if precision.scaler is not None:
                    precision.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.global_step += 1
                state.batch_in_epoch += len(window)
                if state.nonfinite_in_row >= args.max_nonfinite_steps:
                    exit_code, status = EXIT_NONFINITE, "failed: non-finite"
                    raise FloatingPointError(
                        f"{state.nonfinite_in_row} non-finite steps in a row (--max_nonfinite_steps "
                        f"{args.max_nonfinite_steps}); the last good checkpoint is kept in {ckpt_dir}. Lower "
                        "--learning_rate or use --precision fp32.")
                # ---- logging: the step's only host syncs ----------------------------------------------------
                step_targets = float(n_targets) / world
                mean_loss = float(step_loss) / max(step_targets, 1.0)
                if finite:
                    state.epoch_loss_sum += float(step_loss)
                    state.epoch_tokens += int(step_targets)
                tokens_since_log += sum(int(b["attention_mask"].sum()) for b in window)
                if is_main:
                    lr = optimizer.param_groups[0]["lr"]
                    dt = time.perf_counter() - t_log
                    tps = tokens_since_log * world / dt if dt > 0 else 0.0
                    tokens_since_log, t_log = 0, time.perf_counter()
                    line = {"step": state.global_step, "epoch": state.epoch + 1, "loss": mean_loss, "lr": lr,
                            "grad_norm": float(grad_norm), "tokens_per_sec": tps, "ms": dt * 1000,
                            "skipped": not finite}
                    metrics_file.write(json.dumps(line) + "\n")
                    metrics_file.flush()
                    for key in ("loss", "lr", "grad_norm", "tokens_per_sec"):
                        writer.add_scalar(f"train/{key}", line[key], state.global_step)
                    if device.type == "cuda":
                        writer.add_scalar("system/gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30,
                                          state.global_step)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:.0f}", refresh=False)
                    bar.update(1)
                    if state.global_step % args.log_every_steps == 0 or state.global_step == 1:
                        msg = (f"step {state.global_step:5d}/{total_steps} | epoch {state.epoch + 1} | loss "
                               f"{mean_loss:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} | {tps:.0f} tok/s | "
                               f"{dt * 1000:.0f} ms")
                        bar.write(msg) if not bar.disable else logger.info("%s", msg)
                if args.eval_every_steps and state.global_step % args.eval_every_steps == 0:
                    m = validate()
                    logger.info("step %d validation: loss %.4f, perplexity %.2f, token accuracy %.3f",
                                state.global_step, m["loss"], m["perplexity"], m["token_accuracy"])
                if args.save_every_steps and state.global_step % args.save_every_steps == 0:
                    checkpoint(f"every {args.save_every_steps} steps")
                if stop_requested():
                    checkpoint("interrupted")
                    exit_code, status = EXIT_INTERRUPTED, "interrupted"
                    raise KeyboardInterrupt
                if args.max_steps and state.global_step >= args.max_steps:
                    break
            if state.batch_in_epoch < len(batches):  # --max_steps ended the run mid-epoch
                break
            _end_of_epoch(args, state, validate, tm, val_ds, writer, notify, out, color, is_main, epoch_start,
                          optimizer.param_groups[0]["lr"])
            checkpoint(f"end of epoch {state.epoch}")
            if state.bad_epochs >= args.patience:
                logger.info("early stopping: no improvement larger than %g for %d epoch(s)", args.min_delta,
                            args.patience)
                break
    except KeyboardInterrupt:
        if exit_code == 0:
            exit_code, status = EXIT_INTERRUPTED, "interrupted"
        logger.warning("training stopped at step %d; run the same command again to resume", state.global_step)
    except FloatingPointError as err:
        logger.error("%s", err)
        notify("training_failed", str(err))
    finally:
        stop.restore()
        bar.close()
        if writer is not None:
            writer.close()
        if metrics_file is not None:
            metrics_file.close()

    summary = {"run": out.name, "status": status, "global_step": state.global_step, "epochs_run": state.epoch,
               "best_epoch": state.best_epoch, "best_val_loss": state.best_val_loss,
               "nonfinite_steps": state.nonfinite_total, "seconds": time.time() - started,
               "final_model": str(out / "theta_final"), "exit_code": exit_code}
    if exit_code == 0:
        if state.best_epoch < 0:  # --max_steps ended before any validation: validate now
            m = validate()
            state.best_val_loss, state.best_epoch = m["loss"], state.epoch
            if is_main:
                tm.save(out / "theta_best")
            summary.update(best_epoch=state.best_epoch, best_val_loss=state.best_val_loss)
        if is_main:
            tmp = out / ".theta_final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / "theta_best", tmp)
            shutil.rmtree(out / "theta_final", ignore_errors=True)
            os.replace(tmp, out / "theta_final")
            if args.keep_best_only:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            logger.info(_color(f"done: theta_final/ is the best model, from epoch {state.best_epoch} "
                               f"(validation loss {state.best_val_loss:.4f})", "GREEN", color))
        notify("training_completed", summary)
    if is_main:
        atomic_write_json(out / "training_config.json", {"args": _json_args(args), "environment": env,
                                                          "status": status, "summary": summary})
    if world > 1:
        torch.distributed.barrier()
    return summary


def _end_of_epoch(args, state: RunState, validate, tm: ThetaModel, val_ds, writer, notify, out: Path, color: bool,
                  is_main: bool, epoch_start: float, lr: float) -> None:
    """Validate, log, keep the best model, update early stopping and the history; advances ``state.epoch``."""
    m = validate()
    prev = state.history[-1] if state.history else None
    train_loss = state.epoch_loss_sum / state.epoch_tokens if state.epoch_tokens else float("nan")
    entry = {"epoch": state.epoch + 1, "step": state.global_step, "train_loss": train_loss,
             "val_loss": m["loss"], "val_perplexity": m["perplexity"], "val_token_accuracy": m["token_accuracy"],
             "domains": {d: {k: v[k] for k in ("loss", "perplexity", "token_accuracy")}
                         for d, v in m["domains"].items()},
             "learning_rate": lr, "seconds": time.time() - epoch_start}
    state.history.append(entry)
    improved = m["loss"] < state.best_val_loss - args.min_delta
    if is_main:
        header = _color(f"epoch {state.epoch + 1}/{args.epochs}", "YELLOW", color)
        logger.info("%s | train loss %.4f | val loss %.4f %s | perplexity %.2f | token accuracy %.3f %s", header,
                    train_loss, m["loss"], _arrow(m["loss"], prev and prev["val_loss"]), m["perplexity"],
                    m["token_accuracy"], _arrow(m["token_accuracy"], prev and prev["val_token_accuracy"]))
        for d, v in sorted(m["domains"].items()):
            logger.info("    %-22s loss %.4f  perplexity %8.2f  token accuracy %.3f", d, v["loss"], v["perplexity"],
                        v["token_accuracy"])
        writer.add_scalar("epoch/train_loss", train_loss, state.epoch + 1)
        writer.add_scalar("epoch/val_loss", m["loss"], state.epoch + 1)
        for ex in val_ds.examples[:args.num_samples]:
            answer = tm.generate(ex["question"], max_length=48, temperature=0.0)  # greedy: uses no RNG
            logger.info("    sample Q: %s\n    sample A: %s", ex["question"][:120], answer[:300])
            writer.add_text("samples", f"**Q:** {ex['question']}\n\n**A:** {answer}", state.global_step)
    if improved:
        state.best_val_loss, state.best_epoch, state.bad_epochs = m["loss"], state.epoch + 1, 0
        if is_main:
            tm.save(out / "theta_best", extra_files={"theta_run.json": {
                "epoch": state.epoch + 1, "step": state.global_step, "val_loss": m["loss"]}})
            logger.info(_color(f"new best validation loss {m['loss']:.4f}: saved theta_best/", "GREEN", color))
    else:
        state.bad_epochs += 1
    notify("epoch_update", state.epoch + 1, entry)
    state.epoch += 1
    state.batch_in_epoch = 0
    state.epoch_loss_sum, state.epoch_tokens = 0.0, 0
    if is_main:
        atomic_write_json(out / "loss_history.json", state.history)


def _create_notifier(args: argparse.Namespace):
    """The email notifier when email is configured (src/training/email_integration.py), else None."""
    try:
        from src.training.email_integration import create_notifier
    except ImportError:
        return None
    try:
        return create_notifier(Path(args.output_dir), args)
    except Exception as err:  # notifications must never stop training
        logger.warning("email notifications off: %s", err)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notifier = _create_notifier(args) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        summary = train(args, notifier)
    finally:
        close = getattr(notifier, "close", None)
        if callable(close):
            close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
