"""LoRA benchmark: our loop with --peft lora against full fine-tuning of the same model, and against peft with
transformers.Trainer on the same records and the same adapter settings.

The harness is tests/benchmarks/bench_training.py's (the same prepared records, model, batch, schedule, whole
epoch as the difference of a 2-epoch and a 1-epoch run so start-up cancels, peak RSS sampled per run), with four
configurations, interleaved and repeated:

    full       our loop, every technique off (bench_training's config a)
    lora       the same with --peft lora --lora_r R --lora_alpha 2R --lora_dropout 0.05 (every decoder linear)
    trainer    transformers.Trainer on the same model wrapped by peft with the same LoraConfig
               (src/model/adapters.py builds it: the same targets, r, alpha, dropout), no evaluation or saving
    trainer_e  the same with eval_strategy and save_strategy "epoch": the per-epoch work our loop does too
               (our epoch also merges the adapter into theta_best/, on the CPU from the base)

    .venv/bin/python tests/benchmarks/bench_lora.py --records 200 --max_length 256 --repeats 2
    .venv/bin/python tests/benchmarks/bench_lora.py --out /tmp/bench_lora.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_training as bench  # noqa: E402

CONFIGS = ("full", "lora", "trainer", "trainer_e")


def lora_flags(r: int) -> list[str]:
    return ["--peft", "lora", "--lora_r", str(r), "--lora_alpha", str(2 * r), "--lora_dropout", "0.05"]


@contextlib.contextmanager
def peft_wrapped_loads(r: int):
    """ThetaModel.load returns the model wrapped by peft with our adapter settings (for bench_training's
    run_trainer, which loads the model through it)."""
    from src.model import adapters
    from src.model.theta_model import ThetaModel

    original = ThetaModel.load.__func__

    def load(cls, path, device=None):
        tm = original(cls, path, device)
        tm.model = adapters.wrap_with_adapters(tm.model, adapters.adapter_config(tm.model, r, 2 * r, 0.05))
        return tm

    ThetaModel.load = classmethod(load)
    try:
        yield
    finally:
        ThetaModel.load = classmethod(original)


def run(job, config: str, epochs: int, seed: int, r: int) -> dict:
    if config in ("full", "lora"):
        real = bench._ours_argv
        if config == "lora":
            bench._ours_argv = lambda *a, **k: real(*a, **k) + lora_flags(r)
        try:
            return bench.run_ours(job, "a", epochs=epochs, seed=seed, sample=False)
        finally:
            bench._ours_argv = real
    with peft_wrapped_loads(r):
        return bench.run_trainer(job, "be" if config == "trainer_e" else "b", epochs=epochs, seed=seed, sample=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200, help="training records sampled from the prepared sample")
    p.add_argument("--max_length", type=int, default=256, help="sequence limit")
    p.add_argument("--batch_size", type=int, default=4, help="micro-batch")
    p.add_argument("--lora_r", type=int, default=8, help="LoRA rank (alpha = 2 r, dropout 0.05)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        work = Path(tmp)
        datasets = bench.PROJECT_ROOT / "Datasets" / "sample"
        data, how = bench.prepare_data(work, datasets, records=args.records)
        model = bench.build_shape("quick", work, datasets)
        job = bench.Job(model, data, datasets, work, batch_size=args.batch_size, max_length=args.max_length,
                        learning_rate=5e-4)
        print(f"data: {how}; model theta-tiny; batch {args.batch_size}, max_length {args.max_length}, "
              f"LoRA r {args.lora_r}", flush=True)
        rows: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for round_ in range(args.repeats):
            for config in CONFIGS:
                one = run(job, config, 1, 42, args.lora_r)
                two = run(job, config, 2, 42, args.lora_r)
                epoch_s = two["wall_s"] - one["wall_s"]
                rows[config].append({"epoch_s": epoch_s, "peak_rss_mb": two["peak_rss"] / 2**20,
                                     "rss_start_mb": two["rss_start"] / 2**20})
                print(f"round {round_ + 1} {config:9s} epoch {epoch_s:6.2f} s  peak RSS "
                      f"{rows[config][-1]['peak_rss_mb']:.0f} MB", flush=True)
        med = {c: {k: statistics.median(r[k] for r in rows[c]) for k in rows[c][0]} for c in CONFIGS}
        ratios = {f"lora/{c}": {"epoch_s": med["lora"]["epoch_s"] / med[c]["epoch_s"],
                                "peak_rss": med["lora"]["peak_rss_mb"] / med[c]["peak_rss_mb"]}
                  for c in CONFIGS if c != "lora"}
        print("\n| config | epoch s | peak RSS MB |\n|---|---:|---:|")
        for c in CONFIGS:
            print(f"| {c} | {med[c]['epoch_s']:.2f} | {med[c]['peak_rss_mb']:.0f} |")
        for k, v in ratios.items():
            print(f"{k}: epoch time x{v['epoch_s']:.2f}, peak RSS x{v['peak_rss']:.2f}")
        if args.out:
            args.out.write_text(json.dumps({"medians": med, "ratios": ratios, "rounds": rows, "data": how,
                                            "args": vars(args) | {"out": str(args.out)},
                                            "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
