"""The LM head and its losses at target positions only, in chunks: no [batch, length, vocabulary] logits tensor.

A causal LM's loss needs the logits only where the next token is a target (the answer and its end-of-text with
``--loss_on answer``). Projecting every position and then masking spends the head's matmul on prompts and padding,
and the [B, T, V] fp32 logits (411 MB at batch 4 x 512 x 50,257), their log-softmax and their gradient are the
largest tensors of a GPT-2 step. Here the hidden states whose next token is a target are gathered into [N, C],
projected with the (tied) head weight ``chunk_rows`` rows at a time, and each chunk's loss *and* its gradients
with respect to the hidden states and the head weight are computed at once, in the forward pass, in the manner of
fused linear cross-entropy kernels (Liger-Kernel, Hsu et al. 2024; Wijmans et al. 2024, "Cut your losses").
Only one chunk's logits ever exist; the backward just scales the stored gradients (no recomputation).

What the differentiable output means: one scalar, ``sum_i coef_i * loss_i`` over the targets, with per-target
coefficients ``coef`` given up front (quality weights, the step's normaliser, the DDP world factor). Any function
of that scalar differentiates exactly (the backward multiplies by its incoming gradient). Per-target losses,
argmax hits and R-Drop's KL come back detached, for logging, per-record means and the dynamic curriculum.

    from src.training.lm_loss import TargetIndex, head_loss
    tgt = TargetIndex.from_labels(batch["labels"]).to(device)        # host-side index: no device sync
    out = head_loss(hidden, model.lm_head.weight, tgt, coef=weights[tgt.record] / n_targets)
    out.loss.backward(); per_record = tgt.per_record(out.token_loss)

    .venv/bin/python -m pytest tests/test_lm_loss.py -q              # oracles: torch CE, HF GPT2LMHeadModel loss
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk: 334 rows at vocabulary 50,257


def default_chunk_rows(vocab: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about ``budget_bytes`` (at least 16 rows).

    Cost: the working set of a chunk is about 2x this (logits, then their softmax-gradient in place, plus a
    temporary); larger chunks make larger matmuls, which matters little once a chunk has a few hundred rows.
    """
    return max(16, budget_bytes // (4 * max(vocab, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Which positions are targets
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TargetIndex:
    """The target positions of a batch: hidden state ``(row, pos)`` predicts ``token``, for record ``record``.

    Built from the labels with the usual causal shift (position t predicts labels[t + 1]; -100 is ignored). Build
    it from the labels while they are still on the host (``nonzero`` on a CUDA tensor waits for the device) and
    move it with ``to``. ``record`` is the batch row for ordinary batches and the per-token record number for
    packed rows (``src.training.packing``), so per-record sums work the same way for both.
    """
    row: torch.Tensor  # (N,) long
    pos: torch.Tensor  # (N,) long
    token: torch.Tensor  # (N,) long
    record: torch.Tensor  # (N,) long
    n_records: int

    @classmethod
    def from_labels(cls, labels: torch.Tensor, record_ids: torch.Tensor | None = None,
                    n_records: int | None = None) -> "TargetIndex":
        """From (B, T) labels; ``record_ids`` (B, T) numbers each token's record (packed rows), default: row."""
        shifted = labels[:, 1:]  # (B, T-1): the token each position predicts
        row, pos = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        token = shifted[row, pos]
        if record_ids is None:
            return cls(row, pos, token, row, labels.shape[0] if n_records is None else n_records)
        record = record_ids[:, 1:][row, pos]
        n = int(record_ids.max()) + 1 if n_records is None else n_records
        return cls(row, pos, token, record, n)

    def to(self, device, non_blocking: bool = True) -> "TargetIndex":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TargetIndex(move(self.row), move(self.pos), move(self.token), move(self.record), self.n_records)

    def __len__(self) -> int:
        return int(self.token.shape[0])

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) hidden states -> (N, C) at the target positions (differentiable)."""
        return hidden[self.row, self.pos]

    def per_record(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per-target values -> (n_records,) sums per record."""
        out = values.new_zeros(self.n_records)
        return out.index_add_(0, self.record, values)

    def counts(self) -> torch.Tensor:
        """(n_records,) number of targets of each record."""
        return torch.bincount(self.record, minlength=self.n_records)


# ---------------------------------------------------------------------------------------------------------------
# The chunked head: one pass, one pass pair (R-Drop)
# ---------------------------------------------------------------------------------------------------------------

