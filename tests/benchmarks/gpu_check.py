"""The GPU check of documentation/PERFORMANCE.md: what a machine with one CUDA GPU measures in under 8 minutes.

Run through ``tests/benchmarks/gpu_check.sh`` (which sets the offline environment). Sections, each a few short
training runs of our own loop (``python -m src.training.train_enhanced``-equivalent, in a subprocess so that a
memory cap is per run), on random-weight models with GPT-2's shapes and the theta-tiny tokenizer (its ids are a
subset of GPT-2's 50,257 rows, so the embedding and head have GPT-2's real size):

1. throughput: gpt2 (124M) and gpt2-medium (355M), bf16 and fp16, the rtx3060 profile's micro-batch, accumulation
   and sequence length, every technique off: useful tokens/s and MFU against the GPU's dense bf16 peak
   (FLOPs per useful token = 6 N + 12 L d t, with N the matmul weights and t the mean record length; the formula
   of tests/benchmarks/bench_training.py), plus the measured bf16 matmul rate as a second reference;
2. memory: the whole rtx3060 profile (gpt2-medium, bf16), peak allocated and reserved, uncapped and with the
   process capped at 12 GiB (``torch.cuda.set_per_process_memory_fraction``) as on an RTX 3060;
3. CPU offload at fractions 0, 0.5 and 1 (gpt2-medium, bf16): peak memory and median step time;
4. EMA kept on the host (``--ema_device cpu``, fed by non-blocking device-to-host copies) against EMA kept on
   the device: the final (EMA) weights must agree;
5. a real CUDA out-of-memory: the process capped between the peaks of micro-batch B and B/2, the loop must halve
   its micro-batch and end at the weights of a run at B/2 x 2 accumulation;
6. packing with FlashAttention 2's variable-length path against padded SDPA, when ``flash_attn`` is installed;
7. the pre-flight's simulated memory model against the CUDA probe for gpt2-medium and two Llama-family shapes
   (SmolLM2-360M's, Qwen2.5-0.5B's), random weights: the ratio says how far ``--simulate_gpu_memory_gb`` is off;
8. the rtx3060-lora profile's shape (Qwen2.5-1.5B, random weights) with --peft qlora and lora at 4 x 512 tokens
   under a 12 GiB cap: peak memory and tokens/s against the pre-flight's simulated peak.

Without CUDA it says so and exits 0 after checking its plan (every trainer command line parses).

    tests/benchmarks/gpu_check.sh                         # everything, < 8 min on one GPU
    tests/benchmarks/gpu_check.sh --sections 1,2 --out /tmp/gpu_check
    .venv/bin/python tests/benchmarks/gpu_check.py --plan # print and check the plan only (no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; --peak_tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2,
                    "RTX 3090": 71.0, "RTX 3060": 25.6}
SHAPES = {"gpt2": dict(n_layer=12, n_embd=768, n_head=12), "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16)}
CAP_GIB = 12.0
RUNNER = """
import json, sys, torch
frac = float(sys.argv[1])
if frac < 1.0:
    torch.cuda.set_per_process_memory_fraction(frac)
from src.training.train_enhanced import main
code = main(sys.argv[2:])
if torch.cuda.is_available():
    print("GPU_PEAK " + json.dumps({"allocated": torch.cuda.max_memory_allocated(),
                                    "reserved": torch.cuda.max_memory_reserved()}))
sys.exit(code)
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


