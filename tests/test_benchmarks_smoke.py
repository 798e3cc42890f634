"""The benchmark harness (tests/benchmarks/bench_training.py) and the GPU check still run: the whole-epoch
measurement and the step measurement of our loop on the test suite's tiny model, the stack sampler's buckets on
hand-made stacks, the FLOP formula and padding arithmetic on hand-checked numbers, Trainer's arguments on this
transformers, the LM-head comparison's two paths agreeing, and gpu_check.sh up to the point where it needs CUDA.
The benchmarks themselves are not collected (they are minutes long); see documentation/PERFORMANCE.md.

    .venv/bin/python -m pytest tests/test_benchmarks_smoke.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))
import bench_training as bench  # noqa: E402


def test_flop_formula_counts_weights_and_attention():
    dims = bench.Dims(n_layer=2, n_embd=8, vocab=10, n_inner=32)
    n = 2 * (4 * 8 * 8 + 2 * 8 * 32) + 10 * 8  # per block qkv+proj 4d^2, MLP 2 d d_ff; plus the LM head
    assert dims.matmul_params == n
    assert dims.train_flops(5) == 6 * n * 5 + 12 * 2 * 8 * 5 * 5


def test_padding_shares_by_hand():
    pad = bench.padding_shares([2, 4, 2, 4], max_length=8, batch_sizes=(2,), epochs=3)
    row = pad["batch_2"]
    assert row["fixed"] == pytest.approx(1 - 3 / 8)
    assert row["sorted"] == pytest.approx(0.0)  # [2, 2] and [4, 4]: no padding at all
    assert row["packed_ffd"] == pytest.approx(1 - 12 / 16)  # bins 4+4 and 2+2, one batch padded to 8
    assert 0.0 <= row["dynamic"] <= 1 - 6 / 8


def _frames(*specs):
    return [(path, name, qual) for path, name, qual in specs]


def test_stack_buckets_on_hand_made_stacks():
    train = ("/r/src/training/train_enhanced.py", "train", "train")
    linear = ("/v/torch/nn/modules/linear.py", "forward", "Linear.forward")
    assert bench._classify(_frames(linear, ("/v/transformers/models/gpt2/modeling_gpt2.py", "forward",
                                            "GPT2Model.forward"), train)) == "forward"
    assert bench._classify(_frames(linear, ("/r/src/training/lm_data.py", "evaluate", "evaluate"), train)) \
        == "validation"  # a forward inside validation is validation
    assert bench._classify(_frames(("/v/torch/serialization.py", "save", "save"),
                                   ("/r/src/training/train_enhanced.py", "save_checkpoint", "save_checkpoint"),
                                   train)) == "checkpointing"
    assert bench._classify(_frames(("/v/torch/autograd/graph.py", "_engine_run_backward", "_engine_run_backward"),
                                   ("/v/torch/_tensor.py", "backward", "Tensor.backward"), train)) == "backward"
    assert bench._classify(_frames(("/r/src/training/lm_loss.py", "forward", "_HeadLossFn.forward"), train)) == "loss"
    assert bench._classify(_frames(("/v/torch/optim/adamw.py", "step", "AdamW.step"), train)) == "optimizer"
    assert bench._classify(_frames(("/r/src/training/lm_data.py", "collate", "collate"), train)) == "data"
    assert bench._classify(_frames(("/v/torch/utils/tensorboard/writer.py", "add_scalar", "SummaryWriter.add_scalar"),
                                   train)) == "logging"
    assert bench._classify(_frames(train)) == "other"


def test_trainer_arguments_speak_this_transformers(tmp_path):
    pytest.importorskip("accelerate")
    args = bench.trainer_arguments(output_dir=str(tmp_path), group_by_length=True, use_cpu=True, report_to="none",
                                   eval_strategy="epoch", save_strategy="epoch", per_device_train_batch_size=2)
    grouped = getattr(args, "train_sampling_strategy", None) == "group_by_length" or \
        getattr(args, "group_by_length", False) is True
    strategy = getattr(args, "eval_strategy", None) or getattr(args, "evaluation_strategy", None)
    assert grouped and getattr(strategy, "value", strategy) == "epoch"


def test_one_technique_configs_turn_exactly_that_technique_on(tmp_path):
    """Config +X is config a with only --use_X on: the per-technique overhead rows compare one flag each."""
    job = bench.Job(model_dir=tmp_path, data_path=tmp_path / "d.json", datasets_dir=tmp_path, work=tmp_path)
    plain = bench._ours_argv(job, tmp_path, 1, 0, 1, "a")
    one = bench._ours_argv(job, tmp_path, 1, 0, 1, "+ema")
    assert "--use_ema" in one and "--no_ema" not in one and "--no_ema" in plain
    assert set(plain) - set(one) == {"--no_ema"} and set(one) - set(plain) == {"--use_ema"}
    assert bench.config_title("+ema") == "ours, only --use_ema"
    assert bench.ordered_configs({"+rdrop": 1, "b": 1, "a": 1}) == ["a", "b", "+rdrop"]
    with pytest.raises(SystemExit):
        bench.main(["--configs", "a,+no_such_technique"])


def test_head_paths_agree():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, 16, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(50, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, 50, (2, 12), generator=g)
    labels[:, :4] = -100
    full = bench.head_case("full", hidden, weight, labels)
    g_full = weight.grad.clone()
    targets = bench.head_case("targets", hidden, weight, labels)
    assert targets == pytest.approx(full, rel=1e-5)
    torch.testing.assert_close(weight.grad, g_full, rtol=1e-5, atol=1e-6)


def test_epoch_and_step_measurements_of_our_loop(tmp_path, tiny_model_dir, prepared_data):
    records = json.loads(prepared_data.read_text(encoding="utf-8"))
    train = [r for r in records["records"] if r.get("split", "train") == "train"][:16]
    val = [r for r in records["records"] if r.get("split") == "validation"][:3]
    data = tmp_path / "small.json"
    data.write_text(json.dumps({**records, "records": train + val}), encoding="utf-8")
    job = bench.Job(model_dir=tiny_model_dir, data_path=data, datasets_dir=tiny_model_dir.parent,
                    work=tmp_path, batch_size=8, accum=1, max_length=64, learning_rate=1e-3)
    lengths, share = bench.tokenised(job)
    res = bench.measure_epoch("a", job, seed=1, dims=bench.Dims(2, 64, 384, 256), flops_per_useful_token=1.0,
                              matmul_rate=1.0)
    # the epoch's useful tokens as our loop counts them (metrics.jsonl) are those the model was given (probe)
    assert res["useful_tokens"] == pytest.approx(res["useful_tokens_seen"]) and res["useful_tokens"] > 0
    assert res["steps_per_epoch"] == math.ceil(len(lengths) / 8)
    assert 0.0 <= res["padding_share"] < 1.0 and 0.0 < share <= 1.0
    for key in ("epoch_s", "epoch_cpu_s", "peak_rss_mb"):
        assert res[key] is not None and math.isfinite(res[key]), key
    # an epoch this small is a fraction of a second, so the 2-epoch minus 1-epoch difference can come out <= 0
    # on a busy machine: the rate is then left out (None), never negative (a wall time is never asserted)
    assert res["useful_tok_s"] == (pytest.approx(res["useful_tokens"] / res["epoch_s"]) if res["epoch_s"] > 0
                                   else None)
    assert set(res["breakdown_s"]) == set(bench.BUCKETS)

    steps = bench.measure("a", job, steps=2, warmup=1, matmul_rate=bench.matmul_gflops(seconds=0.3, n=256))
    for key in ("useful_tok_s", "total_tok_s", "step_ms", "peak_rss_mb", "useful_gflop_s", "mfu", "mfu_all"):
        assert steps[key] is not None and math.isfinite(steps[key]) and steps[key] > 0, key
    assert steps["total_tok_s"] >= steps["useful_tok_s"] and steps["steps_measured"] == 1


def test_gpu_check_without_cuda_stops_cleanly_after_checking_its_plan():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device is visible" in proc.stdout and "command lines) parses" in proc.stdout
