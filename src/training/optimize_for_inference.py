"""Optimise a trained model for inference, measure what it changed, and keep a change only when it pays.

``--quantize auto`` (the default, what the overnight scripts run) tries the weight formats that can be faster on
the device the model will run on (``--device``, default: CUDA when present, else the CPU), measures each one
against the fp32 original on that same device, and keeps the fastest that is at least ``--min_speedup`` times
as fast *and* within the perplexity gate (``--max_perplexity_increase``); when none is, it keeps fp32. The
candidates:
- on the CPU: int8 dynamic quantisation of every linear layer of the decoder layers, for every supported family
  (GPT-2's ``Conv1D`` layers are converted to ``nn.Linear`` first: torch's quantiser does not see them otherwise;
  embeddings, norms and the LM head stay fp32);
- on CUDA: fp16 and (where the GPU supports it) bf16 weights, half the size on disk.
The choice and why (both measurements of every candidate) go to the log and to ``optimization_metrics.json``.

``--quantize int8`` or ``--quantize none`` with ``--dtype``/``--prune_sparsity`` apply exactly what is asked;
a result whose perplexity rose by more than ``--max_perplexity_increase`` is refused (exit 2, nothing written)
unless ``--force``. Magnitude pruning (``--prune_sparsity``) comes first and also applies under auto.

The result goes to ``theta_inference/`` next to the model, with the tokenizer files and chat template of the
model folder it was made from: a normal Hugging Face folder (fp32/fp16/bf16) that other tools open too, or for
int8 the config, tokenizer, ``quantized_model.pt``, a README and the marker ``theta_quantization.json`` (formats in
src/model/quantization.py), which only Theta opens (``"loads_with": "theta"`` in the metrics, which then name the
original folder for other tools; documentation/INTEROP.md). ``ThetaModel.load``, and so the chat command, loads
every one of them.
``optimization_metrics.json`` in it holds the size on disk, generation latency and tokens per second, and
test-set perplexity, before and after (same prompts, same settings), plus every candidate measured.

    python src/training/optimize_for_inference.py --model_path models/<run>/theta_final
    python -m src.training.optimize_for_inference --model_path models/<run>/theta_final --device cpu
    python -m src.training.optimize_for_inference --model_path models/<run>/theta_final --quantize int8
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from src.model.interop import keep_source_tokenizer
from src.model.quantization import LOADS_WITH, QUANTIZED_MARKER, decoder_layers, quantize_blocks_int8, save_quantized
from src.model.theta_model import ThetaModel, check_model_folder, resolve_device
from src.utils.common import (PROJECT_ROOT, FlagParser, UserError, atomic_dir, atomic_write_json,
                              remove_stale_temporaries, run_entry_point, setup_logging)
from src.utils.run_lock import lock_outputs, release_locks

logger = logging.getLogger(__name__)

BENCH_PROMPTS = ["What is a firewall?", "How do I reverse a list in Python?", "What does DNS do?"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Magnitude pruning (int8 surgery: src/model/quantization.py)
# ---------------------------------------------------------------------------------------------------------------

def block_linear_layers(model: PreTrainedModel) -> list[tuple[str, nn.Module]]:
    """The weight layers of the decoder layers: Conv1D or nn.Linear (GPT-2: qkv, out, MLP in/out, 4 per layer;
    Llama-style: q, k, v, o, gate, up, down, 7; Phi-3's fused qkv and gate-up: 4)."""
    _, layers = decoder_layers(model)
    return [(n, m) for n, m in layers.named_modules() if isinstance(m, (Conv1D, nn.Linear))]


def prune_blocks(model: PreTrainedModel, sparsity: float) -> float:
    """Zero the smallest-magnitude ``sparsity`` fraction of each block layer's weights; returns the overall sparsity.

    Unstructured L1 pruning per layer (Han et al., 2015, "Learning both Weights and Connections"). It makes
    the weights compressible, not faster: dense kernels multiply the zeros too. Without fine-tuning afterwards,
    more than ~30% usually costs perplexity, which the refusal threshold catches.
    """
    import torch.nn.utils.prune as prune

    zeros = total = 0
    for _, layer in block_linear_layers(model):
        prune.l1_unstructured(layer, "weight", amount=sparsity)
        prune.remove(layer, "weight")  # make it permanent: a plain weight tensor with zeros
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    return zeros / max(total, 1)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------

def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@torch.no_grad()
def measure_generation(tm: ThetaModel, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    """Greedy generation of exactly ``max_new_tokens`` per prompt (end-of-text suppressed, so both models do the
    same work), ``repeats`` times after one warm-up.

    ``tokens_per_sec`` is ``max_new_tokens`` over the median latency: on a shared machine one slow outlier
    (another process waking up) moves a mean a lot and a median hardly at all. The mean is kept too.
    """
    model, tok = tm.model, tm.tokenizer
    model.eval()
    stops = tm.prompt_format.stop_ids(model.generation_config)  # all suppressed by min_new_tokens
    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=stops, pad_token_id=tok.pad_token_id)  # every stop suppressed
    # the prompts as the model's format writes them (Q&A, or its chat template)
    encoded = [{"input_ids": torch.tensor([ids], device=tm.device),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=tm.device)}
               for ids in tm.prompt_format.encode_prompts([{"question": p} for p in prompts])]
    model.generate(**encoded[0], generation_config=GenerationConfig(
        max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id))  # warm-up: kernels, allocator
    latencies, tokens = [], 0
    for _ in range(repeats):
        for enc in encoded:
            if tm.device.type == "cuda":
                torch.cuda.synchronize(tm.device)
            start = time.perf_counter()
            out = model.generate(**enc, generation_config=gen)
            if tm.device.type == "cuda":
                torch.cuda.synchronize(tm.device)
            latencies.append(time.perf_counter() - start)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    median = statistics.median(latencies)
    return {"median_latency_s": median, "mean_latency_s": statistics.fmean(latencies),
            "tokens_per_sec": tokens / len(latencies) / median if median > 0 else 0.0,
            "new_tokens": tokens, "generations": len(latencies)}


