"""The benchmark harness (tests/benchmarks/bench_training.py) still runs: its core measurement on a tiny model for
2 steps, its FLOP formula and its padding arithmetic on hand-checked numbers. The benchmarks themselves are not
collected (they are minutes long); see documentation/PERFORMANCE.md.

    .venv/bin/python -m pytest tests/test_benchmarks_smoke.py -q
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
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


def test_measure_our_loop_returns_positive_figures(tmp_path, tiny_model_dir, prepared_data):
    job = bench.Job(model_dir=tiny_model_dir, data_path=prepared_data, datasets_dir=tiny_model_dir.parent,
                    work=tmp_path, batch_size=4, accum=1, max_length=64, learning_rate=1e-3)
    res = bench.measure("a", job, steps=2, warmup=1, matmul_rate=bench.matmul_gflops(seconds=0.3, n=256))
    for key in ("useful_tok_s", "total_tok_s", "step_ms", "peak_rss_mb", "useful_gflop_s", "mfu", "mfu_all"):
        assert res[key] is not None and math.isfinite(res[key]) and res[key] > 0, key
    assert 0.0 <= res["padding_share"] < 1.0
    assert res["total_tok_s"] >= res["useful_tok_s"]
    assert res["steps_measured"] == 1
