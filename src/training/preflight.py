"""Pre-flight: check in seconds, before the night, what would kill the run during it. No training.

    python -m src.training.preflight --profile quick                       # everything, on this machine
    python -m src.training.preflight --profile rtx3060 -- --batch_size 4    # trainer flags after --
    python -m src.training.preflight --profile rtx3060 --simulate_gpu_memory_gb 12   # would it fit a 12 GB card?
    ./train_overnight_enhanced.sh --preflight                              # the same from the script, + test email

Checks, in order (each prints one line: ok, warn, skip or FATAL with the fix):
  flags     the trainer flags parse (train_enhanced.parse_args), --max_length fits the model's context;
  model     the model loads (a hub model from the cache or a download; offline: how to get it);
  tokens    the end-of-text token is a trained target (it ends every answer's labels) and pad != end-of-text;
  disk      free space where the run folder goes against what the run writes: checkpoints kept (+1 being
            written; each holds the fp32 weights, the AdamW moments and the EMA copy) and three model folders;
  adapters  with --simulate_gpu_memory_gb (and with --peft lora|qlora on CUDA, whose probe would train the whole
            model): the memory model's largest micro-batch for each --peft mode (a 16-bit or 4-bit frozen base,
            the adapters and their AdamW state, the activations) and the mode to use; the disk check counts
            adapter-sized checkpoints;
  memory    CUDA only: one forward+backward+AdamW step of the profile's micro-batch at its longest sequence, through
            the trainer's loss (lm_loss.step_losses); when it does not fit, the largest micro-batch that does and
            the flags to use (same effective batch);
  datasets  what in Datasets/ would surprise the user (loading.survey_datasets, with preparation's readers): a
            file that cannot be read or breaks off, a file from which nothing is kept, more than a few percent of
            a file's records dropped, a file no reader takes; each a warning naming the file and the fix, fatal
            with --strict; an empty Datasets/ (no sample to fall back on) is fatal;
  data      records of the prepared file with no target token left after truncation (the trainer skips them),
            and the share of answers cut by --max_length;
  setup     the trainer's own set-up (start_run, load_data, setup_run) in a scratch folder: what would stop the
            run at its start (no validation records, a domain mix naming absent domains, ...) stops it now;
  duration  the whole run's training time from that set-up: the sampler's planned steps of every epoch (the
            curriculum's smaller pools included), a few timed optimizer steps of the real recipe (model, techniques,
            optimizer; each after an untimed one of the same shape) fitted as seconds = a + b x padded tokens, a
            timed share of the validation batches, and one timed generation check and sample generation per epoch;
  email     the configuration (and with --email_test a test message, as ``--preflight`` alone sends).
Fatal problems exit 2 (a user error: the overnight scripts stop before any step and never resume that run);
warnings go into the banner and the start email through ``<run_dir>/preflight.json``.

The set-up and the timed steps leave nothing in the run folder (a temporary folder, removed after), and the global
random state is put back afterwards (the pre-flight runs in its own process anyway). Not counted: checkpoint and
model writes, torch.compile's speed-up (the timed steps run eager) and the data loader's workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.training.checkpointing import rng_state, set_rng_state
from src.utils.common import FlagParser, EXIT_USER_ERROR, PROJECT_ROOT, UserError, atomic_write_json
from src.utils.profiles import PROFILE_NAMES

logger = logging.getLogger(__name__)

PREFLIGHT_FILE = "preflight.json"
TRUNCATION_WARN_SHARE = 0.10   # more answers cut than this: a warning naming --max_length
DISK_MARGIN = 1.2              # want 20% more free space than the estimate
TIMED_STEPS = 5                # the shortest, quartiles and longest steps of a plan, each after an untimed twin
TIMING_BUDGET_S = 20.0         # stop timing early on slow set-ups (gpt2-medium on a CPU)
VALIDATION_SHARE_BATCHES = 16  # validation batches timed (spread over the lengths), the rest by their tokens
GB = 1024 ** 3
MB = 1024 ** 2


@dataclass
class Check:
    """One line of the report: ``level`` is ok, warn, skip or fatal; ``fix`` says what to do about a problem."""
    name: str
    level: str
    message: str
    fix: str = ""

    def line(self) -> str:
        tag = {"ok": "ok   ", "warn": "warn ", "skip": "skip ", "fatal": "FATAL"}[self.level]
        return f"  {tag} {self.name:<9} {self.message}" + (f"\n        fix: {self.fix}" if self.fix else "")


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    estimate: str = ""
    plan: dict = field(default_factory=dict)  # the duration's figures: planned steps, seconds by part

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(check.line(), flush=True)
        return check

    @property
    def fatal(self) -> list[str]:
        return [f"{c.name}: {c.message}" + (f" Fix: {c.fix}" if c.fix else "") for c in self.checks
                if c.level == "fatal"]

    @property
    def warnings(self) -> list[str]:
        return [f"{c.name}: {c.message}" + (f" ({c.fix})" if c.fix else "") for c in self.checks if c.level == "warn"]

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 2), "fatal": self.fatal, "warnings": self.warnings,
                "estimate": self.estimate, "plan": self.plan, "checks": [asdict(c) for c in self.checks]}


def human_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.0f} MB"


def human_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------------------------
# Disk
# ---------------------------------------------------------------------------------------------------------------

def expected_run_bytes(n_params: int, keep_checkpoints: int, use_ema: bool, offload_fraction: float = 0.0,
                       trainable: int | None = None) -> dict[str, int | str]:
    """What a run holds on disk at its peak, and when (fp32 everywhere, the trainer's formats).

    ``n_params`` counts every weight once (a tied head shares the embedding; ``ModelShape.parameters`` from the
    config, or the loaded model's count); ``trainable`` those the optimizer trains (default: all of them; adapters
    on a frozen base: the adapters). A checkpoint holds the trainable weights (4 B/parameter), AdamW's two moments
    (8 B), the EMA shadow (4 B when on) and CPU offload's fp32 masters (4 B x the offloaded fraction). A model
    folder (theta_best/, theta_final/, theta_inference/: the whole model) is at most 4 B/parameter. Every save
    writes the new copy beside the old one and removes the old one only afterwards (atomic_dir), and the saves
    come one after another, so the peak is the larger of:
    - a checkpoint being written: ``keep_checkpoints + 1`` checkpoints, and theta_best/;
    - the end: ``keep_checkpoints`` checkpoints, theta_best/, theta_final/, theta_inference/ and a new copy of one
      of them being written (a rerun replaces them).
    """
    trainable = n_params if trainable is None else trainable
    per_checkpoint = int(trainable * (4 + 8 + (4 if use_ema else 0) + 4 * offload_fraction))
    model = 4 * n_params
    phases = {"while a checkpoint is written": (keep_checkpoints + 1) * per_checkpoint + model,
              "at the end, with the three model folders": keep_checkpoints * per_checkpoint + 4 * model}
    phase = max(phases, key=phases.get)
    return {"per_checkpoint": per_checkpoint, "model": model, "peak": phases[phase], "phase": phase}


def check_disk(run_dir: Path, n_params: int, targs: argparse.Namespace, trainable: int | None = None) -> Check:
    need = expected_run_bytes(n_params, targs.keep_last_n_checkpoints, targs.use_ema,
                              targs.cpu_offload_fraction if getattr(targs, "use_cpu_offload", False) else 0.0,
                              trainable)
    where = Path(run_dir)
    # a resumed run's checkpoints and models are already part of its peak
    already = sum(f.stat().st_size for f in where.rglob("*") if f.is_file()) if where.is_dir() else 0
    total = max(need["peak"] - already, 0)
    while not where.exists() and where != where.parent:  # the folder may not exist yet: ask its filesystem
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = (f"{human_bytes(free)} free in {where}; the run needs about {human_bytes(total)} more at its peak "
              f"({need['phase']}: {human_bytes(need['peak'])} with {targs.keep_last_n_checkpoints} checkpoints kept "
              f"x {human_bytes(need['per_checkpoint'])} and model folders of {human_bytes(need['model'])}"
              + (f", {human_bytes(already)} of it already there" if already else "") + ")")
    if free < total:
        fix = "free some space there, or keep fewer checkpoints (--keep_last_n_checkpoints 1" + \
              (", --no_ema" if targs.use_ema else "") + "), or pass --output_dir on a larger disk"
        return Check("disk", "fatal", detail, fix)
    if free < total * DISK_MARGIN:
        return Check("disk", "warn", detail + ": little room to spare", "free some space before the night")
    return Check("disk", "ok", detail)


# ---------------------------------------------------------------------------------------------------------------
# Memory probe (CUDA) and its simulated stand-in
# ---------------------------------------------------------------------------------------------------------------

class ProbeOutOfMemory(Exception):
    """The probed micro-batch did not fit."""


def probe_step(model, batch: int, seq: int, device, autocast_ctx) -> None:
    """One forward+backward+AdamW step of ``batch`` random sequences of ``seq`` tokens, every token a target,
    through the trainer's loss (``lm_loss.step_losses``: the head at the target positions, no [B, T, V] logits)
    and a fused AdamW as the trainer builds it. The optimizer is thrown away afterwards."""
    import torch

    from src.training.lm_loss import step_losses
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-12, fused=device.type == "cuda")
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-12, foreach=True)
    model.train()
    with autocast_ctx:
        out = step_losses(model, {"input_ids": ids, "labels": ids}, torch.ones(batch, device=device))
    out["loss_sum"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CudaProbe:
    """One real forward+backward+AdamW step on the GPU (``probe_step``); returns the peak allocated bytes, or raises
    ProbeOutOfMemory. Cost: a few seconds."""

    def __init__(self, model, device, autocast_ctx):
        self.model, self.device, self.autocast = model, device, autocast_ctx
        import torch
        self.capacity = torch.cuda.get_device_properties(device).total_memory

    def __call__(self, batch: int, seq: int) -> int:
        import torch
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            probe_step(self.model, batch, seq, self.device, self.autocast)
            return torch.cuda.max_memory_allocated(self.device)
        except torch.cuda.OutOfMemoryError as err:
            raise ProbeOutOfMemory(str(err).splitlines()[0]) from None
        finally:
            self.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class ModelShape:
    """The sizes a decoder-only LM's memory and disk depend on, from its config, for every supported family.

    Generic config fields (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``vocab_size``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``tie_word_embeddings``; GPT2Config aliases the
    first ones to ``n_embd``/``n_layer``), plus what differs by family and is not a size: GPT-2's learned positions,
    biases and two-weight LayerNorms and its 2-matrix GELU MLP; the 3-matrix gated (SwiGLU) MLP and RMSNorm of the
    others; Qwen2's q/k/v biases; Qwen3's per-head q/k norms. :meth:`parameters` counts from these alone (tested
    against torch's count of the real model for every family), so a frozen base can be sized before it is loaded,
    or when it is stored in 4 bits.
    """
    model_type: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_head: bool
    positions: int = 0          # learned position embeddings (GPT-2); 0 with RoPE
    gated_mlp: bool = True      # gate, up and down projections (else GPT-2's fc and proj)
    layer_norm_bias: bool = False
    qkv_bias: bool = False      # biases on q, k, v (GPT-2, Qwen2, attention_bias)
    out_bias: bool = False      # on the attention output (GPT-2, attention_bias)
    mlp_bias: bool = False      # on the MLP projections (GPT-2, mlp_bias)
    qk_norm: bool = False       # RMSNorm over each head's q and k (Qwen3)
    residual_dropout: bool = False  # a dropout mask on each residual branch (GPT-2, Phi-3 with resid_pdrop > 0)

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        hidden, heads = config.hidden_size, config.num_attention_heads
        kind = config.model_type
        gpt2 = kind == "gpt2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(model_type=kind, hidden=hidden, layers=config.num_hidden_layers,
                   intermediate=(getattr(config, "n_inner", None) or 4 * hidden) if gpt2 else config.intermediate_size,
                   vocab=config.vocab_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads,
                   tied_head=bool(getattr(config, "tie_word_embeddings", True)),
                   positions=config.max_position_embeddings if gpt2 else 0, gated_mlp=not gpt2,
                   layer_norm_bias=gpt2, qkv_bias=gpt2 or kind == "qwen2" or attention_bias,
                   out_bias=gpt2 or attention_bias, mlp_bias=gpt2 or bool(getattr(config, "mlp_bias", False)),
                   qk_norm=kind == "qwen3",
                   residual_dropout=(getattr(config, "resid_pdrop", 0.0) or 0.0) > 0)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def parameters(self) -> int:
        """Every weight once (a tied head shares the token embedding)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        norm = h * (2 if self.layer_norm_bias else 1)
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.out_bias else 0)
        up = 2 if self.gated_mlp else 1  # gate and up, or fc
        mlp = (up + 1) * h * i + ((up * i + h) if self.mlp_bias else 0)
        layer = attention + mlp + 2 * norm + (2 * self.head_dim if self.qk_norm else 0)
        embeddings = (self.vocab + self.positions) * h
        return embeddings + self.layers * layer + norm + (0 if self.tied_head else self.vocab * h)

    def activation_bytes_per_token(self, checkpointing: bool = False) -> int:
        """Bytes kept for backward per token of the batch, 16-bit activations, attention through SDPA/flash (no
        [T, T] scores kept), after Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
        Transformer Models"; 34 x hidden per layer for GPT-2's shapes), with the projections' real widths:

        - the two norms' inputs: 2 x 2h;
        - attention: the q/k/v input 2h, q 2q, k and v 2 x 2kv (grouped-query attention keeps fewer), the
          output projection's input 2q; Qwen3's q/k norms keep their inputs too (2q + 2kv);
        - MLP: the input 2h, then GELU's input and output 2 x 2i (GPT-2) or gate, up, SiLU(gate) and their
          product 4 x 2i (gated);
        - a 1-byte dropout mask per residual branch, h each, when the model has residual dropout.
        Gradient checkpointing keeps each layer's input (2h) and recomputes one layer at a time.
        """
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        attention = 2 * h + 2 * q + 4 * kv + 2 * q + ((2 * q + 2 * kv) if self.qk_norm else 0)
        mlp = 2 * h + (8 if self.gated_mlp else 4) * i
        layer = 4 * h + attention + mlp + (2 * h if self.residual_dropout else 0)
        return (2 * h * self.layers + layer) if checkpointing else self.layers * layer


@dataclass(frozen=True)
class WeightMemory:
    """Bytes the weights and their training state hold whatever the batch: a trainable parameter 16 B (fp32
    weight, gradient, AdamW's two moments), a frozen one its storage size (4 B fp32, 2 B for a 16-bit base,
    about 0.5 B in 4-bit NF4): full fine-tuning is all trainable; adapters on a frozen base are a few trainable
    ones over many frozen."""
    trainable: int
    frozen: int = 0
    frozen_bytes_per_param: float = 4.0

    def bytes(self) -> int:
        return int(16 * self.trainable + self.frozen * self.frozen_bytes_per_param)


class SimulatedProbe:
    """A memory model instead of a GPU, for a CPU machine (``--simulate_gpu_memory_gb``) and for tests.

    Peak of one training step at ``batch`` x ``seq`` tokens, every token a target as in the real probe:
    the weights and optimizer state (:class:`WeightMemory`), the activations kept for backward
    (:meth:`ModelShape.activation_bytes_per_token`), and the trainer's head loss (src/training/lm_loss.py): the
    target rows' hidden states and their gradient (2 x 4 x hidden per token, fp32), the head's fp32 gradient held
    from forward to backward (4 x vocab x hidden, when the head trains) and one chunk of fp32 logits with its
    softmax gradient (2 x 4 x vocab x rows, rows = the targets up to ``default_chunk_rows``): never [B, T, V]
    logits.
    Sharp edge: a rough model, good to tell "fits easily" from "far too big"; the real probe decides on CUDA.
    """

    def __init__(self, capacity_bytes: float, shape: ModelShape, weights: WeightMemory | None = None,
                 checkpointing: bool = False, head_trainable: bool = True):
        from src.training.lm_loss import default_chunk_rows

        self.capacity = int(capacity_bytes)
        self.shape = shape
        self.weights = weights or WeightMemory(shape.parameters())
        self.chunk_rows = default_chunk_rows(shape.vocab)
        # the head's gradient buffer exists only when the head trains (a frozen head under adapters has none)
        self.base = self.weights.bytes() + (4 * shape.vocab * shape.hidden if head_trainable else 0)
        self.per_token = shape.activation_bytes_per_token(checkpointing) + 8 * shape.hidden

    @classmethod
    def for_model(cls, model, capacity_bytes: float, checkpointing: bool = False) -> "SimulatedProbe":
        """The probe of a loaded model: its config's shape, its trainable and frozen parameters as they are."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        return cls(capacity_bytes, ModelShape.from_config(model.config), WeightMemory(trainable, frozen),
                   checkpointing, head_trainable=model.get_output_embeddings().weight.requires_grad)

    def peak(self, batch: int, seq: int) -> int:
        tokens = batch * seq
        return self.base + tokens * self.per_token + 8 * self.shape.vocab * min(tokens, self.chunk_rows)

    def __call__(self, batch: int, seq: int) -> int:
        peak = self.peak(batch, seq)
        if peak > self.capacity:
            raise ProbeOutOfMemory(f"simulated: needs {human_bytes(peak)} of {human_bytes(self.capacity)}")
        return peak


# --- adapters (--peft lora|qlora; documentation/ADAPTERS.md) ---------------------------------------------------

NF4_BYTES = 0.5 + 0.127 / 8 + 0.5 / 64  # a 4-bit NF4 weight: 4 bits, double-quantised absmax (~0.127 bits) + slack


def decoder_linear_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer (what --lora_target all adapts)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    if not shape.gated_mlp:  # GPT-2: c_attn (fused q, k, v), attn c_proj, c_fc, mlp c_proj
        return [(h, q + 2 * kv), (q, h), (h, i), (i, h)]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def lora_parameters(shape: ModelShape, r: int) -> int:
    """LoRA's trainable count on every decoder-layer linear: r x (in + out) per layer (A is r x in, B out x r)."""
    return shape.layers * sum(r * (n_in + n_out) for n_in, n_out in decoder_linear_shapes(shape))


def adapter_weight_memory(shape: ModelShape, peft: str, r: int) -> WeightMemory:
    """Weights and optimizer state of a --peft mode: ``none`` trains everything (16 B each); ``lora`` trains the
    adapters over a frozen base kept in fp32 as the trainer loads it (4 B; autocast computes in bf16/fp16);
    ``qlora`` keeps the decoder-layer linears in NF4 (about 0.52 B) and the embeddings, head and norms in 16 bits."""
    total = shape.parameters()
    if peft == "none":
        return WeightMemory(total)
    adapters = lora_parameters(shape, r)
    if peft == "lora":
        return WeightMemory(adapters, total, 4.0)
    linear = shape.layers * sum(n_in * n_out for n_in, n_out in decoder_linear_shapes(shape))
    frozen_bytes = NF4_BYTES * linear + 2 * (total - linear)
    return WeightMemory(adapters, total, frozen_bytes / total)


def check_peft_modes(shape: ModelShape, targs: argparse.Namespace, capacity: float, seq: int,
                     where: str) -> Check:
    """The largest micro-batch each --peft mode fits at ``seq`` tokens on ``capacity`` bytes (the simulated
    memory model), and the mode to use: the asked one when it fits the asked micro-batch, else the first of
    none, lora, qlora that does (else the one that fits the largest micro-batch, with that micro-batch)."""
    factor = 2 if targs.use_rdrop and getattr(targs, "rdrop_doubled_batch", True) else 1
    r = getattr(targs, "lora_r", 16)
    fits = {}
    for mode in ("none", "lora", "qlora"):
        probe = SimulatedProbe(capacity, shape, adapter_weight_memory(shape, mode, r), targs.gradient_checkpointing,
                               head_trainable=mode == "none")
        fits[mode] = largest_fitting_batch(probe, seq, 4 * targs.batch_size * factor + 1) // factor
    text = ", ".join(f"{m} {fits[m]}" for m in fits)
    asked = getattr(targs, "peft", "none")
    detail = f"largest micro-batch at {seq} tokens on {where} by --peft mode: {text} (asked: --peft {asked}, " \
             f"micro-batch {targs.batch_size})"
    if fits[asked] >= targs.batch_size:
        return Check("adapters", "ok", detail)
    good = next((m for m in fits if fits[m] >= targs.batch_size), None)
    if good is not None:
        return Check("adapters", "warn", detail, f"--peft {good}")
    best = max(fits, key=fits.get)
    if fits[best] < 1:
        return Check("adapters", "warn", detail, "no mode fits one record: add --gradient_checkpointing or lower "
                                                 "--max_length")
    return Check("adapters", "warn", detail, f"--peft {best} --batch_size {fits[best]} (and raise "
                                             "--gradient_accumulation_steps to keep the effective batch)")


def largest_fitting_batch(probe: Callable[[int, int], int], seq: int, upper: int) -> int:
    """The largest micro-batch below ``upper`` that fits (0 when even one record does not): halve until one
    fits, then bisect between it and the smallest that failed."""
    bad, good = upper, 0
    b = upper // 2
    while b >= 1:
        try:
            probe(b, seq)
            good = b
            break
        except ProbeOutOfMemory:
            bad, b = b, b // 2
    if good == 0:
        return 0
    while bad - good > 1:
        mid = (good + bad) // 2
        try:
            probe(mid, seq)
            good = mid
        except ProbeOutOfMemory:
            bad = mid
    return good


def check_memory(probe, targs: argparse.Namespace, seq: int, device_name: str) -> Check:
    """Probe the profile's micro-batch at the longest sequence; name the flags when it does not fit."""
    # R-Drop's default forwards the doubled batch: that is what has to fit.
    factor = 2 if targs.use_rdrop and getattr(targs, "rdrop_doubled_batch", True) else 1
    batch = targs.batch_size
    try:
        peak = probe(batch * factor, seq)
        return Check("memory", "ok", f"micro-batch {batch}{' (x2 for R-Drop)' if factor == 2 else ''} at {seq} "
                                     f"tokens fits on {device_name}: peak {human_bytes(peak)} of "
                                     f"{human_bytes(probe.capacity)}")
    except ProbeOutOfMemory as err:
        problem = f"micro-batch {batch} at {seq} tokens does not fit on {device_name} ({err})"
    fit = largest_fitting_batch(probe, seq, batch * factor) // factor
    effective = batch * targs.gradient_accumulation_steps
    if fit >= 1:
        # Prefer a micro-batch that divides the effective batch (the same optimisation, only slower).
        use = next((b for b in range(fit, 0, -1) if effective % b == 0 and b * 2 > fit), fit)
        accum = math.ceil(effective / use)
        fix = (f"--batch_size {use} --gradient_accumulation_steps {accum} (the largest micro-batch that fits is "
               f"{fit}; effective batch {use * accum}, was {effective})")
    else:
        fix = (f"even one record of {seq} tokens does not fit: add --gradient_checkpointing, or lower "
               f"--max_length (e.g. {max(8, seq // 2)}), or use a smaller --model_name")
    return Check("memory", "fatal", problem, fix)


# ---------------------------------------------------------------------------------------------------------------
# Duration: the trainer's own set-up, plan and steps
# ---------------------------------------------------------------------------------------------------------------

def fit_step_time(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b)`` of seconds = a + b x tokens, by least squares over ``(tokens, seconds)`` points; both >= 0 (a
    negative intercept or too few distinct sizes fall back to seconds proportional to tokens)."""
    n = len(points)
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if n >= 2 and max(xs) > min(xs):
        mx, my = sum(xs) / n, sum(ys) / n
        b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        if a >= 0 and b >= 0:
            return a, b
        if b < 0:
            return my, 0.0
    return 0.0, (sum(ys) / sum(xs) if sum(xs) > 0 else 0.0)


def padded_tokens(batches: list[list[int]], lengths: list[int], packed: bool = False) -> int:
    """Tokens the model processes for these micro-batches: each padded to its longest record (``collate``), or,
    packed, the records' own tokens."""
    if packed:
        return sum(lengths[i] for b in batches for i in b)
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


def epochs_validated(steps_in_epoch: list[int], total_steps: int) -> int:
    """Epochs that end with a validation: every epoch that starts before --max_steps (the last one, cut short,
    validates in ``finish``)."""
    done, epochs = 0, 0
    for steps in steps_in_epoch:
        if done >= total_steps:
            break
        done, epochs = done + steps, epochs + 1
    return epochs


@contextlib.contextmanager
def scratch_run(targs: argparse.Namespace):
    """The run the trainer would build from ``targs``, built by its own ``start_run``, ``load_data`` and
    ``setup_run`` in a temporary folder (removed after), eager (no torch.compile), its log quiet; the global random
    state and the logging set-up are put back afterwards."""
    from src.training import train_enhanced as te
    root = logging.getLogger()
    handlers, level, rng = list(root.handlers), root.level, rng_state()
    run = None
    with tempfile.TemporaryDirectory(prefix="theta_preflight_") as tmp:
        args = argparse.Namespace(**{**vars(targs), "output_dir": Path(tmp) / "run", "resume": "never",
                                     "log_file": None, "progress_bar": False, "stop_after_step": 0, "compile": False})
        try:
            run = te.start_run(args)
            root.setLevel(logging.WARNING)  # the run summary and step lines are the trainer's to print, not ours
            te.load_data(run)
            te.setup_run(run)
            yield run
        finally:
            if run is not None and run.stop is not None:
                te.close_outputs(run)
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)
                handler.close()
            for handler in handlers:
                if handler not in root.handlers:
                    root.addHandler(handler)
            root.setLevel(level)
            set_rng_state(rng)


