"""Evaluate a trained model on the held-out test set and write the metrics to stats/.

Perplexity and token accuracy are computed over answer tokens only (the prompt and padding are masked),
weighted by tokens, overall and per domain; a few generated answers are stored next to their references.

    python src/training/evaluate_model.py --model_path models/<run>/theta_final
    python -m src.training.evaluate_model --model_path models/<run>/theta_final --test_data Datasets/test_set.json \
        --output_file stats/evaluation_<run>.json --num_samples 5 --seed 42
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from src.model.theta_model import ThetaModel
from src.training.train_enhanced import EpochSampler, TokenizedDataset, collate, evaluate
from src.utils.common import PROJECT_ROOT, UserError, atomic_write_json, read_json, run_entry_point, setup_logging

logger = logging.getLogger(__name__)


def load_test_records(path: Path) -> list[dict]:
    """A flat list, a ``{"qa_pairs": [...]}`` wrapper or a prepared file; records need question and answer."""
    data = read_json(path, "test set (--test_data)")
    if isinstance(data, dict):
        data = data.get("records", data.get("qa_pairs"))
    if not isinstance(data, list):
        raise UserError(f"--test_data {path}: expected a list of records (or a qa_pairs/records wrapper)")
    records = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) \
                or not isinstance(rec.get("answer"), str) or not rec["question"].strip() or not rec["answer"].strip():
            raise UserError(f"--test_data {path}: record {i} needs non-empty 'question' and 'answer' strings")
        records.append({**rec, "domain": rec.get("domain") or "unknown"})
    if not records:
        raise UserError(f"--test_data {path} holds no records")
    return records


def run_name(model_path: Path) -> str:
    """The run id of ``models/<run>/theta_final`` (the model folder's parent), else the folder's own name."""
    return model_path.parent.name if model_path.name.startswith("theta_") else model_path.name


def evaluate_model(args: argparse.Namespace) -> dict:
    tm = ThetaModel.load(args.model_path, device=args.device)
    records = load_test_records(Path(args.test_data))
    max_length = min(args.max_length, tm.model.config.n_positions)
    ds = TokenizedDataset(records, tm.tokenizer, max_length)
    sampler = EpochSampler(len(ds), args.batch_size, seed=0, shuffle=False)
    batches = [collate([ds[i] for i in b], tm.tokenizer.pad_token_id) for b in sampler.batches()]
    start = time.time()
    metrics = evaluate(tm.model, batches, tm.device, torch.autocast("cpu", enabled=False), ds.domain_names)
    samples = []
    for rec in records[:args.num_samples]:
        out = tm.generate_with_stats(rec["question"], max_length=args.max_new_tokens, temperature=args.temperature,
                                     seed=args.seed)
        samples.append({"id": rec.get("id"), "domain": rec["domain"], "question": rec["question"],
                        "reference": rec["answer"], "generated": out["text"],
                        "tokens_per_sec": round(out["tokens_per_sec"], 1)})
    return {
        "run": run_name(Path(args.model_path)), "model_path": str(args.model_path), "test_data": str(args.test_data),
        "test_records": len(records), "evaluated_records": len(ds), "truncated": ds.truncated,
        "perplexity": metrics["perplexity"], "loss": metrics["loss"], "token_accuracy": metrics["token_accuracy"],
        "answer_tokens": metrics["tokens"], "per_domain": metrics["domains"],
        "generation": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": 0.9,
                       "top_k": 50, "repetition_penalty": 1.2, "seed": args.seed,
                       "decoding": "sampling" if args.temperature > 0 else "greedy"},
        "samples": samples, "seconds": round(time.time() - start, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a Theta model on the held-out test set.")
    p.add_argument("--model_path", type=Path, required=True, help="model folder, e.g. models/<run>/theta_final")
    p.add_argument("--test_data", type=Path, default=PROJECT_ROOT / "Datasets" / "test_set.json",
                   help="held-out test set (default Datasets/test_set.json)")
    p.add_argument("--output_file", type=Path, default=None,
                   help="metrics file (default stats/evaluation_<run>.json)")
    p.add_argument("--batch_size", type=int, default=8, help="records per forward pass")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max_length", type=int, default=512, help="longest sequence in tokens")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per sample")
    p.add_argument("--num_samples", type=int, default=5, help="generated examples stored with their references")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the samples; 0 = greedy")
    p.add_argument("--seed", type=int, default=42, help="seed of the generated samples")
    args = p.parse_args(argv)
    for bad, message in [(args.batch_size < 1, "--batch_size must be at least 1"),
                         (args.max_length < 8, "--max_length must be at least 8"),
                         (args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
                         (args.num_samples < 0, "--num_samples must be >= 0"),
                         (args.temperature < 0, "--temperature must be >= 0")]:
        if bad:
            p.error(message)
    if args.output_file is None:
        args.output_file = PROJECT_ROOT / "stats" / f"evaluation_{run_name(args.model_path)}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    result = evaluate_model(args)
    atomic_write_json(args.output_file, result)
    logger.info("test set: %d records, perplexity %.2f, token accuracy %.3f -> %s", result["test_records"],
                result["perplexity"], result["token_accuracy"], args.output_file)
    for domain, m in sorted(result["per_domain"].items()):
        logger.info("    %-22s perplexity %8.2f  token accuracy %.3f", domain, m["perplexity"], m["token_accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