def measure_paired(reference: ThetaModel, candidate: ThetaModel, args: argparse.Namespace) -> tuple[dict, dict]:
    """Generation speed of ``reference`` and ``candidate`` in alternating rounds (one prompt set each, ``repeats``
    rounds): ``(reference figures, candidate figures)``, each the median over its rounds.

    Why paired: measured one after the other, a change in the machine's load between the two runs decides the
    comparison (on a shared 2-core machine the same theta-tiny pair read x0.39 under load and x1.09 when quiet).
    Alternating rounds expose both models to the same load.
    """
    rounds: tuple[list[dict], list[dict]] = ([], [])
    for _ in range(args.repeats):
        for side, tm in enumerate((reference, candidate)):
            rounds[side].append(measure_generation(tm, BENCH_PROMPTS, args.max_new_tokens, 1))

    def merged(rs: list[dict]) -> dict:
        return {"median_latency_s": statistics.median(r["median_latency_s"] for r in rs),
                "mean_latency_s": statistics.fmean(r["mean_latency_s"] for r in rs),
                "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in rs),
                "new_tokens": sum(r["new_tokens"] for r in rs), "generations": sum(r["generations"] for r in rs),
                "rounds": len(rs)}

    return merged(rounds[0]), merged(rounds[1])


def measure_perplexity(tm: ThetaModel, records: list[dict], batch_size: int, max_length: int) -> dict:
    from src.training.evaluate_model import teacher_forced_metrics

    m = teacher_forced_metrics(tm, records, batch_size, max_length)
    return {"perplexity": m["perplexity"], "loss": m["loss"], "token_accuracy": m["token_accuracy"],
            "answer_tokens": m["tokens"]}




# ---------------------------------------------------------------------------------------------------------------
# Candidates and the choice
# ---------------------------------------------------------------------------------------------------------------

def auto_candidates(device: torch.device, bf16_supported: bool | None = None) -> list[str]:
    """The formats ``--quantize auto`` tries for ``device``, besides fp32: int8 on the CPU (its kernels are CPU
    only), fp16 and bf16 on CUDA (bf16 only where the GPU has it; Ampere and later)."""
    if device.type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return ["fp16", "bf16"] if bf16_supported else ["fp16"]
    if device.type == "cpu":
        return ["int8"]
    return []