class Check:
    """The shared set-up (data, model folders) and one trainer run as a subprocess."""

    def __init__(self, work: Path, device: str = "cuda", python: str = sys.executable):
        self.work, self.device, self.python = work, device, python
        self.runner = work / "runner.py"
        self.runner.write_text(RUNNER, encoding="utf-8")
        self.data = self.tiny = None
        self.models: dict[str, Path] = {}

    def setup(self) -> None:
        import bench_training as bench

        self.data, how = bench.prepare_data(self.work, PROJECT_ROOT / "Datasets", records=540, val_records=16)
        self.tiny = bench.build_shape("quick", self.work, PROJECT_ROOT / "Datasets")
        log(f"data: {how}")

    def model(self, shape: str) -> Path:
        """A random-weight GPT-2 of ``shape`` saved with the theta-tiny tokenizer (built once)."""
        if shape not in self.models:
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

            from src.model.theta_model import ThetaModel

            folder = self.work / shape
            tok = GPT2TokenizerFast.from_pretrained(self.tiny)
            torch.manual_seed(0)
            cfg = GPT2Config(**SHAPES[shape], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, activation_function="gelu_pytorch_tanh")
            ThetaModel.from_parts(GPT2LMHeadModel(cfg), tok, device="cpu").save(folder)
            self.models[shape] = folder
        return self.models[shape]

    def argv(self, name: str, shape_dir: Path | str, extra: list[str], steps: int) -> tuple[Path, list[str]]:
        out = self.work / "runs" / name
        return out, ["--model_name", str(shape_dir), "--data_path", str(self.data or "DATA"),
                     "--datasets_dir", str(PROJECT_ROOT / "Datasets"), "--output_dir", str(out), "--epochs", "1",
                     "--max_steps", str(steps), "--num_samples", "0", "--no_progress_bar", "--no_color",
                     "--resume", "never", "--device", self.device, "--eval_every_steps", "0",
                     "--save_every_steps", "0", "--domain_eval_frequency", "0", *extra]

    def train(self, name: str, shape: str, extra: list[str], steps: int, cap_fraction: float = 1.0,
              timeout: int = 240) -> dict:
        """One run; returns its step lines, peak memory, exit code and wall time."""
        out, argv = self.argv(name, self.model(shape), extra, steps)
        t0 = time.perf_counter()
        proc = subprocess.run([self.python, str(self.runner), str(cap_fraction), *argv], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        res = {"name": name, "exit_code": proc.returncode, "wall_s": time.perf_counter() - t0, "out": str(out)}
        for line in proc.stdout.splitlines():
            if line.startswith("GPU_PEAK "):
                res["gpu_peak"] = json.loads(line[9:])
        metrics = out / "metrics.jsonl"
        res["lines"] = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] \
            if metrics.is_file() else []
        log_text = (out / "train.log").read_text(errors="replace") if (out / "train.log").is_file() else ""
        res["oom_halvings"] = log_text.count("CUDA out of memory")
        if proc.returncode != 0:
            res["stderr_tail"] = (proc.stderr or proc.stdout)[-1500:]
        return res


def technique_off() -> list[str]:
    import bench_training as bench

    return bench.technique_flags()["off"]


def profile_shape_flags() -> list[str]:
    """The rtx3060 profile's micro-batch, accumulation and length, read from the trainer's own profile."""
    from src.training import train_enhanced as te

    a = te.parse_args(["--profile", "rtx3060", "--device", "cpu"])
    return ["--batch_size", str(a.batch_size), "--gradient_accumulation_steps", str(a.gradient_accumulation_steps),
            "--max_length", str(a.max_length), "--learning_rate", str(a.learning_rate)]


def _useful_rate(lines: list[dict], skip: int = 5) -> tuple[float | None, float | None]:
    kept = lines[skip:] or lines[-1:]
    if not kept:
        return None, None
    tokens = sum(x["tokens_per_sec"] * x["ms"] / 1000 for x in kept)
    secs = sum(x["ms"] for x in kept) / 1000
    return tokens / secs, statistics.median(x["ms"] for x in kept)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

