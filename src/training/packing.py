"""Padding-free batches: several records packed into one row, each attending only to itself.

Records are laid end to end in the order given (the sampler's order, so curriculum, stratification and the
epoch's batch plan are kept), a new row starting whenever the next record would not fit in ``max_length``
(next-fit; records are never split). Position ids restart at 0 for every record, so GPT-2's learned position
table sees exactly what it sees unpacked; each record's first token is not a target (unpacked, position 0 is
never predicted either), so no loss crosses a record boundary; and attention stays inside each record:

- SDPA and eager attention (CPU, and CUDA without flash-attn): a block-diagonal causal 4-D mask, passed as
  ``attention_mask`` of shape (rows, 1, L, L). transformers 5 hands a 4-D mask to the attention unchanged
  (``masking_utils``: "If the mask is already 4D, simply return as-is"); SDPA takes it boolean (True = attend),
  eager attention adds it, so it gets 0 / dtype-min floats. Cost: attention over the whole row, L^2, not the
  sum of the records' t^2, and no ``is_causal`` fast path.
- FlashAttention 2 (``attn_implementation="flash_attention_2"``, CUDA, ``flash-attn`` installed): the rows are
  flattened to one row without padding and the record boundaries go in as cumulative sequence lengths
  (``cu_seq_lens_q/k``, ``max_length_q/k``), which transformers forwards to ``flash_attn_varlen_func``: each
  record attends to itself at the cost of its own t^2.

Sharp edge: transformers also infers packed records from restarting position ids when no mask is given, but
only without a cache: with ``use_cache`` on (a model in eval mode defaults to it) it does not look, and the
records attend to each other. ``model_inputs`` therefore always passes ``use_cache=False``.

Every packed token carries its record's number (``record_ids``), so per-record losses (quality weighting, the
dynamic curriculum) are sums over that record's targets, exactly as unpacked
(``src.training.lm_loss.TargetIndex.from_labels(labels, record_ids)``).

    from src.training.packing import pack_examples
    packed = pack_examples(examples, max_length=512, pad_id=tok.pad_token_id)
    hidden = model.transformer(**packed.model_inputs(model.config._attn_implementation)).last_hidden_state

    .venv/bin/python -m pytest tests/test_packing.py -q      # packed vs unpacked losses and gradients, 1e-5
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


def next_fit_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into rows of at most ``max_length`` tokens, in order (next-fit)."""
    rows: list[list[int]] = []
    used = max_length + 1
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"record {i} has {n} tokens, more than the row length {max_length}")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


@dataclass
class PackedBatch:
    """Rows of packed records. ``record_ids`` numbers every token's record in ``order`` (-1 on padding)."""
    input_ids: torch.Tensor  # (R, L)
    position_ids: torch.Tensor  # (R, L): 0, 1, ... restarting at every record (and for the padding tail)
    labels: torch.Tensor  # (R, L): -100 on each record's first token and on padding
    record_ids: torch.Tensor  # (R, L)
    lengths: list[list[int]]  # per row, the token count of each record in it
    per_record: dict[str, torch.Tensor] = field(default_factory=dict)  # domain, index, quality, has_code (n,)

    @property
    def n_records(self) -> int:
        return sum(len(r) for r in self.lengths)

    def block_causal_mask(self, float_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(R, 1, L, L) True where query i may attend key j: same record and j <= i.

        Padding tokens attend to themselves only, so that no row of the mask is empty (an all-masked row
        makes SDPA return NaN, whose gradient times zero is still NaN). With ``float_dtype``, the additive
        form (0 where allowed, the dtype's minimum elsewhere) for eager attention.
        """
        rid = self.record_ids
        L = rid.shape[1]
        same = rid[:, :, None] == rid[:, None, :]  # (R, L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=rid.device).tril()
        pad = (rid < 0)[:, :, None] & torch.eye(L, dtype=torch.bool, device=rid.device)
        allowed = ((same & causal & (rid >= 0)[:, :, None]) | pad)[:, None]  # (R, 1, L, L)
        if float_dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=float_dtype, device=rid.device).masked_fill_(
            ~allowed, torch.finfo(float_dtype).min)

    def flat(self) -> "PackedBatch":
        """One row of every record back to back, no padding (FlashAttention's variable-length layout)."""
        keep = self.record_ids >= 0
        take = lambda t: t[keep][None]  # noqa: E731
        return PackedBatch(take(self.input_ids), take(self.position_ids), take(self.labels), take(self.record_ids),
                           [[n for row in self.lengths for n in row]], self.per_record)

    def flash_kwargs(self) -> dict:
        """cu_seq_lens_q/k and max_length_q/k of the flattened rows (see ``flat``), for flash_attention_2."""
        lens = torch.tensor([n for row in self.lengths for n in row], dtype=torch.int32)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        cu = cu.to(self.input_ids.device)
        m = int(lens.max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": m, "max_length_k": m}

    def model_inputs(self, attn_implementation: str = "sdpa", float_dtype: torch.dtype = torch.float32) -> dict:
        """Keyword arguments for the model's forward with attention kept inside each record.

        For ``flash_attention_2`` call it on ``flat()`` (one row): position ids plus the varlen lengths.
        """
        if attn_implementation == "flash_attention_2":
            if self.input_ids.shape[0] != 1:
                raise ValueError("flash_attention_2 packing needs the flattened batch: call .flat() first")
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False,
                    **self.flash_kwargs()}
        mask = self.block_causal_mask(float_dtype if attn_implementation == "eager" else None)
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": mask,
                "use_cache": False}

    def to(self, device, non_blocking: bool = True) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.labels), move(self.record_ids),
                           self.lengths, {k: move(v) for k, v in self.per_record.items()})


