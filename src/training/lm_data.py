"""What training and evaluation share: prepared records, the tokenised dataset, padding, teacher-forced loss.

The trainer, ``evaluate_model.py`` and the pre-flight import these names from here (their owner), so none of
them imports another for data handling.

    from src.training.lm_data import TokenizedDataset, collate, evaluate, load_prepared_records
    python -c "from src.training.lm_data import load_prepared_records; print(len(load_prepared_records(
        'Datasets/enhanced_training_data.json')))"
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from src.model.prompt_format import PromptFormat, QAFormat, data_record
from src.training.lm_loss import TargetIndex, eval_losses
from src.utils.common import UserError, read_json

from src.utils.data_contract import PREPARED_FORMAT_VERSION as DATA_FORMAT_VERSION
from src.utils.data_contract import has_code

IGNORE_INDEX = -100
PREPARE_HINT = "Re-run data preparation: python -m src.data_processing.prepare_data_for_training"


class TokenizedDataset(Dataset):
    """Prepared records tokenised once: ``input_ids`` (prompt + completion) and ``labels``.

    ``prompt_format`` (src/model/prompt_format.py; default Theta's Q&A format) turns each record into prompt and
    completion ids: Q&A's completion is the answer plus EOS, the chat format's the assistant reply plus the
    template's end-of-turn token. ``labels`` are -100 on the prompt when ``loss_on == "answer"`` (the default), so
    the loss covers the completion only. Records longer than ``max_length`` are cut at the end and counted in
    ``truncated``; a record whose prompt alone leaves no answer token is skipped and counted in ``skipped``.
    Each example carries its ``index`` in the dataset, the index of its domain in ``domain_names`` (pass the same
    list to several datasets to share one domain index space, as training and validation do) and its
    ``sample_weight`` (data preparation's balancing weight; missing = 1.0).
    """

    def __init__(self, records: list[dict], tokenizer, max_length: int, loss_on: str = "answer",
                 domain_names: list[str] | None = None, prompt_format: PromptFormat | None = None):
        self.examples: list[dict] = []
        self.truncated = self.skipped = 0
        self.domain_names = domain_names or sorted({r.get("domain", "unknown") for r in records})
        domain_index = {d: i for i, d in enumerate(self.domain_names)}
        fmt = prompt_format or QAFormat(tokenizer)
        self.prompt_format = fmt.name
        encoded = fmt.encode([data_record(r) for r in records])  # batched: one tokenizer call per side
        for rec, (p_ids, a_ids) in zip(records, encoded):
            code = rec.get("has_code", has_code(rec["question"]) or has_code(rec["answer"]))  # set by prepare
            ids = p_ids + a_ids
            labels = ([IGNORE_INDEX] * len(p_ids) if loss_on == "answer" else list(p_ids)) + a_ids
            if len(ids) > max_length:
                self.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels[1:]):
                self.skipped += 1
                continue
            self.examples.append({"input_ids": ids, "labels": labels, "id": str(rec.get("id", "")),
                                  "index": len(self.examples),
                                  "domain": domain_index[rec.get("domain", "unknown")],
                                  "question": rec["question"], "answer": rec["answer"],
                                  "difficulty": int(rec.get("difficulty", 1)),
                                  "quality": float(rec.get("quality_score", 1.0)),
                                  "sample_weight": float(rec.get("sample_weight", 1.0)),
                                  "has_code": bool(code)})

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
            "domain": torch.tensor([ex["domain"] for ex in batch]),
            "index": torch.tensor([ex.get("index", -1) for ex in batch]),
            "quality": torch.tensor([ex.get("quality", 1.0) for ex in batch], dtype=torch.float32),
            "has_code": torch.tensor([ex.get("has_code", False) for ex in batch])}


def load_prepared_records(path: Path) -> list[dict]:
    """Records of the prepared file, checked (each refusal names the file and the record, with a hint): the format
    version, question/answer strings, ``sample_weight``, ``quality_score`` and ``difficulty`` finite numbers, and
    at least one training record with a non-empty answer."""
    data = read_json(path, "prepared data file (--data_path)")
    if not isinstance(data, dict) or "records" not in data:
        raise UserError(f"--data_path {path} is not a prepared file (no 'records'). {PREPARE_HINT}")
    if data.get("format_version") != DATA_FORMAT_VERSION:
        raise UserError(f"--data_path {path} has format_version {data.get('format_version')}, this trainer reads "
                        f"{DATA_FORMAT_VERSION}. {PREPARE_HINT}")
    records = data["records"]
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) \
                or not isinstance(rec.get("answer"), str):
            raise UserError(f"--data_path {path}: record {i} has no question/answer strings. {PREPARE_HINT}")
        weight = rec.get("sample_weight", 1.0)
        if not _finite_number(weight) or weight < 0:
            raise UserError(f"--data_path {path}: record {i} (id {rec.get('id')!r}) has sample_weight {weight!r}; "
                            f"it must be a finite number >= 0. {PREPARE_HINT}")
        # the dataset turns these into numbers: a string or a nan here was a ValueError deep in start-up
        for name, default in (("quality_score", 1.0), ("difficulty", 1)):
            value = rec.get(name, default)
            if not _finite_number(value):
                raise UserError(f"--data_path {path}: record {i} (id {rec.get('id')!r}) has {name} {value!r}; it "
                                f"must be a finite number. {PREPARE_HINT}")
    training = [rec for rec in records if rec.get("split", "train") == "train"]
    if training and not any(rec["answer"].strip() for rec in training):
        raise UserError(f"--data_path {path}: every one of its {len(training)} training records has an empty "
                        "answer, so there is nothing to learn but the end-of-text token; fill in the answers "
                        f"(preparation drops empty ones). {PREPARE_HINT}")
    return records


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def safe_exp(x: float) -> float:
    """Perplexity without overflow: exp capped at exp(50)."""
    return math.exp(min(x, 50.0))


def domain_summary(sums: torch.Tensor, domain_names: list[str]) -> dict[str, dict]:
    """Per-domain loss, perplexity, token accuracy and tokens from a (domains, 3) table of loss/tokens/correct."""
    out = {}
    for d, name in enumerate(domain_names):
        loss, tokens, correct = sums[d].tolist()
        if tokens > 0:
            out[name] = {"loss": loss / tokens, "perplexity": safe_exp(loss / tokens),
                         "token_accuracy": correct / tokens, "tokens": int(tokens)}
    return out


@torch.no_grad()
def evaluate(model, loader_batches: list[dict], device: torch.device, autocast_ctx, domain_names: list[str],
             world: int = 1) -> dict:
    """Validation loss (token-weighted), perplexity, token accuracy and per-domain loss/perplexity/accuracy.

    Under DDP each rank passes its own share of the batches; the sums are all-reduced, so every rank returns
    the figures of the whole set.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(domain_names), 3, dtype=torch.float64)  # loss, tokens, correct per domain
    for batch in loader_batches:
        # target positions found on the host (no device sync), the head only there: no [B, T, V] logits (every
        # model we load, int8 folders included, has the bias-free linear head this needs; lm_loss.output_weight
        # refuses any other by name)
        batch = {**batch, "targets": TargetIndex.from_labels(batch["labels"])}
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_ctx:
            loss, correct, tgt = eval_losses(model, batch)
        rows = torch.stack([tgt.per_record(loss), tgt.counts().to(loss.dtype),
                            tgt.per_record(correct.to(loss.dtype))], 1)
        sums.index_add_(0, batch["domain"].cpu(), rows.double().cpu())  # (B, 3) rows into their domains
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    total_loss, tokens, correct = sums.sum(0).tolist()
    val_loss = total_loss / max(tokens, 1)
    return {"loss": val_loss, "perplexity": safe_exp(val_loss), "token_accuracy": correct / max(tokens, 1),
            "tokens": int(tokens), "domains": domain_summary(sums, domain_names)}
