"""Cost and effect of each training technique: the quick configuration with each technique alone, and all of
them together, against the plain loop, on the same data, model and step budget.

    .venv/bin/python tests/benchmarks/bench_techniques.py                      # theta-tiny, 40 steps, 2 repeats
    .venv/bin/python tests/benchmarks/bench_techniques.py --steps 80 --repeats 3 --out /tmp/techniques.json

For each configuration: the median optimizer-step time (ms, from metrics.jsonl, first 3 steps of each run
dropped), its ratio to the plain loop's, and the validation loss after the fixed budget (EMA weights where
EMA is on; the EMA starts at step 1 here). Runs are interleaved (plain, ema, ..., plain, ema, ...) so a busy
machine slows all of them alike; the medians over repeats are reported. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.prepare_data_for_training import main as prepare_main  # noqa: E402
from src.model.theta_model import build_tiny_model  # noqa: E402
from src.training import train_enhanced as te  # noqa: E402
from src.utils.common import PROJECT_ROOT, setup_logging  # noqa: E402

CONFIGS = {
    "plain": [],
    "ema": ["--use_ema", "--ema_decay", "0.95", "--ema_warmup_epochs", "0"],
    "label_smoothing": ["--use_label_smoothing", "--label_smoothing_epsilon", "0.05"],
    "quality_weighting": ["--use_quality_weighting"],
    "rdrop": ["--use_rdrop", "--rdrop_alpha", "0.05"],
    "llrd": ["--use_llrd", "--llrd_factor", "0.85"],
    "gradient_noise": ["--use_gradient_noise", "--gradient_noise_eta", "1e-8"],
    "cpu_offload": ["--use_cpu_offload", "--cpu_offload_fraction", "0.5"],
    "code_contrastive": ["--use_code_contrastive", "--code_contrastive_weight", "0.02"],
    "curriculum": ["--use_curriculum", "--curriculum_start_fraction", "0.7"],
    "dynamic_curriculum": ["--use_dynamic_curriculum", "--dynamic_curriculum_warmup", "0"],
    "domain_stratified": ["--use_domain_stratified"],
}
CONFIGS["all"] = [flag for name, flags in CONFIGS.items() if name != "plain" for flag in flags]


def run_once(name: str, flags: list[str], model_dir: Path, data: Path, work: Path, steps: int, seed: int) -> dict:
    out = work / f"{name}_{seed}"
    args = te.parse_args(["--model_name", str(model_dir), "--data_path", str(data), "--output_dir", str(out),
                          "--epochs", "50", "--max_steps", str(steps), "--batch_size", "8", "--learning_rate", "3e-3",
                          "--warmup_proportion", "0.05", "--max_length", "256", "--num_samples", "0",
                          "--domain_eval_frequency", "0", "--no_progress_bar", "--log_every_steps", "1000",
                          "--seed", str(seed), "--resume", "never", *flags])
    summary = te.train(args)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [x["ms"] for x in lines[3:]]
    return {"step_ms": statistics.median(ms), "val_loss": summary["best_val_loss"], "steps": len(lines)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; medians reported")
    p.add_argument("--configs", type=str, default=",".join(CONFIGS), help="comma-separated configuration names")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    if "plain" not in names:
        names.insert(0, "plain")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup_logging(quiet_console=True)
        data_dir = PROJECT_ROOT / "Datasets"
        data = work / "enhanced.json"
        prepare_main(["--datasets_dir", str(data_dir), "--output", str(data), "--stats_output",
                      str(work / "stats.json"),
                      "--min_domain_count", "0", "--synthetic_ratio", "0"])
        model_dir = build_tiny_model(work / "theta-tiny", data_dir)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names:
                res = run_once(name, CONFIGS[name], model_dir, data, work, args.steps, seed=r)
                results[name].append(res)
                print(f"repeat {r + 1}/{args.repeats} {name:<20} {res['step_ms']:8.1f} ms/step  "
                      f"val loss {res['val_loss']:.4f}", file=sys.stderr, flush=True)
    plain_ms = statistics.median(x["step_ms"] for x in results["plain"])
    plain_loss = statistics.median(x["val_loss"] for x in results["plain"])
    table = []
    print(f"\n{'technique':<20} {'ms/step':>9} {'x plain':>8} {'val loss':>9} {'delta':>8}")
    for name in names:
        ms = statistics.median(x["step_ms"] for x in results[name])
        loss = statistics.median(x["val_loss"] for x in results[name])
        table.append({"technique": name, "step_ms": ms, "ratio": ms / plain_ms, "val_loss": loss,
                      "val_loss_delta": loss - plain_loss})
        print(f"{name:<20} {ms:9.1f} {ms / plain_ms:8.2f} {loss:9.4f} {loss - plain_loss:+8.4f}")
    print(f"\n{args.steps} steps per run, batch 8, theta-tiny, {args.repeats} interleaved repeats (medians)")
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "repeats": args.repeats, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