def pack_examples(examples: list[dict], max_length: int, pad_id: int) -> PackedBatch:
    """Pack tokenised examples (``input_ids``, ``labels``; optional ``domain``, ``index``, ``quality``,
    ``has_code``, as ``TokenizedDataset`` makes them) into rows, in the order given.

    Record k of ``examples`` is record k of the result (``record_ids``), so per-record values line up with the
    examples. Rows are padded to the longest row.
    """
    if not examples:
        raise ValueError("nothing to pack")
    rows = next_fit_rows([len(ex["input_ids"]) for ex in examples], max_length)
    L = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    record_ids = torch.full((R, L), -1, dtype=torch.long)
    lengths = []
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            ex = examples[k]
            n = len(ex["input_ids"])
            input_ids[r, at:at + n] = torch.tensor(ex["input_ids"])
            labels[r, at:at + n] = torch.tensor(ex["labels"])
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous record's last token
            position_ids[r, at:at + n] = torch.arange(n)
            record_ids[r, at:at + n] = k
            at += n
        position_ids[r, at:] = torch.arange(L - at)  # the padding tail is its own "record" for position-based masks
        lengths.append([len(examples[k]["input_ids"]) for k in row])
    per_record = {"domain": torch.tensor([ex.get("domain", 0) for ex in examples]),
                  "index": torch.tensor([ex.get("index", -1) for ex in examples]),
                  "quality": torch.tensor([ex.get("quality", 1.0) for ex in examples], dtype=torch.float32),
                  "has_code": torch.tensor([bool(ex.get("has_code", False)) for ex in examples])}
    return PackedBatch(input_ids, position_ids, labels, record_ids, lengths, per_record)


def flash_attention_available(device: torch.device | str) -> bool:
    """True on CUDA when the ``flash_attn`` package imports (transformers' flash_attention_2 needs it)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pack_batch(batch: dict, max_length: int, pad_id: int, attn_implementation: str = "sdpa") -> dict:
    """A collated, right-padded batch (``input_ids``, ``attention_mask``, ``labels`` and per-record fields) as
    packed rows, ready for ``src.training.lm_loss.step_losses``: record k of the result is row k of ``batch``,
    so per-record fields (domain, index, quality, loss weights) keep their meaning unchanged.

    Returns the per-record fields untouched plus ``input_ids``, ``position_ids``, ``labels``, ``record_ids``,
    the attention inputs of ``PackedBatch.model_inputs`` (a 4-D mask, or the flat row and FlashAttention's
    lengths) and ``targets`` (the host-side ``TargetIndex``). Host work only: call it before moving to the device.
    """
    from src.training.lm_loss import TargetIndex

    lens = batch["attention_mask"].sum(1).tolist()
    examples = [{"input_ids": batch["input_ids"][i, :n].tolist(), "labels": batch["labels"][i, :n].tolist()}
                for i, n in enumerate(lens)]
    packed = pack_examples(examples, max_length, pad_id)
    if attn_implementation == "flash_attention_2":
        packed = packed.flat()
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    out.update(packed.model_inputs(attn_implementation))
    out.pop("use_cache", None)
    out.update(labels=packed.labels, record_ids=packed.record_ids,
               targets=TargetIndex.from_labels(packed.labels, packed.record_ids, n_records=len(lens)))
    return out