def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, C) x (V, C) -> (n, V) fp32 (the matmul runs in the weight's dtype: autocast's, when it is on)."""
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    return z.float()


def _token_terms(z: torch.Tensor, token: torch.Tensor, smoothing: float):
    """Per row of fp32 logits ``z``: (smoothed) CE, argmax hit, and the log-softmax, made in place in ``z``."""
    hit = z.argmax(-1) == token
    logp = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # (n, V), in place: one V-wide buffer per pass
    nll = -logp.gather(1, token[:, None]).squeeze(1)
    loss = nll if smoothing == 0 else (1 - smoothing) * nll - smoothing * logp.mean(-1)
    return loss, logp, hit


def _ce_grad(p: torch.Tensor, token: torch.Tensor, smoothing: float) -> torch.Tensor:
    """d loss / d logits = softmax - (1 - s) onehot - s / V, made in place in ``p`` (the softmax)."""
    if smoothing:
        p.sub_(smoothing / p.shape[1])
    p[torch.arange(p.shape[0], device=p.device), token] -= 1 - smoothing
    return p


def _grad_buffers(ctx, hs: tuple[torch.Tensor, ...], weight: torch.Tensor, bias, first: int):
    """Zeroed gradient accumulators for the inputs that need one (None for the others); fp32 for the head."""
    need = ctx.needs_input_grad
    gh = tuple(torch.zeros_like(h) if need[i] else None for i, h in enumerate(hs))
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[first] else None
    gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
        if bias is not None and need[first + 1] else None
    ctx.dtypes = tuple(h.dtype for h in hs) + (weight.dtype, bias.dtype if bias is not None else None)
    return gh, gw, gb


def _accumulate(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, gh, gw, gb, sl: slice) -> None:
    """Add one chunk's logits-gradient ``g`` (n, V) fp32 into the hidden, weight and bias gradients."""
    gc = g.to(weight.dtype)
    if gh is not None:
        gh[sl] = (gc @ weight).to(gh.dtype)  # (n, C)
    if gw is not None:  # (V, C); in place when both are fp32 (no V x C temporary per chunk)
        gw.addmm_(gc.T, h) if gc.dtype == torch.float32 else gw.add_((gc.T @ h).float())
    if gb is not None:
        gb.add_(g.sum(0))


def _scaled(grads, dtypes, g_total):
    """The stored gradients times the incoming gradient of the scalar, in each input's dtype."""
    return tuple(None if t is None else (t * g_total).to(dt) for t, dt in zip(grads, dtypes))