def section_throughput(chk: Check, report: dict, peak: float | None) -> None:
    import torch

    import bench_training as bench

    lengths, _ = bench.tokenised(bench.Job(chk.tiny, chk.data, PROJECT_ROOT / "Datasets", chk.work, max_length=512))
    t_mean = statistics.mean(lengths)
    rate = bench.matmul_gflops("cuda", n=8192, seconds=2.0, dtype=torch.bfloat16) / 1000
    report["bf16_matmul_tflops"] = rate
    log(f"\n## 1. throughput, techniques off, rtx3060 batch/length (mean record {t_mean:.0f} tokens); bf16 matmul "
        f"measured {rate:.0f} TFLOP/s, data-sheet peak {peak or 'unknown'} TFLOP/s")
    log("| shape | precision | useful tok/s | step ms | MFU vs peak | MFU vs measured matmul | peak alloc GiB |")
    log("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for shape in ("gpt2", "gpt2-medium"):
        cfg = SHAPES[shape]
        dims = bench.Dims(cfg["n_layer"], cfg["n_embd"], 50257, 4 * cfg["n_embd"])
        flops_tok = 6 * dims.matmul_params + 12 * dims.n_layer * dims.n_embd * t_mean
        for prec in ("bf16", "fp16"):
            r = chk.train(f"tp_{shape}_{prec}", shape, technique_off() + profile_shape_flags() + ["--precision", prec],
                          steps=30)
            tps, ms = _useful_rate(r["lines"])
            mfu = tps * flops_tok / (peak * 1e12) if tps and peak else None
            mfu_m = tps * flops_tok / (rate * 1e12) if tps else None
            gib = r.get("gpu_peak", {}).get("allocated", 0) / 2**30
            rows.append({"shape": shape, "precision": prec, "useful_tok_s": tps, "step_ms": ms, "mfu": mfu,
                         "mfu_measured_matmul": mfu_m, "peak_alloc_gib": gib, "exit_code": r["exit_code"],
                         "error": r.get("stderr_tail")})
            f = lambda v, s: "-" if v is None else s.format(v)  # noqa: E731
            log(f"| {shape} | {prec} | {f(tps, '{:.0f}')} | {f(ms, '{:.0f}')} | {f(mfu, '{:.1%}')} | "
                f"{f(mfu_m, '{:.1%}')} | {gib:.2f} |" + ("" if r["exit_code"] == 0 else f" FAILED {r['exit_code']}"))
    report["throughput"] = rows


def section_memory(chk: Check, report: dict) -> None:
    total = __import__("torch").cuda.get_device_properties(0).total_memory
    frac = min(1.0, CAP_GIB * 2**30 / total)
    log(f"\n## 2. the whole rtx3060 profile (gpt2-medium, bf16), peak memory; cap {CAP_GIB} GiB = fraction {frac:.3f}")
    rows = []
    for label, cap in (("uncapped", 1.0), (f"capped at {CAP_GIB:.0f} GiB", frac)):
        r = chk.train(f"profile_{'cap' if cap < 1 else 'free'}", "gpt2-medium",
                      ["--profile", "rtx3060", "--precision", "bf16"], steps=12, cap_fraction=cap)
        g = r.get("gpu_peak", {})
        rows.append({"run": label, "exit_code": r["exit_code"], "oom_halvings": r["oom_halvings"],
                     "allocated_gib": g.get("allocated", 0) / 2**30, "reserved_gib": g.get("reserved", 0) / 2**30,
                     "steps": len(r["lines"]), "error": r.get("stderr_tail")})
        log(f"  {label}: exit {r['exit_code']}, {len(r['lines'])} steps, peak allocated "
            f"{rows[-1]['allocated_gib']:.2f} GiB, reserved {rows[-1]['reserved_gib']:.2f} GiB, "
            f"OOM halvings {r['oom_halvings']}" + (f"\n{r['stderr_tail']}" if r["exit_code"] else ""))
    report["profile_memory"] = rows


def section_offload(chk: Check, report: dict) -> None:
    log("\n## 3. CPU offload (gpt2-medium, bf16, rtx3060 batch/length, other techniques off)")
    rows = []
    for fraction in (0.0, 0.5, 1.0):
        extra = technique_off() + profile_shape_flags() + ["--precision", "bf16"]
        if fraction > 0:
            extra += ["--use_cpu_offload", "--cpu_offload_fraction", str(fraction)]
        r = chk.train(f"offload_{fraction}", "gpt2-medium", extra, steps=10)
        _, ms = _useful_rate(r["lines"], skip=3)
        g = r.get("gpu_peak", {})
        rows.append({"fraction": fraction, "step_ms": ms, "allocated_gib": g.get("allocated", 0) / 2**30,
                     "exit_code": r["exit_code"], "error": r.get("stderr_tail")})
        log(f"  offload {fraction}: exit {r['exit_code']}, median step {ms or 0:.0f} ms, peak allocated "
            f"{rows[-1]['allocated_gib']:.2f} GiB")
    report["offload"] = rows


def section_ema(chk: Check, report: dict) -> None:
    log("\n## 4. EMA on the host (non-blocking device-to-host copies) against EMA on the device (gpt2, fp32)")
    runs = {}
    for where in ("cpu", "device"):
        extra = technique_off() + ["--use_ema", "--ema_device", where, "--ema_decay", "0.5",
                                   "--ema_warmup_epochs", "0", "--batch_size", "4", "--max_length", "256",
                                   "--precision", "fp32", "--learning_rate", "1e-4"]
        runs[where] = chk.train(f"ema_{where}", "gpt2", extra, steps=8)
    ok = all(r["exit_code"] == 0 for r in runs.values())
    diff = _max_diff(Path(runs["cpu"]["out"]) / "theta_final", Path(runs["device"]["out"]) / "theta_final") \
        if ok else None
    report["ema"] = {"max_abs_diff": diff, "exit_codes": {k: v["exit_code"] for k, v in runs.items()},
                     "passed": diff is not None and diff < 1e-4}
    log(f"  max |EMA(cpu) - EMA(device)| over the final weights: {diff} -> "
        f"{'PASS' if report['ema']['passed'] else 'FAIL'} (limit 1e-4: run-to-run GPU reduction order)")


def section_oom(chk: Check, report: dict) -> None:
    import torch

    log("\n## 5. a real CUDA out-of-memory: micro-batch 8 capped between the peaks of 8 and 4 (gpt2, fp32)")
    base = technique_off() + ["--max_length", "512", "--precision", "fp32", "--learning_rate", "1e-4"]
    full = chk.train("oom_b8", "gpt2", base + ["--batch_size", "8", "--gradient_accumulation_steps", "1"], steps=6)
    half = chk.train("oom_b4x2", "gpt2", base + ["--batch_size", "4", "--gradient_accumulation_steps", "2"], steps=6)
    p8 = full.get("gpu_peak", {}).get("reserved", 0)
    p4 = half.get("gpu_peak", {}).get("reserved", 0)
    total = torch.cuda.get_device_properties(0).total_memory
    res = {"peak_b8_gib": p8 / 2**30, "peak_b4_gib": p4 / 2**30}
    if not (p8 and p4 and p8 > p4):
        res["note"] = "could not measure two distinct peaks"
        report["oom"] = res
        log(f"  skipped: {res}")
        return
    cap = (p4 + 0.5 * (p8 - p4)) / total
    capped = chk.train("oom_capped", "gpt2", base + ["--batch_size", "8", "--gradient_accumulation_steps", "1"],
                       steps=6, cap_fraction=cap)
    res.update({"cap_fraction": cap, "exit_code": capped["exit_code"], "oom_halvings": capped["oom_halvings"],
                "error": capped.get("stderr_tail")})
    if capped["exit_code"] == 0:
        res["max_abs_diff_vs_b4x2"] = _max_diff(Path(capped["out"]) / "theta_final", Path(half["out"]) / "theta_final")
        res["max_abs_diff_vs_b8"] = _max_diff(Path(capped["out"]) / "theta_final", Path(full["out"]) / "theta_final")
        res["loss_diff_vs_b4x2"] = max((abs(a["loss"] - b["loss"]) for a, b in zip(capped["lines"], half["lines"])),
                                       default=None)
    res["passed"] = capped["exit_code"] == 0 and capped["oom_halvings"] > 0 and \
        res.get("max_abs_diff_vs_b4x2", 1.0) < 1e-4
    report["oom"] = res
    log(f"  peaks: micro-batch 8 {p8 / 2**30:.2f} GiB, 4 {p4 / 2**30:.2f} GiB; capped at {cap * total / 2**30:.2f} "
        f"GiB: exit {capped['exit_code']}, OOM halvings {capped['oom_halvings']}, max |w - w(4x2)| "
        f"{res.get('max_abs_diff_vs_b4x2')}, max |w - w(8)| {res.get('max_abs_diff_vs_b8')} -> "
        f"{'PASS' if res['passed'] else 'FAIL'}")


def section_flash(chk: Check, report: dict) -> None:
    import torch

    from src.training.packing import flash_attention_available

    log("\n## 6. packing through FlashAttention 2's variable-length path")
    if not flash_attention_available("cuda"):
        report["flash"] = {"skipped": "flash_attn is not installed"}
        log("  skipped: flash_attn is not installed (pip install flash-attn)")
        return
    from transformers import GPT2Config, GPT2LMHeadModel

    from src.training.lm_loss import TargetIndex, final_hidden, head_loss, output_weight
    from src.training.packing import pack_examples

    torch.manual_seed(0)
    examples = []
    for n in (90, 40, 130, 25, 70):
        ids = torch.randint(1, 1000, (n,)).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    losses = {}
    for impl in ("sdpa", "flash_attention_2"):
        cfg = GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=1000, resid_pdrop=0, embd_pdrop=0,
                         attn_pdrop=0)
        cfg._attn_implementation = impl
        torch.manual_seed(1)
        model = GPT2LMHeadModel(cfg).to("cuda", torch.bfloat16).eval()
        packed = pack_examples(examples, 256, 0)
        packed = (packed.flat() if impl == "flash_attention_2" else packed).to("cuda")
        hidden = final_hidden(model, **packed.model_inputs(impl))
        tgt = TargetIndex.from_labels(packed.labels.cpu(), packed.record_ids.cpu(), packed.n_records).to("cuda")
        losses[impl] = tgt.per_record(head_loss(hidden, output_weight(model), tgt).token_loss).tolist()
    diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses["flash_attention_2"], losses["sdpa"]))
    report["flash"] = {"per_record_rel_diff": diff, "passed": diff < 2e-2}
    log(f"  per-record losses, varlen flash vs block-mask SDPA (bf16): max relative difference {diff:.2e} -> "
        f"{'PASS' if diff < 2e-2 else 'FAIL'}")


