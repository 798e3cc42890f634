"""Optimise a trained model for inference, measure what it changed, and refuse a change that hurt the model.

Three optional steps, in this order: magnitude pruning of the block weights (``--prune_sparsity``), a weight
dtype (``--dtype``), and int8 dynamic quantisation of every linear layer of the transformer blocks
(``--quantize int8``). GPT-2's block layers are ``transformers`` ``Conv1D`` modules (a linear layer with the weight
stored transposed) that torch's quantiser does not recognise, so they are converted to ``nn.Linear`` first;
otherwise only the LM head would be quantised.

The result goes to ``theta_inference/`` next to the model: a normal Hugging Face folder, or for int8 the config,
tokenizer and ``quantized_model.pt`` plus the marker ``theta_quantization.json``, which ``ThetaModel.load`` (and
so the chat command) recognises and rebuilds. ``optimization_metrics.json`` in it holds the size on disk,
generation latency and tokens per second before and after (same prompts, same settings) and test-set
perplexity before and after. A perplexity that got worse by more than ``--max_perplexity_increase`` is refused
(exit 2, nothing written) unless ``--force``.

    python src/training/optimize_for_inference.py --model_path models/<run>/theta_final
    python -m src.training.optimize_for_inference --model_path models/<run>/theta_final --quantize int8
    python -m src.training.optimize_for_inference --model_path models/<run>/theta_final --dtype fp16 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from src.model.theta_model import (QUANTIZED_MARKER, QUANTIZED_WEIGHTS, ThetaModel, check_model_folder,
                                   split_prompt)
from src.utils.common import PROJECT_ROOT, UserError, atomic_write_json, run_entry_point, setup_logging

logger = logging.getLogger(__name__)

BENCH_PROMPTS = ["What is a firewall?", "How do I reverse a list in Python?", "What does DNS do?"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZATION_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# Model surgery: Conv1D -> Linear, int8 dynamic quantisation, magnitude pruning
# ---------------------------------------------------------------------------------------------------------------

def conv1d_to_linear(module: nn.Module) -> int:
    """Replace every ``Conv1D`` under ``module`` by an equal ``nn.Linear`` (in place); returns how many.

    ``Conv1D`` computes ``x @ W + b`` with W of shape (in, out); ``nn.Linear`` stores (out, in), hence the
    transpose. The outputs are identical.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            n_in, n_out = child.weight.shape
            linear = nn.Linear(n_in, n_out, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
            count += 1
        else:
            count += conv1d_to_linear(child)
    return count


@contextmanager
def _quiet_quantization_warnings():
    """torch 2.13 marks torch.ao.quantization deprecated (its successor, torchao, is another package); the eager
    dynamic quantiser still works and is what the issue asks for, so its deprecation notices are not repeated
    on every run and every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        yield


def quantize_blocks_int8(model: GPT2LMHeadModel) -> int:
    """int8 dynamic quantisation of every linear layer of the transformer blocks (in place); returns how many.

    Dynamic quantisation stores weights as int8 with one scale per tensor and quantises activations on the fly,
    per batch: no calibration data, CPU only (fbgemm/onednn kernels). Embeddings, layer norms and the LM head
    (tied to the token embeddings) stay fp32: quantising the head would untie it and it is the most
    precision-sensitive layer.
    """
    from torch.ao.quantization import quantize_dynamic

    model.eval()
    conv1d_to_linear(model.transformer.h)
    with _quiet_quantization_warnings():
        model.transformer.h = quantize_dynamic(model.transformer.h, {nn.Linear}, dtype=torch.qint8)
    return sum(1 for m in model.transformer.h.modules() if _is_quantized_linear(m))


def _is_quantized_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return isinstance(module, DynamicQuantizedLinear)


def block_linear_layers(model: GPT2LMHeadModel) -> list[tuple[str, nn.Module]]:
    """The weight layers of the blocks: Conv1D or nn.Linear (attention qkv/out, MLP in/out: 4 per block)."""
    return [(n, m) for n, m in model.transformer.h.named_modules() if isinstance(m, (Conv1D, nn.Linear))]


def prune_blocks(model: GPT2LMHeadModel, sparsity: float) -> float:
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


def save_quantized(tm: ThetaModel, path: Path, meta: dict) -> Path:
    """An int8 folder: config, generation config, tokenizer, the quantised state dict and the marker file."""
    path.mkdir(parents=True, exist_ok=True)
    tm.model.config.save_pretrained(path)
    tm.model.generation_config.save_pretrained(path)
    tm.tokenizer.save_pretrained(path)
    with _quiet_quantization_warnings():
        torch.save(tm.model.state_dict(), path / QUANTIZED_WEIGHTS)
    atomic_write_json(path / QUANTIZED_MARKER, {"format": QUANTIZATION_FORMAT, **meta})
    return path


def load_quantized_model(path: Path) -> GPT2LMHeadModel:
    """Rebuild a folder written by :func:`save_quantized`: the same architecture, quantised the same way, then
    the saved int8 weights. Used by ``ThetaModel.load``."""
    config = GPT2Config.from_pretrained(path)
    model = GPT2LMHeadModel(config)  # random init, overwritten below
    quantize_blocks_int8(model)
    with _quiet_quantization_warnings():
        state = torch.load(path / QUANTIZED_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


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
    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    encoded = [tok(split_prompt(p)[0], return_tensors="pt").to(tm.device) for p in prompts]
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


def measure_perplexity(tm: ThetaModel, records: list[dict], batch_size: int, max_length: int) -> dict:
    from src.training.evaluate_model import teacher_forced_metrics

    m = teacher_forced_metrics(tm, records, batch_size, max_length)
    return {"perplexity": m["perplexity"], "loss": m["loss"], "token_accuracy": m["token_accuracy"],
            "answer_tokens": m["tokens"]}


# ---------------------------------------------------------------------------------------------------------------
# The optimisation
# ---------------------------------------------------------------------------------------------------------------

def optimize(args: argparse.Namespace) -> dict:
    """Optimise, measure, check, then move the new folder into place; returns the metrics (also in the folder)."""
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

    before = ThetaModel.load(model_path, device=args.device)
    logger.info("measuring the original: %d test records, %d prompts x %d repeats x %d tokens", len(records),
                len(BENCH_PROMPTS), args.repeats, args.max_new_tokens)
    ppl_before = measure_perplexity(before, records, args.batch_size, args.max_length)
    gen_before = measure_generation(before, BENCH_PROMPTS, args.max_new_tokens, args.repeats)

    # --- change the model (the loaded copy; the original folder is untouched) ------------------------------------
    model = before.model
    achieved_sparsity = prune_blocks(model, args.prune_sparsity) if args.prune_sparsity > 0 else 0.0
    if args.dtype != "fp32":
        if before.device.type == "cpu":
            logger.warning("%s on CPU: half the size on disk, but CPUs without %s units compute it far more "
                           "slowly than fp32", args.dtype, args.dtype)
        model.to(DTYPES[args.dtype])
    quantized_layers = quantize_blocks_int8(model) if args.quantize == "int8" else 0
    model.config.use_cache = True

    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        meta = {"method": "dynamic_int8", "scope": "every nn.Linear of transformer.h (Conv1D converted)",
                "layers": quantized_layers, "prune_sparsity": args.prune_sparsity, "torch": torch.__version__}
        if quantized_layers:
            save_quantized(before, staging, meta)
        else:
            before.save(staging)
        del before, model
        # The "after" figures come from the saved folder, loaded as chat would load it: that also proves it loads.
        after = ThetaModel.load(staging, device=args.device)
        ppl_after = measure_perplexity(after, records, args.batch_size, args.max_length)
        gen_after = measure_generation(after, BENCH_PROMPTS, args.max_new_tokens, args.repeats)
        change = ppl_after["perplexity"] / ppl_before["perplexity"] - 1
        metrics = {
            "model_path": str(model_path), "output_path": str(output), "quantize": args.quantize,
            "dtype": args.dtype, "prune_sparsity": args.prune_sparsity, "achieved_sparsity": achieved_sparsity,
            "quantized_layers": quantized_layers, "device": str(after.device), "torch_threads": torch.get_num_threads(),
            "size_bytes": {"before": folder_size(model_path), "after": folder_size(staging)},
            "generation": {"before": gen_before, "after": gen_after,
                           "speedup": gen_after["tokens_per_sec"] / gen_before["tokens_per_sec"]
                           if gen_before["tokens_per_sec"] else None,
                           "settings": {"prompts": BENCH_PROMPTS, "max_new_tokens": args.max_new_tokens,
                                        "decoding": "greedy, exactly max_new_tokens (end-of-text suppressed)",
                                        "tokens_per_sec": "max_new_tokens / median latency",
                                        "repeats": args.repeats}},
            "perplexity": {"before": ppl_before, "after": ppl_after, "relative_change": change,
                           "max_increase": args.max_perplexity_increase, "test_data": str(args.test_data),
                           "records": len(records)},
            "forced": bool(args.force), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        metrics["size_bytes"]["ratio"] = metrics["size_bytes"]["after"] / max(metrics["size_bytes"]["before"], 1)
        if change > args.max_perplexity_increase:
            message = (f"perplexity got worse by {change:.1%} ({ppl_before['perplexity']:.3f} -> "
                       f"{ppl_after['perplexity']:.3f}), more than --max_perplexity_increase "
                       f"{args.max_perplexity_increase:.1%}")
            if not args.force:
                raise UserError(f"{message}: nothing written to {output}. Use milder settings (less "
                                "--prune_sparsity, --quantize none) or --force to write it anyway.")
            logger.warning("%s; writing it anyway (--force)", message)
        atomic_write_json(staging / "optimization_metrics.json", metrics)
        del after
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        if output.exists():
            os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Optimise a Theta model for inference and measure the change.")
    io = p.add_argument_group("input and output")
    io.add_argument("--model_path", type=Path, required=True, help="model folder, e.g. models/<run>/theta_final")
    io.add_argument("--output_path", type=Path, default=None, help="default: theta_inference/ next to the model")
    io.add_argument("--test_data", type=Path, default=PROJECT_ROOT / "Datasets" / "test_set.json",
                    help="test set for perplexity before/after (default Datasets/test_set.json)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--quantize", choices=["none", "int8"], default="none",
                     help="int8: dynamic quantisation of every block linear layer (CPU inference)")
    opt.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the saved model")
    opt.add_argument("--prune_sparsity", type=float, default=0.0,
                     help="fraction of block weights zeroed by magnitude, in [0, 1) (default 0: no pruning)")
    opt.add_argument("--max_perplexity_increase", type=float, default=0.05,
                     help="refuse a result whose test perplexity rose by more than this fraction (default 0.05)")
    opt.add_argument("--force", action="store_true", help="write the result even when perplexity got worse")
    ms = p.add_argument_group("measurement")
    ms.add_argument("--device", type=str, default="cpu", help="device for the measurements (default cpu)")
    ms.add_argument("--max_new_tokens", type=int, default=32, help="tokens generated per measured prompt")
    ms.add_argument("--repeats", type=int, default=3, help="measured repetitions of the prompt set")
    ms.add_argument("--batch_size", type=int, default=8, help="records per perplexity forward pass")
    ms.add_argument("--max_length", type=int, default=512, help="longest perplexity sequence in tokens")
    ms.add_argument("--max_eval_records", type=int, default=0, help="first N test records only (0 = all)")
    args = p.parse_args(argv)
    for bad, message in [(args.max_new_tokens < 1, "--max_new_tokens must be at least 1"),
                         (args.repeats < 1, "--repeats must be at least 1"),
                         (args.batch_size < 1, "--batch_size must be at least 1"),
                         (args.max_length < 8, "--max_length must be at least 8"),
                         (args.max_eval_records < 0, "--max_eval_records must be >= 0"),
                         (not 0 <= args.prune_sparsity < 1, "--prune_sparsity must be in [0, 1)"),
                         (args.max_perplexity_increase < 0, "--max_perplexity_increase must be >= 0"),
                         (args.quantize == "int8" and args.dtype != "fp32",
                          "--quantize int8 needs --dtype fp32 (int8 kernels take fp32 activations)"),
                         (args.quantize == "int8" and not args.device.startswith("cpu"),
                          "--quantize int8 runs on the CPU only: use --device cpu")]:
        if bad:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the log lines
    m = optimize(args)
    g, s, ppl = m["generation"], m["size_bytes"], m["perplexity"]
    logger.info("wrote %s (quantize %s, %s, sparsity %.2f): %.1f MB -> %.1f MB | %.1f -> %.1f tokens/s (x%.2f) | "
                "perplexity %.3f -> %.3f (%+.2f%%)", m["output_path"], m["quantize"], m["dtype"],
                m["achieved_sparsity"], s["before"] / 1e6, s["after"] / 1e6, g["before"]["tokens_per_sec"],
                g["after"]["tokens_per_sec"], g["speedup"] or 0.0, ppl["before"]["perplexity"],
                ppl["after"]["perplexity"], 100 * ppl["relative_change"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