class _HeadLossFn(torch.autograd.Function):
    """sum_i coef_i * CE_i(h_i W^T + b) over chunks of rows, with the gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, bias, token, coef, smoothing: float, chunk: int):
        (gh,), gw, gb = _grad_buffers(ctx, (h,), weight, bias, first=1)
        N = h.shape[0]
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        hits = torch.empty(N, dtype=torch.bool, device=h.device)
        for s in range(0, N, chunk):
            sl = slice(s, s + chunk)
            hc, tc = h[sl].to(weight.dtype), token[sl]
            losses[sl], logp, hits[sl] = _token_terms(_logits(hc, weight, bias), tc, smoothing)  # the only logits
            if gh is not None or gw is not None or gb is not None:
                g = _ce_grad(logp.exp_(), tc, smoothing).mul_(coef[sl, None])  # (n, V), in the same buffer
                _accumulate(g, hc, weight, gh, gw, gb, sl)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(losses, hits)
        return (losses * coef).sum(), losses, hits

    @staticmethod
    def backward(ctx, g_total, _g_losses, _g_hits):
        return (*_scaled(ctx.saved_tensors, ctx.dtypes, g_total), None, None, None, None)


class _PairHeadLossFn(torch.autograd.Function):
    """R-Drop at the targets: sum_i coef_i [ (CE1_i + CE2_i) / 2 + alpha KLsym_i ], in-forward gradients.

    KLsym = (KL(p1 || p2) + KL(p2 || p1)) / 2. With d = log p1 - log p2, k1 = KL(p1 || p2) = <p1, d> and
    k2 = KL(p2 || p1) = -<p2, d>, its gradient with respect to the first pass's logits is
    (p1 (d - k1) + p1 - p2) / 2 and with respect to the second's (p2 (-d - k2) + p2 - p1) / 2 (by hand;
    checked against autograd over full logits in tests/test_lm_loss.py).
    """

    @staticmethod
    def forward(ctx, h1, h2, weight, bias, token, coef, alpha: float, smoothing: float, chunk: int):
        (gh1, gh2), gw, gb = _grad_buffers(ctx, (h1, h2), weight, bias, first=2)
        N = h1.shape[0]
        ce, kl = (torch.empty(N, dtype=torch.float32, device=h1.device) for _ in range(2))
        hits = torch.empty(N, dtype=torch.bool, device=h1.device)
        for s in range(0, N, chunk):
            sl, tc = slice(s, s + chunk), token[s:s + chunk]
            a, b = h1[sl].to(weight.dtype), h2[sl].to(weight.dtype)
            l1, lp1, hits[sl] = _token_terms(_logits(a, weight, bias), tc, smoothing)
            l2, lp2, _ = _token_terms(_logits(b, weight, bias), tc, smoothing)
            d = lp1 - lp2  # (n, V)
            p1, p2 = lp1.exp_(), lp2.exp_()  # the log-softmaxes are not needed any more
            k1, k2 = (p1 * d).sum(-1), -(p2 * d).sum(-1)
            ce[sl], kl[sl] = 0.5 * (l1 + l2), 0.5 * (k1 + k2)
            if gh1 is None and gh2 is None and gw is None and gb is None:
                continue
            g_kl1 = (p1 * (d - k1[:, None])).add_(p1).sub_(p2).mul_(0.5)
            g_kl2 = (p2 * d.neg_().sub_(k2[:, None])).add_(p2).sub_(p1).mul_(0.5)
            del d
            c = coef[sl, None]
            g1 = _ce_grad(p1, tc, smoothing).mul_(0.5).add_(g_kl1, alpha=alpha).mul_(c)
            del g_kl1
            g2 = _ce_grad(p2, tc, smoothing).mul_(0.5).add_(g_kl2, alpha=alpha).mul_(c)
            del g_kl2
            _accumulate(g1, a, weight, gh1, gw, gb, sl)
            _accumulate(g2, b, weight, gh2, gw, gb, sl)
        ctx.save_for_backward(gh1, gh2, gw, gb)
        ctx.mark_non_differentiable(ce, kl, hits)
        return ((ce + alpha * kl) * coef).sum(), ce, kl, hits

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kl, _g_hits):
        return (*_scaled(ctx.saved_tensors, ctx.dtypes, g_total), None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class HeadLoss:
    """What a head-loss call gives: ``loss`` (the differentiable sum_i coef_i loss_i), and detached per target:
    ``token_loss`` (N,) (the smoothed CE, plus alpha x KL for R-Drop), ``ce``, ``kl`` (R-Drop only, else None)
    and ``correct`` (argmax hits of the first pass)."""
    loss: torch.Tensor
    token_loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor | None
    correct: torch.Tensor


def _prepare(hidden: torch.Tensor, targets: TargetIndex, weight: torch.Tensor, bias, coef):
    """Gather the target rows, cast the head to autocast's dtype when autocast is on, default coefficients."""
    h = targets.gather(hidden) if hidden.dim() == 3 else hidden
    if h.shape[0] != len(targets):
        raise ValueError(f"{h.shape[0]} hidden rows for {len(targets)} targets")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):  # the head's matmuls in autocast's dtype, the softmax in fp32
        dt = torch.get_autocast_dtype(device_type)
        weight, bias = weight.to(dt), (bias.to(dt) if bias is not None else None)
    coef = torch.ones(len(targets), device=h.device) if coef is None else coef.to(h.device, torch.float32)
    return h, weight, bias, coef


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: TargetIndex, coef: torch.Tensor | None = None,
              smoothing: float = 0.0, bias: torch.Tensor | None = None, chunk_rows: int | None = None) -> HeadLoss:
    """Next-token cross-entropy (label-smoothed when ``smoothing`` > 0) at the targets only.

    ``hidden`` is (B, T, C) (gathered here) or already (N, C); ``weight`` is the head's (V, C) weight (GPT-2:
    ``lm_head.weight``, tied to the token embedding). ``coef`` (N,) weights each target's loss in ``loss``
    (default 1: ``loss`` is the plain sum, as ``F.cross_entropy(..., reduction="sum")``).
    Cost: the head's matmuls at N rows instead of B x T, and about 2 x chunk x V x 4 bytes of logits memory
    (plus one fp32 copy of the head's gradient, held from the forward to the backward).
    Sharp edge: only ``loss`` carries gradients; weight the targets through ``coef``, not by scaling
    ``token_loss``; and ``coef`` must be final when the forward runs.
    """
    h, w, b, coef = _prepare(hidden, targets, weight, bias, coef)
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        total, losses, hits = _HeadLossFn.apply(h, w, b, targets.token, coef, float(smoothing), chunk)
    return HeadLoss(total, losses, losses, None, hits)