def judge(name: str, trial: dict, base: dict, min_speedup: float, max_increase: float) -> tuple[bool, str]:
    """Whether a measured candidate is worth keeping over fp32, and a sentence with both measurements. The speed
    is compared with the fp32 speed measured alongside it (``fp32_tokens_per_sec``) when there is one."""
    fp32_speed = trial.get("fp32_tokens_per_sec", base["tokens_per_sec"])
    speedup = trial["tokens_per_sec"] / fp32_speed if fp32_speed else 0.0
    change = trial["perplexity"] / base["perplexity"] - 1
    figures = (f"{name} {trial['tokens_per_sec']:.1f} vs fp32 {fp32_speed:.1f} tokens/s on "
               f"{trial['device']} (x{speedup:.2f}), perplexity {base['perplexity']:.3f} -> "
               f"{trial['perplexity']:.3f} ({100 * change:+.2f}%)")
    if change > max_increase:
        return False, f"{figures}: perplexity rose by more than {100 * max_increase:g}%"
    if speedup < min_speedup:
        return False, f"{figures}: not faster by the x{min_speedup:.2f} asked"
    return True, f"{figures}: faster and within the {100 * max_increase:g}% perplexity gate"


def choose(trials: dict[str, dict], base: dict, min_speedup: float, max_increase: float) -> tuple[str, str, dict]:
    """``(chosen format, reason, {format: (kept?, why)})``: the fastest candidate that passes, else fp32."""
    verdicts = {name: judge(name, t, base, min_speedup, max_increase) for name, t in trials.items()}
    passing = [name for name, (ok, _) in verdicts.items() if ok]
    if passing:
        best = max(passing, key=lambda n: trials[n]["tokens_per_sec"])
        return best, f"kept {best}: {verdicts[best][1]}", verdicts
    if not trials:
        return "fp32", "kept fp32: no faster format to try on this device", verdicts
    return "fp32", "kept fp32: " + "; ".join(why for _, why in verdicts.values()), verdicts


# ---------------------------------------------------------------------------------------------------------------
# The optimisation
# ---------------------------------------------------------------------------------------------------------------

def write_format(tm: ThetaModel, fmt: str, folder: Path, meta: dict, source: Path | None = None) -> int:
    """Write ``tm`` (left unchanged) to ``folder`` in format ``fmt``; returns the number of int8 layers.
    ``source``, the model folder ``tm`` was loaded from, gives the new folder its tokenizer files and chat
    template (and, for int8, is the folder its README names for other tools)."""
    model = copy.deepcopy(tm.model)
    if fmt == "int8":
        model.to("cpu")
        where, _ = decoder_layers(model)
        layers = quantize_blocks_int8(model)
        model.config.use_cache = True
        save_quantized(model, tm.tokenizer, folder,
                       {**meta, "method": "dynamic_int8", "layers": layers,
                        "scope": f"every nn.Linear of {where} (Conv1D converted); embeddings, norms, LM head fp32",
                        "torch": torch.__version__}, source=str(source) if source else None)
    else:
        layers = 0
        model.to(DTYPES[fmt])
        model.config.use_cache = True
        ThetaModel.from_parts(model, tm.tokenizer, device=model.device, prompt_format=tm.prompt_format).save(folder)
    if source is not None:
        keep_source_tokenizer(source, folder, tm.tokenizer)
    return layers


def measure(tm: ThetaModel, records: list[dict], args: argparse.Namespace) -> dict:
    """Test-set perplexity and generation speed of one model, as the metrics file records them."""
    return {"perplexity": measure_perplexity(tm, records, args.batch_size, args.max_length),
            "generation": measure_generation(tm, BENCH_PROMPTS, args.max_new_tokens, args.repeats)}


def _summary(name: str, m: dict, device: torch.device, size: int | None) -> dict:
    out = {"format": name, "device": str(device), "tokens_per_sec": m["generation"]["tokens_per_sec"],
           "perplexity": m["perplexity"]["perplexity"], "size_bytes": size}
    if "fp32_generation" in m:  # the fp32 speed measured in the same alternating rounds
        out["fp32_tokens_per_sec"] = m["fp32_generation"]["tokens_per_sec"]
    return out


