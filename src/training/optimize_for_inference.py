"""Optimise a trained model for inference and measure what it changed.

Writes ``theta_inference/`` next to the model (a normal Hugging Face folder in the chosen dtype, so
``ThetaModel.load`` and the chat command read it) and ``optimization_metrics.json`` in it: size on disk,
generation latency and tokens per second before and after on the same prompts and settings.

    python src/training/optimize_for_inference.py --model_path models/<run>/theta_final
    python -m src.training.optimize_for_inference --model_path models/<run>/theta_final --dtype fp16
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

from src.model.theta_model import ThetaModel, check_model_folder
from src.utils.common import atomic_write_json, run_entry_point, setup_logging

logger = logging.getLogger(__name__)

BENCH_PROMPTS = ["What is a firewall?", "How do I reverse a list in Python?", "What does DNS do?"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_generation(tm: ThetaModel, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    """Greedy generation of each prompt ``repeats`` times (after one warm-up): mean latency and tokens/s."""
    tm.generate(prompts[0], max_length=4, temperature=0.0)  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        for prompt in prompts:
            out = tm.generate_with_stats(prompt, max_length=max_new_tokens, temperature=0.0)
            tokens += out["new_tokens"]
            seconds += out["seconds"]
    n = repeats * len(prompts)
    return {"mean_latency_s": seconds / n, "tokens_per_sec": tokens / seconds if seconds else 0.0,
            "new_tokens": tokens, "generations": n}


def optimize(args: argparse.Namespace) -> dict:
    check_model_folder(Path(args.model_path))
    output = Path(args.output_path or Path(args.model_path).parent / "theta_inference")
    device = args.device
    before = ThetaModel.load(args.model_path, device=device)
    before_gen = measure_generation(before, BENCH_PROMPTS, args.max_new_tokens, args.repeats)
    dtype = DTYPES[args.dtype]
    if dtype != torch.float32 and before.device.type == "cpu" and args.dtype == "fp16":
        logger.warning("fp16 on CPU: smaller on disk, but CPUs without fp16 units generate more slowly")
    before.model.to(dtype)
    before.model.config.use_cache = True
    before.save(output)
    after = ThetaModel.load(output, device=device)
    after_gen = measure_generation(after, BENCH_PROMPTS, args.max_new_tokens, args.repeats)
    metrics = {
        "model_path": str(args.model_path), "output_path": str(output), "dtype": args.dtype,
        "size_bytes": {"before": folder_size(Path(args.model_path)), "after": folder_size(output)},
        "generation": {"before": before_gen, "after": after_gen,
                       "speedup": after_gen["tokens_per_sec"] / before_gen["tokens_per_sec"]
                       if before_gen["tokens_per_sec"] else None,
                       "settings": {"prompts": BENCH_PROMPTS, "max_new_tokens": args.max_new_tokens,
                                    "decoding": "greedy", "repeats": args.repeats}},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(output / "optimization_metrics.json", metrics)
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Optimise a Theta model for inference and measure the change.")
    p.add_argument("--model_path", type=Path, required=True, help="model folder, e.g. models/<run>/theta_final")
    p.add_argument("--output_path", type=Path, default=None, help="default: theta_inference/ next to the model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the saved model")
    p.add_argument("--device", type=str, default="cpu", help="device for the measurements (default cpu)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated per measured prompt")
    p.add_argument("--repeats", type=int, default=2, help="measured repetitions of the prompt set")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    m = optimize(args)
    g = m["generation"]
    logger.info("wrote %s (%s): %.1f MB -> %.1f MB, %.1f -> %.1f tokens/s", m["output_path"], m["dtype"],
                m["size_bytes"]["before"] / 1e6, m["size_bytes"]["after"] / 1e6, g["before"]["tokens_per_sec"],
                g["after"]["tokens_per_sec"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