def rdrop_head_loss(hidden1: torch.Tensor, hidden2: torch.Tensor, weight: torch.Tensor, targets: TargetIndex,
                    alpha: float, coef: torch.Tensor | None = None, smoothing: float = 0.0,
                    bias: torch.Tensor | None = None, chunk_rows: int | None = None) -> HeadLoss:
    """R-Drop's objective at the targets: the two passes' mean (smoothed) CE plus ``alpha`` x their symmetric KL.

    Per target: ``(ce1 + ce2) / 2 + alpha * (KL(p1 || p2) + KL(p2 || p1)) / 2`` (Liang et al. 2021), the same
    quantity the full-logits R-Drop computes. Chunks are half as tall: two passes' logits live at once.
    """
    h1, w, b, coef = _prepare(hidden1, targets, weight, bias, coef)
    h2 = targets.gather(hidden2) if hidden2.dim() == 3 else hidden2
    chunk = max(8, (chunk_rows or default_chunk_rows(weight.shape[0])) // 2)
    with torch.autocast(h1.device.type, enabled=False):
        total, ce, kl, hits = _PairHeadLossFn.apply(h1, h2.to(h1.dtype), w, b, targets.token, coef, float(alpha),
                                                    float(smoothing), chunk)
    return HeadLoss(total, ce + alpha * kl, ce, kl, hits)


def final_hidden(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The last hidden states (B, T, C) of a Hugging Face causal LM, after its final norm, without its head.

    Goes through the LM's own forward (so DDP, torch.compile, hooks and tests that patch it all apply) with
    ``logits_to_keep`` an empty position list: the head projects zero positions, and the last entry of
    ``hidden_states`` is what ``lm_head`` would have projected (transformers 5).
    """
    ids = inputs["input_ids"]
    out = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device),
                output_hidden_states=True)
    return out.hidden_states[-1]


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The head's (V, C) weight (tied to the token embedding in GPT-2); refuses heads with a bias or none."""
    head = model.get_output_embeddings()
    adapter = getattr(head, "token_adapter", None)  # peft's trainable token rows (src/model/adapters.py)
    if adapter is not None:  # the head's weight with the trained rows in: what the wrapped head would project
        return adapter.get_merged_weights(adapter.active_adapters)
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: the target-position loss needs a bias-free linear LM head")
    return head.weight


# ---------------------------------------------------------------------------------------------------------------
# One micro-batch's training losses, as the loop needs them
# ---------------------------------------------------------------------------------------------------------------

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
              "max_length_k")  # what the model's forward gets from a (packed) batch


def step_inputs(lm: torch.nn.Module, batch: dict, weights: torch.Tensor, body=None):
    """What every training loss of a micro-batch starts from: ``(targets, inputs, run_body, weight, coef)``.

    ``targets`` is the batch's ``TargetIndex`` (``batch["targets"]``, built on the host; built here from the labels
    otherwise, which waits for a CUDA device); ``inputs`` what the model's forward gets (``MODEL_KEYS``, no cache);
    ``run_body(**inputs)`` gives the last hidden states through ``body`` (the same model compiled, for
    ``--compile``) or ``lm``, with no logits kept (``final_hidden``); ``weight`` the head's (V, C) weight; ``coef``
    (N,) each target's record weight, from ``weights`` (B,) or (records,).
    """
    targets = batch.get("targets")
    if targets is None:
        targets = TargetIndex.from_labels(batch["labels"], batch.get("record_ids"))
    inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    inputs["use_cache"] = False  # training keeps no cache; packed boundaries are read only without one
    run_body = functools.partial(final_hidden, body if body is not None else lm)
    return targets, inputs, run_body, output_weight(lm), weights.to(torch.float32)[targets.record]


def step_losses(lm: torch.nn.Module, batch: dict, weights: torch.Tensor, smoothing: float = 0.0,
                body=None) -> dict:
    """A micro-batch's weighted loss sum at the target positions: the training loss of the LM.

    ``batch`` holds ``input_ids`` and ``labels`` (B, T), optionally ``attention_mask`` (2-D padding or a packed 4-D
    mask), ``position_ids`` and ``targets``; ``weights`` (B,) or (records,) weights each record's tokens; see
    ``step_inputs`` for ``body``. Returns ``loss_sum`` (differentiable: sum of weight x (smoothed) cross-entropy),
    ``token_loss`` (N,) per target (detached), ``targets``, ``hidden`` (the last hidden states, (B, T, C)) and
    ``sums`` (detached figures to log; none here: a replacement such as R-Drop's adds its own).
    """
    targets, inputs, run_body, weight, coef = step_inputs(lm, batch, weights, body)
    hidden = run_body(**inputs)  # (B, T, C)
    out = head_loss(hidden, weight, targets, coef=coef, smoothing=smoothing)
    return {"loss_sum": out.loss, "token_loss": out.token_loss, "targets": targets, "hidden": hidden, "sums": {}}


@torch.no_grad()
def eval_losses(lm: torch.nn.Module, batch: dict, body=None) -> tuple[torch.Tensor, torch.Tensor, TargetIndex]:
    """Teacher-forced validation at the targets: per-target cross-entropy (N,), argmax hits (N,) and the index
    (its ``record`` gives each target's row, e.g. for per-domain sums)."""
    targets = batch.get("targets")
    if targets is None:
        targets = TargetIndex.from_labels(batch["labels"], batch.get("record_ids"))
    inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    hidden = final_hidden(body if body is not None else lm, **inputs, use_cache=False)
    out = head_loss(hidden, output_weight(lm), targets)
    return out.token_loss, out.correct, targets