# Section 7's shapes: the rtx3060 profile's gpt2-medium, and Llama-family models of the size a 12 GiB card fully
# fine-tunes (SmolLM2-360M's shape; Qwen2.5-0.5B's, tied head, q/k/v biases), random weights.
PREFLIGHT_SHAPES = {
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257)),
    "smollm2-360m": ("llama", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
}


def section_preflight(chk: Check, report: dict) -> None:
    """The pre-flight's simulated memory model (what ``--simulate_gpu_memory_gb`` answers on a CPU) against the
    CUDA probe (one real step through the trainer's loss) for each shape, bf16 autocast, micro-batch 3 at 512
    tokens doubled for R-Drop as the rtx3060 profile runs it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from src.training import preflight as pf

    log("\n## 7. the pre-flight's memory model against the CUDA probe (bf16, 6 x 512 tokens)")
    log("| shape | parameters | simulated GiB | measured GiB | simulated / measured |")
    log("|---|---:|---:|---:|---:|")
    rows = []
    for name, (kind, sizes) in PREFLIGHT_SHAPES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **sizes)).to("cuda")
        simulated = pf.SimulatedProbe.for_model(model, 0).peak(6, 512)
        try:
            measured = pf.CudaProbe(model, torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16))(6, 512)
        except pf.ProbeOutOfMemory as err:
            measured, note = None, str(err)
        else:
            note = ""
        n = sum(p.numel() for p in model.parameters())
        del model
        torch.cuda.empty_cache()
        ratio = simulated / measured if measured else None
        rows.append({"shape": name, "parameters": n, "simulated_bytes": simulated, "measured_bytes": measured,
                     "ratio": ratio, "note": note})
        log(f"| {name} | {n / 1e6:.0f}M | {simulated / 2**30:.2f} | "
            f"{'-' if measured is None else f'{measured / 2**30:.2f}'} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    report["preflight_memory"] = rows


# Qwen2.5-1.5B-Instruct's published sizes: the rtx3060-lora profile's model (src/utils/profiles.py)
QWEN15 = dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def section_lora_profile(chk: Check, report: dict) -> None:
    """The rtx3060-lora profile's shape (Qwen2.5-1.5B, random weights saved once in bf16) under --peft qlora and
    lora at its micro-batch 4 x 512 tokens, bf16 autocast: peak allocated memory and tokens/s over a few optimizer
    steps of the trainer's own loss (lm_loss.step_losses) and adapters (src/model/adapters.py), capped at 12 GiB
    as on an RTX 3060, against the pre-flight's simulated peak for the same mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from src.model import adapters
    from src.training import preflight as pf
    from src.training.lm_loss import TargetIndex, step_losses

    log("\n## 8. the rtx3060-lora profile's shape (Qwen2.5-1.5B, random weights), 4 x 512 tokens, bf16, 12 GiB cap")
    log("| mode | trainable | simulated GiB | peak allocated GiB | tokens/s |")
    log("|---|---:|---:|---:|---:|")
    folder = chk.work / "qwen15_random"
    if not folder.exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **QWEN15), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
    shape = pf.ModelShape.from_config(AutoConfig.for_model("qwen2", **QWEN15))
    fraction = min(1.0, 12 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction)
    rows = []
    try:
        for mode in ("qlora", "lora"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            device = torch.device("cuda")
            base = adapters.load_4bit(folder, device) if mode == "qlora" else \
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
            model = adapters.wrap_with_adapters(base, adapters.adapter_config(base, 16, 32, 0.05), False,
                                                quantized=mode == "qlora").train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=2e-4)
            ids = torch.randint(0, QWEN15["vocab_size"], (4, 512), device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                     "targets": TargetIndex.from_labels(ids.cpu()).to(device)}
            weights = torch.ones(4, device=device)
            times = []
            for step in range(6):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = step_losses(model, batch, weights)
                (out["loss_sum"] / ids.numel()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated()
            simulated = pf.SimulatedProbe(0, shape, pf.adapter_weight_memory(shape, mode, 16),
                                          head_trainable=False).peak(4, 512)
            rate = ids.numel() / sorted(times[2:])[len(times[2:]) // 2]
            rows.append({"mode": mode, "trainable": sum(p.numel() for p in params),
                         "simulated_bytes": simulated, "peak_allocated_bytes": peak, "tokens_per_sec": rate})
            log(f"| {mode} | {rows[-1]['trainable'] / 1e6:.1f}M | {simulated / 2**30:.2f} | {peak / 2**30:.2f} | "
                f"{rate:.0f} |")
            del model, base, opt, params
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    report["lora_profile"] = rows


SECTIONS = {"1": section_throughput, "2": section_memory, "3": section_offload, "4": section_ema,
            "5": section_oom, "6": section_flash, "7": section_preflight, "8": section_lora_profile}


def plan(chk: Check) -> list[list[str]]:
    """Every trainer command line the check will run, parsed by the trainer itself (on CPU, no model)."""
    from src.training import train_enhanced as te

    lines = []
    shape = profile_shape_flags()
    off = technique_off()
    for extra in (off + shape + ["--precision", "bf16"], ["--profile", "rtx3060", "--precision", "bf16"],
                  off + shape + ["--use_cpu_offload", "--cpu_offload_fraction", "0.5"],
                  off + ["--use_ema", "--ema_device", "cpu", "--ema_decay", "0.5", "--ema_warmup_epochs", "0"],
                  off + ["--batch_size", "8", "--gradient_accumulation_steps", "1", "--precision", "fp32"]):
        _, argv = chk.argv("plan", "gpt2", extra, steps=4)
        argv[argv.index("--device") + 1] = "cpu"
        te.parse_args(argv)  # raises (SystemExit / UserError) if a flag is gone or misspelt
        lines.append(argv)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", type=str, default="1,2,3,4,5,6,7,8", help="comma list of sections 1-8")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "")) / "gpu_check"
                   if os.environ.get("OUT") else None, help="folder for gpu_check.json (default: $OUT/gpu_check)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--budget_s", type=float, default=450, help="skip the sections left after this many seconds")
    p.add_argument("--plan", action="store_true", help="print and check the trainer command lines, then exit")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    with tempfile.TemporaryDirectory(prefix="theta_gpu_check_") as tmp:
        chk = Check(Path(tmp))
        n = len(plan(chk))
        if args.plan:
            for line in plan(chk):
                log(" ".join(line))
            log(f"plan: {n} trainer command lines, all parsed")
            return 0
        if not torch.cuda.is_available():
            log(f"gpu_check: no CUDA device is visible (torch {torch.__version__}, cuda "
                f"{torch.version.cuda or 'not built'}): nothing measured. The plan ({n} trainer command lines) "
                "parses; run this on a machine with one NVIDIA GPU.")
            return 0
        name = torch.cuda.get_device_name(0)
        peak = peak_tflops(name, args.peak_tflops)
        report = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "bf16_peak_tflops": peak,
                  "total_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
        log(f"gpu_check on {name} ({report['total_memory_gib']:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}; dense bf16 peak {peak} TFLOP/s")
        t0 = time.perf_counter()
        chk.setup()
        for key in [s.strip() for s in args.sections.split(",") if s.strip()]:
            if time.perf_counter() - t0 > args.budget_s:
                log(f"\nsection {key} skipped: over the {args.budget_s:.0f} s budget")
                report.setdefault("skipped", []).append(key)
                continue
            try:
                fn = SECTIONS[key]
                fn(chk, report, peak) if key == "1" else fn(chk, report)
            except Exception as err:  # one broken section must not lose the others
                report.setdefault("errors", {})[key] = f"{type(err).__name__}: {err}"
                log(f"  section {key} FAILED: {type(err).__name__}: {err}")
        report["seconds"] = time.perf_counter() - t0
        log(f"\ngpu_check done in {report['seconds']:.0f} s")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            log(f"report: {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
