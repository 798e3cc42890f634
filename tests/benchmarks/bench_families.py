"""Family benchmark: whole-epoch training tokens/s of a tiny Llama against the same-size GPT-2 on this machine.

The GPT-2 is theta-tiny (4 layers x 256, 4 heads, a 1,024-token vocabulary built from the shipped sample, 512
positions, tied head). Two Llamas of the same depth, width, heads, vocabulary (the same tokenizer), context and
tied head:

    gpt2          theta-tiny
    llama-config  LlamaConfig at GPT-2's sizes: intermediate 4 x 256 = 1024, so a SwiGLU MLP of three matrices
                  against GPT-2's two (more parameters and FLOPs per token)
    llama-params  intermediate chosen so the parameter count equals GPT-2's (GPT-2's biases, learned position
                  table and LayerNorm weights against Llama's RMSNorm and bias-free layers)

Each runs through the trainer (``train(parse_args([...]))``, every technique off) for 2 whole epochs; the
tokens/s is the sum of the training tokens (prompt and answer, no padding) of the optimizer steps over the sum of
their intervals, from the run's own ``metrics.jsonl`` (``tokens_per_sec`` x ``ms``), leaving out step 1 (its
interval holds the set-up): the wall time of the epochs, the first epoch's validation and checkpoint included.
(A wall-clock difference of a 1- and a 2-epoch run measures about the same but, on a machine other jobs share,
came out negative once.) Configurations are
interleaved round by round; the ratios are medians of per-round ratios against gpt2. Where other jobs share the
machine, the upper quartile of the steps' own tokens/s ("steps vs gpt2") is the steadier comparison.

    .venv/bin/python tests/benchmarks/bench_families.py                       # about 5 minutes on 2 cores
    .venv/bin/python tests/benchmarks/bench_families.py --records 120 --repeats 1 --out /tmp/families.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_training import prepare_data  # noqa: E402  (the sample, prepared into the work folder)

CONFIGS = ("gpt2", "llama-config", "llama-params")


def build_models(work: Path, datasets_dir: Path) -> dict[str, Path]:
    """theta-tiny and the two Llamas (same tokenizer, seeded weights), as model folders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.model.theta_model import ThetaModel, build_tiny_model

    tiny = build_tiny_model(work / "gpt2", datasets_dir)
    gpt2 = ThetaModel.load(tiny, device="cpu")
    tok, g = gpt2.tokenizer, gpt2.model.config
    target = gpt2.num_parameters()
    base = dict(hidden_size=g.n_embd, num_hidden_layers=g.n_layer, num_attention_heads=g.n_head,
                num_key_value_heads=g.n_head, max_position_embeddings=g.n_positions, vocab_size=len(tok),
                tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)

    def llama_params(intermediate: int) -> int:
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**base, intermediate_size=intermediate))
                   .parameters())

    # parameters grow by 3 x layers x hidden per unit of intermediate size: solve from one build
    at_4c = llama_params(4 * g.n_embd)
    matched = 4 * g.n_embd - round((at_4c - target) / (3 * g.n_layer * g.n_embd))
    out = {"gpt2": tiny}
    for name, intermediate in (("llama-config", 4 * g.n_embd), ("llama-params", matched)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**base, intermediate_size=intermediate))
        ThetaModel.from_parts(model, tok, device="cpu").save(work / name)
        out[name] = work / name
    return out


def epoch_tokens(model_dir: Path, data: Path, max_length: int) -> int:
    from src.model.theta_model import ThetaModel
    from src.training.lm_data import TokenizedDataset, load_prepared_records

    tok = ThetaModel.load(model_dir, device="cpu").tokenizer
    train = [r for r in load_prepared_records(data) if r.get("split", "train") == "train"]
    return sum(len(e["input_ids"]) for e in TokenizedDataset(train, tok, max_length).examples)


def epoch_rate(model_dir: Path, data: Path, datasets_dir: Path, out: Path, epochs: int, args) -> tuple[float, float]:
    """Training tokens/s over every optimizer step of ``epochs`` whole epochs of one run, and the upper quartile of
    the steps' own tokens/s (the steps other jobs on the machine slowed least)."""
    import src.training.train_enhanced as te

    argv = ["--model_name", str(model_dir), "--data_path", str(data), "--datasets_dir", str(datasets_dir),
            "--output_dir", str(out), "--epochs", str(epochs), "--batch_size", str(args.batch_size),
            "--max_length", str(args.max_length), "--learning_rate", "5e-4", "--num_samples", "0",
            "--domain_eval_frequency", "0", "--seed", "1", "--device", "cpu", "--precision", "fp32",
            "--no_progress_bar", "--resume", "never", "--patience", "10"]
    summary = te.train(te.parse_args(argv))
    if summary["exit_code"] != 0:
        raise RuntimeError(f"{model_dir.name}: exit {summary['exit_code']}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x][1:]
    tokens = sum(s["tokens_per_sec"] * s["ms"] / 1000 for s in steps)
    return tokens / (sum(s["ms"] for s in steps) / 1000), statistics.quantiles([s["tokens_per_sec"] for s in steps],
                                                                                n=4)[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--records", type=int, default=200, help="training records sampled from the prepared sample")
    p.add_argument("--batch_size", type=int, default=8, help="micro-batch")
    p.add_argument("--max_length", type=int, default=256, help="longest record in tokens")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets" / "sample", help="raw data")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    import logging

    logging.disable(logging.INFO)  # the trainer's step lines: not the benchmark's output
    with tempfile.TemporaryDirectory(prefix="bench_families_") as tmp:
        work = Path(tmp)
        data, how = prepare_data(work, args.datasets_dir, records=args.records)
        models = build_models(work, args.datasets_dir)
        from src.model.theta_model import ThetaModel

        params = {n: ThetaModel.load(d, device="cpu").num_parameters() for n, d in models.items()}
        tokens = {n: epoch_tokens(d, data, args.max_length) for n, d in models.items()}
        rounds: list[dict[str, float]] = []
        for r in range(args.repeats):
            row = {}
            for name in CONFIGS:
                row[name], row[name + " (upper-quartile step)"] = epoch_rate(models[name], data, args.datasets_dir,
                                                                             work / f"{name}_{r}", 2, args)
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in row.items()), flush=True)
    q = " (upper-quartile step)"
    result = {"data": how, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "parameters": params, "epoch_tokens": tokens,
              "tokens_per_sec": {n: statistics.median(r[n] for r in rounds) for n in CONFIGS},
              "ratio_vs_gpt2": {n: statistics.median(r[n] / r["gpt2"] for r in rounds) for n in CONFIGS},
              "step_ratio_vs_gpt2": {n: statistics.median(r[n + q] / r["gpt2" + q] for r in rounds) for n in CONFIGS},
              "rounds": rounds}
    print(f"\n{'model':<14}{'parameters':>12}{'tokens/s':>12}{'vs gpt2':>10}{'steps vs gpt2':>15}")
    for n in CONFIGS:
        print(f"{n:<14}{params[n] / 1e6:>11.2f}M{result['tokens_per_sec'][n]:>12,.0f}"
              f"{result['ratio_vs_gpt2'][n]:>10.2f}{result['step_ratio_vs_gpt2'][n]:>15.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
