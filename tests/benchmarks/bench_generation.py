"""Generation benchmark: tokens per second of ThetaModel.generate against plain model.generate, same settings.

Both sides decode greedily with the KV cache on, the same prompts (questions of the held-out set in the
prompt format), the same new-token limit and repetition penalty, and stop at the end-of-text token; runs are
interleaved (Theta, plain, plain without cache, Theta, ...) and the median over rounds is reported. Timings are of the
whole call: tokenising, generating and decoding, so the wrapper's own overhead is in the figure. The texts of
both sides must be identical (greedy decoding is deterministic): a mismatch is reported.

    .venv/bin/python tests/benchmarks/bench_generation.py                       # quick and 124M shapes
    .venv/bin/python tests/benchmarks/bench_generation.py --shapes quick --prompts 8 --new_tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import SHAPES, build_shape  # noqa: E402

from src.utils.data_layout import resolve_test_set  # noqa: E402


def load_questions(datasets_dir: Path, n: int) -> list[str]:
    """The first ``n`` questions of the held-out test set (any of the accepted record wrappers)."""
    path = resolve_test_set(datasets_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    records = data.get("records") or data.get("qa_pairs") if isinstance(data, dict) else data
    questions = [r["question"] for r in records if isinstance(r, dict) and r.get("question")]
    if not questions:
        raise SystemExit(f"no questions in {path}")
    return (questions * (n // len(questions) + 1))[:n]


def theta_call(tm, question: str, new_tokens: int, repetition_penalty: float) -> tuple[str, int, float]:
    t0 = time.perf_counter()
    out = tm.generate_with_stats(question, max_length=new_tokens, temperature=0.0,
                                 repetition_penalty=repetition_penalty)
    return out["text"], out["new_tokens"], time.perf_counter() - t0


def plain_call(model, tokenizer, question: str, new_tokens: int, repetition_penalty: float,
               use_cache: bool = True) -> tuple[str, int, float]:
    """What a user of plain transformers writes: tokenise the formatted prompt, generate, decode."""
    from src.model.theta_model import format_prompt

    t0 = time.perf_counter()
    enc = tokenizer(format_prompt(question), return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             repetition_penalty=repetition_penalty, use_cache=use_cache,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return text, int(new.numel()), time.perf_counter() - t0


def bench_shape(model_dir: Path, questions: list[str], new_tokens: int, repeats: int, repetition_penalty: float,
                device: str, no_cache: bool) -> dict:
    from src.model.theta_model import ThetaModel

    tm = ThetaModel.load(model_dir, device=device)
    tm.model.eval()
    sides = {"theta": lambda q: theta_call(tm, q, new_tokens, repetition_penalty),
             "plain": lambda q: plain_call(tm.model, tm.tokenizer, q, new_tokens, repetition_penalty)}
    if no_cache:
        sides["plain_no_cache"] = lambda q: plain_call(tm.model, tm.tokenizer, q, new_tokens, repetition_penalty,
                                                        use_cache=False)
    for fn in sides.values():  # warm-up: first-call allocations and thread start
        fn(questions[0])
    rates: dict[str, list[float]] = {k: [] for k in sides}
    texts: dict[str, list[str]] = {k: [] for k in sides}
    tokens: dict[str, int] = {k: 0 for k in sides}
    for rep in range(repeats):
        spent = {k: 0.0 for k in sides}
        made = {k: 0 for k in sides}
        for q in questions:
            for k, fn in sides.items():
                text, n, sec = fn(q)
                spent[k] += sec
                made[k] += n
                if rep == 0:
                    texts[k].append(text)
        for k in sides:
            rates[k].append(made[k] / spent[k])
            tokens[k] = made[k]
    med = {k: statistics.median(v) for k, v in rates.items()}
    mismatches = sum(a != b for a, b in zip(texts["theta"], texts["plain"]))
    return {"tokens_per_sec": med, "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "new_tokens_per_round": tokens, "theta_over_plain": med["theta"] / med["plain"],
            "text_mismatches": mismatches, "prompts": len(questions)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=str, default="quick,gpt2-124m", help="comma list of: quick, gpt2-124m")
    p.add_argument("--prompts", type=int, default=6, help="questions per round")
    p.add_argument("--new_tokens", type=int, default=48, help="most new tokens per answer")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="same on both sides (1.0 = off)")
    p.add_argument("--no_cache_baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time plain generate with use_cache=False (what the KV cache saves)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets", help="sample data folder")
    p.add_argument("--out", type=Path, default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s} (choose from {', '.join(SHAPES)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    questions = load_questions(args.datasets_dir, args.prompts)
    work = Path(tempfile.mkdtemp(prefix="theta_genbench_"))
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "threads": torch.get_num_threads(), "shapes": {}}
    print(f"generation bench: greedy, KV cache on, {args.prompts} prompts x {args.new_tokens} new tokens at most, "
          f"{args.repeats} rounds, {torch.get_num_threads()} threads, device {args.device}")
    print("| shape | Theta tok/s | plain tok/s | plain, no cache tok/s | Theta / plain | new tokens per round | "
          "text mismatches |")
    print("|---|---|---|---|---|---|---|")
    try:
        for shape in shapes:
            r = bench_shape(build_shape(shape, work, args.datasets_dir), questions, args.new_tokens, args.repeats,
                            args.repetition_penalty, args.device, args.no_cache_baseline)
            results["shapes"][shape] = r
            t = r["tokens_per_sec"]
            nc = f"{t['plain_no_cache']:.1f}" if "plain_no_cache" in t else "-"
            print(f"| {shape} | {t['theta']:.1f} | {t['plain']:.1f} | {nc} | {r['theta_over_plain']:.2f} | "
                  f"{r['new_tokens_per_round']['theta']} | {r['text_mismatches']} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