def time_steps(run, windows: list[list[list[int]]], lengths: list[int], budget_s: float) -> list[tuple[int, float]]:
    """``(padded tokens, seconds)`` of the recipe's ``optimizer_step`` on each window of record indices, until
    ``budget_s`` is spent. Each window runs twice and the second is timed: the first step at a new shape pays for
    its allocations (measured on the 2-core CPU, quick profile: 2.08 s, then 1.05 s at 1552 tokens), which a run
    pays once per shape, not per step."""
    import torch

    from src.training import train_enhanced as te

    def step(window):
        batch = [run.collate_fn([run.train_ds[i] for i in b]) for b in window]
        t0 = time.perf_counter()
        te.optimizer_step(run, batch)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        return time.perf_counter() - t0

    start, points = time.perf_counter(), []
    for window in windows:
        step(window)  # untimed: this shape's first step
        points.append((padded_tokens(window, lengths, bool(run.args.packing)), step(window)))
        if time.perf_counter() - start > budget_s:
            break
    return points


def estimate_run(run, gpus: int, budget_s: float = TIMING_BUDGET_S) -> dict:
    """The whole run's training time from its own set-up: the sampler's plan of every epoch for ``gpus`` processes
    (rank 0's micro-batches), timed optimizer steps of the recipe (a late epoch's, when every warm-up is over),
    a timed share of the validation batches, and one timed generation check and sample generation per epoch."""
    from src.training import train_enhanced as te
    from src.training.lm_data import evaluate

    args, accum = run.args, run.args.gradient_accumulation_steps
    lengths = [len(e["input_ids"]) for e in run.train_ds.examples]
    sampler = te.build_train_sampler(run, world=gpus)
    steps_in_epoch = te.planned_steps(sampler, args)
    total = min(sum(steps_in_epoch), args.max_steps or sum(steps_in_epoch))
    tokens, left = [], total  # every planned step's padded tokens
    for epoch, steps in enumerate(steps_in_epoch):
        batches = sampler.shard(sampler.global_order(epoch))
        windows = [batches[k:k + accum] for k in range(0, len(batches), accum)][:max(0, left)]
        tokens += [padded_tokens(w, lengths, bool(args.packing)) for w in windows]
        left -= len(windows)
    # time a late epoch's steps (the EMA started, the tracker's weights in use): its plan, shortest to longest
    run.state.epoch = args.epochs - 1
    te.begin_epoch(run)
    plan = sorted((run.batches[k:k + accum] for k in range(0, len(run.batches), accum)),
                  key=lambda w: padded_tokens(w, lengths))
    picks = sorted({round(q * (len(plan) - 1)) for q in (0, 0.25, 0.5, 0.75, 1.0)})[:TIMED_STEPS]
    points = time_steps(run, [plan[i] for i in picks], lengths, budget_s)
    a, b = fit_step_time(points)
    train_s = a * len(tokens) + b * sum(tokens)
    # validation: a spread share of the batches timed, the rest by their tokens, once per validated epoch
    val_lengths = [len(e["input_ids"]) for e in run.val_ds.examples]
    rank0 = te.validation_batches(val_lengths, args.batch_size, 0, gpus)
    share = rank0[::max(1, len(rank0) // VALIDATION_SHARE_BATCHES)]
    t0 = time.perf_counter()
    with run.eval_weights():
        evaluate(run.model, [run.collate_fn([run.val_ds[i] for i in bt]) for bt in share], run.device,
                 run.precision.autocast, run.domain_names)
    val_s = time.perf_counter() - t0
    val_once = val_s * padded_tokens(rank0, val_lengths) / max(1, padded_tokens(share, val_lengths))
    validations = epochs_validated(steps_in_epoch, total) + (total // args.eval_every_steps if args.eval_every_steps
                                                             else 0)
    # what the end of an epoch generates: the domain check every --domain_eval_frequency epochs, the samples
    t0 = time.perf_counter()
    if args.domain_eval_frequency:
        te.GenerationCheck(args.domain_eval_per_domain).run(run.tm, run.val_recs)
    check_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.num_samples:
        run.tm.generate_batch([ex["question"] for ex in run.val_ds.examples[:args.num_samples]],
                              max_length=te.SAMPLE_TOKENS, temperature=0.0)
    samples_s = time.perf_counter() - t0
    epochs = epochs_validated(steps_in_epoch, total)
    generation_s = check_s * (epochs // args.domain_eval_frequency if args.domain_eval_frequency else 0) \
        + samples_s * epochs
    return {"planned_steps": total, "steps_in_epoch": steps_in_epoch, "timed_steps": len(points),
            "step_model": {"a_s": a, "b_s_per_token": b}, "points": points, "train_s": train_s,
            "validation_s": val_once * validations, "validations": validations, "generation_s": generation_s,
            "total_s": train_s + val_once * validations + generation_s}


# ---------------------------------------------------------------------------------------------------------------
# Tokens and data
# ---------------------------------------------------------------------------------------------------------------

def check_tokens(tokenizer, targs: argparse.Namespace, prompt_format=None) -> Check:
    """The trained end (EOS, or the chat format's end-of-turn token) must be a trained target (it ends each
    completion's labels) and pad must differ from EOS."""
    from src.training.lm_data import IGNORE_INDEX, TokenizedDataset
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    end = prompt_format.end_id if prompt_format is not None else eos
    probe = [{"id": "preflight", "question": "What is a test?", "answer": "A check.", "domain": "general"}]
    ds = TokenizedDataset(probe, tokenizer, max(targs.max_length, 64), targs.loss_on, prompt_format=prompt_format)
    targets = [x for x in ds[0]["labels"][1:] if x != IGNORE_INDEX] if len(ds) else []
    if end is None or not targets or targets[-1] != end:
        return Check("tokens", "fatal", f"the end-of-text token (id {end}) is not a trained target: the model "
                                        "would never learn to stop", "rebuild the model folder's tokenizer "
                                        "(python -m src.model.theta_model build-tiny) or use another --model_name")
    if pad is None or pad == eos:
        return Check("tokens", "fatal", f"the pad token (id {pad}) is the end-of-text token: padding would train "
                                        "or mask the stop signal", "load the model through ThetaModel, which adds "
                                        "a separate pad token")
    return Check("tokens", "ok", f"end-of-text {tokenizer.eos_token!r} (id {eos}) is a trained target; pad "
                                 f"{tokenizer.pad_token!r} (id {pad}) differs from it")


def check_datasets(datasets_dir: Path, strict: bool = False, include_sample: bool = False,
                   columns: str | None = None) -> tuple[list[Check], bool]:
    """The data folder as data preparation will read it: one line per problem of ``survey_datasets`` (the file,
    what is wrong, the fix), a warning, or fatal with ``strict`` (as ``prepare_data_for_training --strict``); an
    empty folder is fatal either way (the run would stop at its first step). Also whether there is no data at
    all."""
    from src.data_processing.loading import ColumnMap, survey_datasets
    from src.utils.data_layout import resolve_sources
    try:
        problems = survey_datasets(datasets_dir, include_sample, ColumnMap.parse(columns))
    except UserError as err:
        return [Check("datasets", "fatal", str(err), "correct --columns")], False
    folder = Path(datasets_dir).name
    checks = [Check("datasets", "fatal" if (p.fatal or strict) else "warn",
                    f"{folder}/{p.file}: {p.message}" if p.file else p.message,
                    p.fix + (" (--strict makes this fatal; without it the run goes on)" if strict and not p.fatal
                             else "")) for p in problems]
    if not problems:
        sources = resolve_sources(datasets_dir, include_sample)
        checks.append(Check("datasets", "ok", f"{len(sources.files)} data file{'s' * (len(sources.files) != 1)} "
                                              f"read as data preparation reads them: nothing to report"
                                              + (" (the shipped sample: no files of your own in "
                                                 f"{folder}/)" if sources.sample_only else "")))
    return checks, any(p.kind == "empty_datasets" for p in problems)


def check_data(records: list[dict], tokenizer, targs: argparse.Namespace,
               prompt_format=None) -> tuple[list[Check], dict]:
    """Records left without a target token after truncation, and the share of answers cut by --max_length."""
    from src.training.lm_data import TokenizedDataset
    ds = TokenizedDataset(records, tokenizer, targs.max_length, targs.loss_on, prompt_format=prompt_format)
    n = len(records)
    lengths = sorted(len(ex["input_ids"]) for ex in ds.examples)
    info = {"records": n, "no_target": ds.skipped, "truncated": ds.truncated,
            "n_train": sum(1 for r in records if r.get("split", "train") == "train"),
            "n_val": sum(1 for r in records if r.get("split", "train") != "train"),
            "longest": lengths[-1] if lengths else 0,
            "mean_length": sum(lengths) / len(lengths) if lengths else 0}
    checks = []
    share = ds.truncated / n if n else 0.0
    text = (f"{n} records: {ds.skipped} with no target token after truncation at {targs.max_length} tokens, "
            f"{ds.truncated} answers truncated ({100 * share:.1f}%)")
    if n == 0 or len(ds) == 0:
        checks.append(Check("data", "fatal", text + ": nothing to train on",
                            f"raise --max_length (now {targs.max_length}) or shorten the questions/contexts"))
    elif ds.skipped:
        checks.append(Check("data", "warn", text + f": the trainer skips those {ds.skipped}",
                            f"raise --max_length (now {targs.max_length}) or shorten their prompts"))
    elif share > TRUNCATION_WARN_SHARE:
        checks.append(Check("data", "warn", text, f"answers lose their ends: raise --max_length "
                                                  f"(now {targs.max_length}) if the model allows"))
    else:
        checks.append(Check("data", "ok", text))
    return checks, info


# ---------------------------------------------------------------------------------------------------------------
# The whole pre-flight
# ---------------------------------------------------------------------------------------------------------------

def trainer_args(opts: argparse.Namespace) -> tuple[argparse.Namespace | None, str]:
    """The trainer's resolved flags, as the overnight scripts will pass them, or None and argparse's message."""
    from src.training.train_enhanced import parse_args
    argv = ["--profile", opts.profile, "--data_path", str(opts.data_path)]
    if opts.run_dir:
        argv += ["--output_dir", str(opts.run_dir)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parse_args(argv + list(opts.trainer_flags)), ""
        except SystemExit:
            lines = err.getvalue().strip().splitlines()
            return None, (lines[-1].split("error: ", 1)[-1] if lines else "the trainer flags do not parse")


def _email_check(send_test: bool) -> Check:
    from src.utils.email_notifier import resolve_email_config, send_test_email
    config, level, message = resolve_email_config()
    if config is None:
        return Check("email", "warn" if level == "warning" else "ok", message,
                     "see documentation/EMAIL_NOTIFICATIONS.md" if level == "warning" else "")
    # Without TLS the password would cross the network in clear text: the notifier does not send it unless
    # EMAIL_ALLOW_PLAIN_AUTH=1, and either way the pre-flight says so (a server on this machine sees no network).
    plain = config.plain_auth_note()
    plain_fix = "set EMAIL_USE_TLS=1 (port 587) or EMAIL_USE_SSL=1 (port 465)" + (
        "" if config.allow_plain_auth else "; EMAIL_ALLOW_PLAIN_AUTH=1 sends the password unencrypted")
    if not send_test:
        if plain and not config.loopback:
            return Check("email", "warn", f"{config.describe()}: {plain}", plain_fix)
        return Check("email", "ok", f"{config.describe()} (test message: --preflight)")
    ok, problem = send_test_email(config)
    if ok:
        if plain and not config.loopback:
            return Check("email", "warn", f"test message sent to {', '.join(config.recipients)}, without TLS: "
                                          f"{plain}", plain_fix)
        return Check("email", "ok", f"test message sent to {', '.join(config.recipients)}")
    return Check("email", "warn", f"the test message failed ({problem})", "the run goes on without email until "
                                  "this is fixed: documentation/EMAIL_NOTIFICATIONS.md")


def check_duration(report: Report, targs: argparse.Namespace, gpus: int, device) -> Check:
    """The set-up as the trainer makes it, then the duration from its plan and its timed steps (``estimate_run``);
    a user error of the set-up is the run's, so it is fatal here too."""
    from src.training import train_enhanced as te
    try:
        with scratch_run(targs) as run:
            est = estimate_run(run, gpus)
    except UserError as err:
        return Check("setup", "fatal", f"the trainer's set-up stops: {err}", "correct the data or the flag it names")
    except Exception as err:  # the estimate is information: a failure here must not stop the night
        return Check("duration", "warn", f"could not time the trainer's steps ({type(err).__name__}: {err})")
    report.estimate = human_duration(est["total_s"])
    report.plan = {k: v for k, v in est.items() if k != "points"}
    epochs = ", ".join(map(str, est["steps_in_epoch"][:8])) + ("..." if len(est["steps_in_epoch"]) > 8 else "")
    compiled = te.compile_wanted(targs.compile, device, est["planned_steps"])
    return Check("duration", "ok", f"training about {report.estimate}: {est['planned_steps']} optimizer steps as the "
                                   f"trainer plans them (per epoch {epochs}; {human_duration(est['train_s'])} from "
                                   f"{est['timed_steps']} timed steps of its recipe), {est['validations']} "
                                   f"validations ({human_duration(est['validation_s'])}), generation "
                                   f"({human_duration(est['generation_s'])}); start-up and checkpoint writes not "
                                   "counted"
                                   + ("; the run compiles the model, so expect its steps faster after a slow first "
                                      "one" if compiled else ""))


def run_preflight(opts: argparse.Namespace, probe_factory: Callable[..., Any] | None = None) -> Report:
    """Every check of the module docstring; ``probe_factory(model, device, targs)`` replaces the memory probe
    (tests simulate a GPU with it)."""
    t0 = time.perf_counter()
    report = Report()
    only_data = opts.only == "data"
    targs, problem = trainer_args(opts)
    if targs is None:
        report.add(Check("flags", "fatal", f"the trainer flags do not parse: {problem}",
                         "correct the flag after -- (python -m src.training.train_enhanced --help lists them)"))
        report.seconds = time.perf_counter() - t0
        return report
    if not only_data:
        extra = " ".join(opts.trainer_flags)
        report.add(Check("flags", "ok", f"--profile {opts.profile}{' ' + extra if extra else ''}: model "
                                        f"{targs.model_name}, micro-batch {targs.batch_size} x accumulation "
                                        f"{targs.gradient_accumulation_steps}, {targs.epochs} epochs, "
                                        f"max_length {targs.max_length}"))
        checks, no_data = check_datasets(targs.datasets_dir, opts.strict, opts.include_sample, opts.columns)
        for check in checks:
            report.add(check)
        if no_data:  # no data at all: the model (theta-tiny is built from it) and the rest cannot be checked
            report.seconds = time.perf_counter() - t0
            return report
    import torch
    import transformers

    from src.model.families import check_support
    from src.model.theta_model import ThetaModel
    from src.training import train_enhanced as te
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in the overnight log
    try:  # the trainer's own decisions: its device, its precision (autocast dtype, scaler)
        device = te.resolve_device(targs.device)
        precision = te.resolve_precision(targs.precision, device)
    except UserError as err:
        report.add(Check("flags", "fatal", str(err), "correct --device / --precision after --"))
        report.seconds = time.perf_counter() - t0
        return report
    try:
        load_start = time.perf_counter()
        tm = ThetaModel(targs.model_name, device=device, datasets_dir=targs.datasets_dir, dropout=targs.dropout)
    except UserError as err:
        report.add(Check("model", "fatal", f"{targs.model_name} cannot be loaded: {err}",
                         "point --model_name at a model folder or a hub name that is cached, or use theta-tiny"))
        report.seconds = time.perf_counter() - t0
        return report
    except Exception as err:  # a corrupt folder, an unreadable file: the run would die the same way
        report.add(Check("model", "fatal", f"{targs.model_name} cannot be loaded: {type(err).__name__}: {err}",
                         "re-download or rebuild the model folder"))
        report.seconds = time.perf_counter() - t0
        return report
    model, tokenizer = tm.model, tm.tokenizer
    try:  # the format the trainer will use (--prompt_format): chat without a template stops the run at start-up
        from src.model.prompt_format import resolve_format
        tm.prompt_format = resolve_format(targs.prompt_format, tokenizer, tm.source_path, targs.model_name)
    except UserError as err:
        report.add(Check("flags", "fatal", str(err), "--prompt_format qa (or auto) after --"))
        report.seconds = time.perf_counter() - t0
        return report
    n_params = sum(p.numel() for p in model.parameters())
    if not only_data:
        report.add(Check("model", "ok", f"{targs.model_name} loads: {n_params / 1e6:.1f}M parameters, vocabulary "
                                        f"{len(tokenizer)}, context {tm.context_length} on {device} "
                                        f"({time.perf_counter() - load_start:.1f} s)"))
    if targs.max_length > tm.context_length:
        report.add(Check("flags", "fatal", f"--max_length {targs.max_length} exceeds the model's context of "
                                           f"{tm.context_length} tokens",
                         f"--max_length {tm.context_length}"))
    try:  # what the trainer refuses for these flags on this model (sliding window with --packing)
        check_support(model.config, name=targs.model_name, packing=targs.packing, max_length=targs.max_length)
    except UserError as err:
        report.add(Check("flags", "fatal", str(err), "drop --packing or lower --max_length"))
    if not only_data:
        report.add(check_tokens(tokenizer, targs, tm.prompt_format))
        peft = getattr(targs, "peft", "none")
        trainable = None if peft == "none" else lora_parameters(ModelShape.from_config(model.config), targs.lora_r)
        report.add(check_disk(Path(opts.run_dir or targs.output_dir), n_params, targs, trainable))

    info = None
    if opts.no_data:
        report.add(Check("data", "skip", "checked after the prepare step (the run prepares its data first)"))
    else:
        from src.training.lm_data import load_prepared_records
        try:
            records = load_prepared_records(Path(targs.data_path))
        except UserError as err:
            report.add(Check("data", "fatal", str(err), "python -m src.data_processing.prepare_data_for_training"))
            records = None
        if records is not None:
            checks, info = check_data(records, tokenizer, targs, tm.prompt_format)
            for c in checks:
                report.add(c)

    if targs.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    longest = min(targs.max_length, info["longest"]) if info and info["longest"] else targs.max_length
    if not only_data:
        probe, where = None, ""
        if probe_factory is not None:
            probe, where = probe_factory(model, device, targs), "the simulated GPU"
        elif opts.simulate_gpu_memory_gb or (device.type == "cuda" and getattr(targs, "peft", "none") != "none"):
            # adapters: the memory model of the asked mode (the CUDA probe would train the whole unwrapped model)
            capacity = opts.simulate_gpu_memory_gb * GB or torch.cuda.get_device_properties(device).total_memory
            shape = ModelShape.from_config(model.config)
            if getattr(targs, "peft", "none") == "none":
                probe = SimulatedProbe.for_model(model, capacity, targs.gradient_checkpointing)
            else:
                probe = SimulatedProbe(capacity, shape, adapter_weight_memory(shape, targs.peft, targs.lora_r),
                                       targs.gradient_checkpointing, head_trainable=False)
            where = f"a simulated {capacity / GB:g} GB GPU"
            report.add(check_peft_modes(shape, targs, capacity, longest, where))
        elif device.type == "cuda":
            probe, where = CudaProbe(model, device, precision.autocast), torch.cuda.get_device_name(device)
        if probe is None:
            report.add(Check("memory", "skip", "no CUDA GPU: the memory probe runs on CUDA only "
                                               "(--simulate_gpu_memory_gb N estimates one)"))
        else:
            report.add(check_memory(probe, targs, longest, where))

    if info is not None and not report.fatal:
        del tm, model  # the set-up loads its own copy (one model on the GPU at a time)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report.add(check_duration(report, targs, opts.gpus, device))
    if not only_data:
        report.add(_email_check(opts.email_test))
    report.seconds = time.perf_counter() - t0
    return report


def write_report(run_dir: Path, report: Report, merge: bool) -> None:
    """``<run_dir>/preflight.json``; ``merge`` keeps the earlier checks (the data check after preparation)."""
    path = Path(run_dir) / PREFLIGHT_FILE
    data = report.to_json()
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            names = {c.name for c in report.checks}
            checks = [Check(**c) for c in old.get("checks", []) if c["name"] not in names] + report.checks
            data = Report(checks, old.get("seconds", 0) + report.seconds, report.estimate or old.get("estimate", ""),
                          report.plan or old.get("plan", {})).to_json()
        except (OSError, ValueError, TypeError, KeyError):
            pass
    atomic_write_json(path, data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = FlagParser(prog="python -m src.training.preflight",
                   description="Check in seconds what would stop a training run (no training). "
                               "Trainer flags go after --.")
    p.add_argument("--profile", choices=PROFILE_NAMES, default="quick", help="the trainer profile")
    p.add_argument("--gpus", type=int, default=1, help="processes the run will use (for the duration)")
    p.add_argument("--run_dir", type=Path, default=None,
                   help="the run folder: the disk check looks there, and preflight.json is written into it")
    p.add_argument("--data_path", type=Path, default=PROJECT_ROOT / "Datasets" / "enhanced_training_data.json",
                   help="the prepared data file")
    p.add_argument("--no_data", action="store_true", help="skip the data check (the data is prepared later)")
    p.add_argument("--only", choices=["all", "data"], default="all",
                   help="data: the data check and the duration only (after the prepare step)")
    p.add_argument("--email_test", action="store_true", help="send a test email when email is configured")
    p.add_argument("--strict", action="store_true",
                   help="a problem of the data folder (an unreadable file, a file with nothing kept, many records "
                        "dropped) is fatal, as prepare_data_for_training --strict makes it")
    p.add_argument("--include_sample", action="store_true",
                   help="the run also reads the shipped sample next to your files (prepare --include_sample)")
    p.add_argument("--columns", type=str, default=None,
                   help="the run's prepare_data_for_training --columns (other names of the fields)")
    p.add_argument("--simulate_gpu_memory_gb", type=float, default=0.0,
                   help="estimate the memory check for a GPU of this size (a formula, not a measurement)")
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="-- then flags for train_enhanced.py")
    args = p.parse_args(argv)
    args.trainer_flags = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else args.trainer_flags
    if args.gpus < 1:
        p.error("--gpus must be at least 1")
    if args.simulate_gpu_memory_gb < 0:
        p.error("--simulate_gpu_memory_gb must be >= 0")
    return args


def main(argv: list[str] | None = None, probe_factory: Callable[..., Any] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"pre-flight: profile {opts.profile}" + (" (data check)" if opts.only == "data" else ""), flush=True)
    report = run_preflight(opts, probe_factory)
    if opts.run_dir and Path(opts.run_dir).is_dir():
        write_report(opts.run_dir, report, merge=opts.only == "data")
    warnings = len(report.warnings)
    if report.fatal:
        print(f"pre-flight FAILED in {report.seconds:.1f} s: {len(report.fatal)} problem"
              f"{'s' * (len(report.fatal) != 1)} would stop the run; fix {'them' if len(report.fatal) > 1 else 'it'}"
              " (see 'fix:' above) and run the same command again", flush=True)
        return EXIT_USER_ERROR
    print(f"pre-flight ok in {report.seconds:.1f} s" + (f", {warnings} warning{'s' * (warnings != 1)}"
                                                          if warnings else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