def optimize(args: argparse.Namespace) -> dict:
    """Optimise, measure, choose (auto) or check (explicit), then move the new folder into place; returns the
    metrics (also written into the folder)."""
    from src.training.evaluate_model import load_test_records

    model_path = Path(args.model_path)
    check_model_folder(model_path)
    if (model_path / QUANTIZED_MARKER).is_file():
        raise UserError(f"--model_path {model_path} is already int8-quantised; optimise the original model "
                        "(e.g. models/<run>/theta_final)")
    output = Path(args.output_path or model_path.parent / "theta_inference")
    if output.resolve() == model_path.resolve():
        raise UserError("--output_path must differ from --model_path (the original is the reference)")
    records = load_test_records(Path(args.test_data))
    if args.max_eval_records:
        records = records[:args.max_eval_records]
    device = resolve_device(args.device)

    original = ThetaModel.load(model_path, device=device)
    logger.info("measuring the original (fp32 on %s): %d test records, %d prompts x %d repeats x %d tokens", device,
                len(records), len(BENCH_PROMPTS), args.repeats, args.max_new_tokens)
    base = measure(original, records, args)
    achieved_sparsity = prune_blocks(original.model, args.prune_sparsity) if args.prune_sparsity > 0 else 0.0
    if args.quantize == "auto":
        plan = ["fp32"] + auto_candidates(device)
    else:
        plan = ["int8" if args.quantize == "int8" else args.dtype]
    if args.dtype != "fp32" and device.type == "cpu":
        logger.warning("%s on CPU: half the size on disk, but CPUs without %s units compute it far more slowly "
                       "than fp32 (ThetaModel.load computes such a folder in fp32 on the CPU)", args.dtype, args.dtype)

    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        measured, layers = {}, {}
        meta = {"prune_sparsity": args.prune_sparsity}
        for fmt in plan:
            if fmt == "fp32" and args.quantize == "auto" and not achieved_sparsity:
                measured[fmt], layers[fmt] = base, 0  # the original weights: its measurement is the baseline
                continue  # and it is written only if nothing else is kept
            layers[fmt] = write_format(original, fmt, staging / fmt, meta, source=model_path)
            # Measured as chat would load it, from the saved folder: that also proves it loads.
            after = ThetaModel.load(staging / fmt, device=device)
            logger.info("measuring %s on %s", fmt, after.device)
            reference, generation = measure_paired(original, after, args)
            measured[fmt] = {"perplexity": measure_perplexity(after, records, args.batch_size, args.max_length),
                             "generation": generation, "fp32_generation": reference, "device": after.device}
            del after
        metrics = _decide(args, plan, measured, base, device, staging, model_path, output, layers,
                          achieved_sparsity, len(records))
        chosen = staging / metrics["chosen"]
        if not chosen.exists():  # the unchanged original, kept
            write_format(original, metrics["chosen"], chosen, meta, source=model_path)
            metrics["size_bytes"]["after"] = folder_size(chosen)
            metrics["size_bytes"]["ratio"] = metrics["size_bytes"]["after"] / max(metrics["size_bytes"]["before"], 1)
        del original
        atomic_write_json(chosen / "optimization_metrics.json", metrics)
        _publish(chosen, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _decide(args, plan, measured, base, device, staging, model_path, output, layers, achieved_sparsity,
            n_records) -> dict:
    """Pick the format (auto) or check the one asked for; the metrics dict of the result. Raises UserError when the
    result fails the perplexity gate and ``--force`` is not given."""
    base_s = _summary("fp32", base, device, None)
    trials = {f: _summary(f, m, m.get("device", device), folder_size(staging / f) if (staging / f).exists()
                          else folder_size(model_path)) for f, m in measured.items()}
    if args.quantize == "auto":
        fallback = trials.pop("fp32")
        chosen, reason, verdicts = choose(trials, base_s, args.min_speedup, args.max_perplexity_increase)
        trials["fp32"] = fallback
    else:
        chosen = plan[0]
        reason = f"as asked (--quantize {args.quantize} --dtype {args.dtype})"
        verdicts = {chosen: judge(chosen, trials[chosen], base_s, 0.0, args.max_perplexity_increase)}
    after = measured[chosen]
    change = after["perplexity"]["perplexity"] / base["perplexity"]["perplexity"] - 1
    if change > args.max_perplexity_increase:
        message = (f"perplexity got worse by {change:.1%} ({base['perplexity']['perplexity']:.3f} -> "
                   f"{after['perplexity']['perplexity']:.3f}), more than --max_perplexity_increase "
                   f"{args.max_perplexity_increase:.1%}")
        if not args.force:
            raise UserError(f"{message}: nothing written to {output}. Use milder settings (less "
                            "--prune_sparsity, --quantize none) or --force to write it anyway.")
        logger.warning("%s; writing it anyway (--force)", message)
    for fmt, trial in trials.items():
        trial.update(kept=fmt == chosen, why=verdicts[fmt][1] if fmt in verdicts else
                     "the fallback: fp32 weights, kept when no other format passes")
    logger.info("%s", reason)
    gen_b, gen_a = base["generation"], after["generation"]
    size = {"before": folder_size(model_path), "after": trials[chosen]["size_bytes"]}
    size["ratio"] = size["after"] / max(size["before"], 1)
    return {
        "model_path": str(model_path), "output_path": str(output), "quantize": args.quantize, "chosen": chosen,
        "reason": reason, "candidates": trials, "dtype": "fp32" if chosen == "int8" else chosen,
        "rule": {"min_speedup": args.min_speedup, "max_perplexity_increase": args.max_perplexity_increase,
                 "compared_with": f"the fp32 original on {device}"},
        "prune_sparsity": args.prune_sparsity, "achieved_sparsity": achieved_sparsity,
        "quantized_layers": layers[chosen], "device": str(after.get("device", device)),
        "torch_threads": torch.get_num_threads(), "size_bytes": size,
        "generation": {"before": gen_b, "after": gen_a,
                       "speedup": gen_a["tokens_per_sec"] / gen_b["tokens_per_sec"] if gen_b["tokens_per_sec"] else None,
                       "settings": {"prompts": BENCH_PROMPTS, "max_new_tokens": args.max_new_tokens,
                                    "decoding": "greedy, exactly max_new_tokens (end-of-text suppressed)",
                                    "tokens_per_sec": "max_new_tokens / median latency", "repeats": args.repeats}},
        "perplexity": {"before": base["perplexity"], "after": after["perplexity"], "relative_change": change,
                       "max_increase": args.max_perplexity_increase, "test_data": str(args.test_data),
                       "records": n_records},
        "forced": bool(args.force), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **opened_by(chosen, model_path),
    }


def opened_by(fmt: str, model_path: Path) -> dict:
    """What opens the written folder: ``loads_with`` ``"theta"`` for int8 (torch's eager quantised modules, which
    transformers does not read) with the folder other tools should use, ``"transformers"`` for the others."""
    if fmt == "int8":
        return {"loads_with": LOADS_WITH,
                "other_tools": f"this int8 folder opens only with ThetaModel.load (CPU); for transformers, pipeline, "
                               f"lm-evaluation-harness, peft or llama.cpp use {model_path} "
                               "(documentation/INTEROP.md)"}
    return {"loads_with": "transformers",
            "other_tools": "a Hugging Face folder: AutoModelForCausalLM, pipeline, lm-evaluation-harness and "
                           "llama.cpp's convert_hf_to_gguf.py open it (documentation/INTEROP.md)"}


def _publish(folder: Path, output: Path) -> None:
    """Put the finished ``folder``'s files in place of ``output`` through ``atomic_dir`` (fsynced; ``output`` is
    never absent: the old one is swapped out in one rename and removed after), with the user's umask modes."""
    with atomic_dir(output) as tmp:
        for entry in folder.iterdir():
            os.replace(entry, tmp / entry.name)  # same file system: a rename, no copy (atomic_dir sets the modes)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = FlagParser(description="Optimise a Theta model for inference and measure the change.")
    io = p.add_argument_group("input and output")
    io.add_argument("--model_path", type=Path, required=True, help="model folder, e.g. models/<run>/theta_final")
    io.add_argument("--output_path", type=Path, default=None, help="default: theta_inference/ next to the model")
    io.add_argument("--test_data", type=Path, default=None,
                    help="test set for perplexity before/after (default: the held-out set data preparation uses, "
                         "see python -m src.utils.data_layout)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--quantize", choices=["auto", "none", "int8"], default="auto",
                     help="auto (default): try int8 on the CPU, fp16/bf16 on CUDA, keep one only when measured "
                          "faster and within the perplexity gate, else fp32; int8: dynamic quantisation of every "
                          "block linear layer (CPU inference); none: keep fp32 (or --dtype)")
    opt.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                     help="weight dtype of the saved model with --quantize none (auto picks it itself)")
    opt.add_argument("--min_speedup", type=float, default=1.05,
                     help="auto keeps a format only when it is at least this many times as fast as fp32 "
                          "(default 1.05: a margin over measurement noise)")
    opt.add_argument("--prune_sparsity", type=float, default=0.0,
                     help="fraction of block weights zeroed by magnitude, in [0, 1) (default 0: no pruning)")
    opt.add_argument("--max_perplexity_increase", type=float, default=0.05,
                     help="refuse a result whose test perplexity rose by more than this fraction (default 0.05)")
    opt.add_argument("--force", action="store_true", help="write the result even when perplexity got worse")
    ms = p.add_argument_group("measurement")
    ms.add_argument("--device", type=str, default="auto",
                    help="where the model will run and is measured: auto (CUDA when present, else cpu), cpu, "
                         "cuda or cuda:N (default auto)")
    ms.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated per measured prompt")
    ms.add_argument("--repeats", type=int, default=3, help="measured repetitions of the prompt set")
    ms.add_argument("--batch_size", type=int, default=8, help="records per perplexity forward pass")
    ms.add_argument("--max_length", type=int, default=512, help="longest perplexity sequence in tokens")
    ms.add_argument("--max_eval_records", type=int, default=0, help="first N test records only (0 = all)")
    args = p.parse_args(argv)
    device = resolve_device(args.device) if args.device == "auto" or args.device.startswith(("cpu", "cuda")) \
        else None
    for bad, message in [(device is None, f"--device {args.device}: use auto, cpu, cuda or cuda:N"),
                         (args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
                         (args.repeats < 1, "--repeats must be at least 1"),
                         (args.batch_size < 1, "--batch_size must be at least 1"),
                         (args.max_length < 8, "--max_length must be at least 8"),
                         (args.max_eval_records < 0, "--max_eval_records must be >= 0"),
                         (args.min_speedup <= 0, "--min_speedup must be > 0"),
                         (not 0 <= args.prune_sparsity < 1, "--prune_sparsity must be in [0, 1)"),
                         (args.max_perplexity_increase < 0, "--max_perplexity_increase must be >= 0"),
                         (args.quantize == "auto" and args.dtype != "fp32",
                          "--quantize auto picks the dtype itself: give --dtype only with --quantize none"),
                         (args.quantize == "int8" and args.dtype != "fp32",
                          "--quantize int8 needs --dtype fp32 (int8 kernels take fp32 activations)"),
                         (args.quantize == "int8" and device is not None and device.type != "cpu",
                          "--quantize int8 runs on the CPU only: use --device cpu")]:
        if bad:
            p.error(message)
    if args.test_data is None:
        from src.utils.data_layout import resolve_test_set

        args.test_data = resolve_test_set(PROJECT_ROOT / "Datasets")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    # Not while the run is training (or being evaluated or optimised), and one writer per output folder.
    output = Path(args.output_path or Path(args.model_path).parent / "theta_inference")
    locks = lock_outputs("optimisation", reads=[args.model_path], writes=[output])
    try:
        remove_stale_temporaries(output.parent, names=[output.name])  # what a killed optimisation left
        return _optimize_and_log(args)
    finally:
        release_locks(locks)


def _optimize_and_log(args: argparse.Namespace) -> int:
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the log lines
    m = optimize(args)
    g, s, ppl = m["generation"], m["size_bytes"], m["perplexity"]
    logger.info("wrote %s (%s, sparsity %.2f): %.1f MB -> %.1f MB | %.1f -> %.1f tokens/s (x%.2f) | "
                "perplexity %.3f -> %.3f (%+.2f%%)", m["output_path"], m["chosen"], m["achieved_sparsity"],
                s["before"] / 1e6, s["after"] / 1e6, g["before"]["tokens_per_sec"], g["after"]["tokens_per_sec"],
                g["speedup"] or 0.0, ppl["before"]["perplexity"], ppl["after"]["perplexity"],
                100 * ppl["relative_change"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
