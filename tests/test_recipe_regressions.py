"""Regression tests for bugs 1-4 of the training-recipe issue (combinations of techniques that trained the wrong
thing), each named after its bug and checked only through the trainer's public surface.

    ./tests/run.sh -q -k regression tests/test_recipe_regressions.py

Oracles: the warm-start folder's own weights (bug 1), an uninterrupted run (bug 2), the other rank's weights
(bug 3: each rank's DDP-wrapped module as the harness dumps it, and the summary's ``replica_sha256``), and the
cosine schedule computed by hand from the planned step count (bug 4).
"""

from __future__ import annotations

import math

import pytest

from recipe_harness.common import (final_weights, harness_result, harness_weights, history, identical,
                                   max_difference, metrics, parse, shared_ddp_matrix,
                                   write_matrix_data)
from recipe_harness.fixtures import env, one_thread  # noqa: F401 (pytest fixtures)
import src.training.train_enhanced as te


def base_argv(env: dict, out, *extra: str) -> list[str]:
    return ["--model_name", str(env["dropout"]), "--data_path", str(env["data"]), "--datasets_dir",
            str(env["datasets"]), "--output_dir", str(out), "--batch_size", "4", "--learning_rate", "3e-3",
            "--max_length", "64", "--num_samples", "0", "--domain_eval_frequency", "0", "--seed", "3",
            "--device", "cpu", "--no_progress_bar", *extra]


# --- bug 1 -----------------------------------------------------------------------------------------------------

def test_regression_warm_start_undone_by_cpu_offload(env, tmp_path):
    """The offload optimizer copied its fp32 masters before the warm start loaded, then copied them back."""
    warm, base = final_weights(env["warm"], "."), final_weights(env["dropout"], ".")
    assert max_difference(warm, base)[0] > 0.1
    summary = te.train(parse(base_argv(env, tmp_path / "run", "--warm_start", str(env["warm"]), "--use_cpu_offload",
                                       "--cpu_offload_fraction", "0.5", "--max_steps", "1",
                                       "--learning_rate", "1e-12")))
    assert summary["exit_code"] == 0 and summary["global_step"] == 1, summary
    final = final_weights(tmp_path / "run")
    for name in ("transformer.wte.weight", "lm_head.weight"):  # the tied embedding: the largest, so offloaded
        gap, from_base = (float((final[name] - w[name]).abs().max()) for w in (warm, base))
        assert gap <= 1e-6, f"{name} is {gap:.3g} from the warm start ({from_base:.3g} from the base model)"
    worst = max_difference(warm, final)
    assert worst[0] <= 1e-6, f"theta_final is {worst[0]:.3g} from the warm-start weights ({worst[1]})"


# --- bug 2 -----------------------------------------------------------------------------------------------------

DYNAMIC = ["--epochs", "3", "--use_dynamic_curriculum", "--dynamic_curriculum_warmup", "1",
           "--dynamic_curriculum_momentum", "0.5"]


@pytest.fixture(scope="module")
def dynamic_full(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic_full")
    summary = te.train(parse(base_argv(env, out, *DYNAMIC)))
    assert summary["exit_code"] == 0 and summary["global_step"] == 30, summary  # 3 epochs of 40 records / 4
    return out, summary


@pytest.mark.parametrize("stop", [14, 25])  # mid-epoch 2 and mid-epoch 3: the tracker's weights are in use
def test_regression_dynamic_curriculum_resume_drift(env, tmp_path, dynamic_full, stop):
    """The epoch's weighted draw was redone on resume from a tracker updated every step since the epoch began."""
    full_dir, full = dynamic_full
    argv = base_argv(env, tmp_path / "run", *DYNAMIC, "--stop_after_step", str(stop))
    first = te.train(parse(argv, "needs --stop_after_step (CONTRACTS item 8)"))
    assert (first["exit_code"], first["global_step"]) == (te.EXIT_INTERRUPTED, stop), first
    second = te.train(parse(argv))
    assert second["exit_code"] == 0 and second["global_step"] == full["global_step"], second
    a, b = final_weights(full_dir), final_weights(tmp_path / "run")
    differ, worst = identical(a, b), max_difference(a, b)
    assert not differ, f"stopped after step {stop} and resumed: {len(differ)} tensors differ from the " \
                       f"uninterrupted run, at most {worst[0]:.3g} ({worst[1]})"
    assert [h["val_loss"] for h in history(tmp_path / "run")] == [h["val_loss"] for h in history(full_dir)]


# --- bug 3 -----------------------------------------------------------------------------------------------------

def test_regression_ddp_replicas_drift_with_code_contrastive(env):
    """The contrastive head sat outside DDP: its gradients, never all-reduced, entered each rank's clipping.

    Reads the ``code_contrastive`` run of the shared torchrun launch (2 processes, gloo; see
    recipe_harness/common.py::shared_ddp_matrix), which dumps every rank's DDP-wrapped module.
    """
    run = shared_ddp_matrix(env)["root"] / "ddp" / "code_contrastive"
    results = [harness_result(run, rank) for rank in (0, 1)]
    for r in results:
        assert "error" not in r, f"rank {r['rank']} raised: {r['error']}\n{r.get('traceback', '')}"
    ranks = [harness_weights(run, rank) for rank in (0, 1)]
    differ, worst = identical(ranks[0], ranks[1]), max_difference(ranks[0], ranks[1])
    assert not differ, f"rank 0 and rank 1 differ in {len(differ)} tensors, at most {worst[0]:.3g} ({worst[1]})"
    summary = results[0]["summary"]
    assert "replica_sha256" in summary, "needs the replica_sha256 summary key (CONTRACTS item 8)"
    hashes = summary["replica_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], hashes


# --- bug 4 -----------------------------------------------------------------------------------------------------

def test_regression_stratified_curriculum_loses_steps(env, tmp_path, prepared_data, tiny_records):
    """With one domain absent from the curriculum's first pool, its stratified slots were skipped: fewer steps
    ran than the schedule was sized for, and the learning rate never reached the end of its cosine."""
    data = write_matrix_data(prepared_data, tiny_records, tmp_path / "data.json",
                             difficulty=lambda i, rec: 3 if rec["domain"] == "networking" else 1)
    lr = 3e-3
    argv = base_argv(env, tmp_path / "run", "--data_path", str(data), "--epochs", "2", "--use_domain_stratified",
                     "--use_curriculum", "--curriculum_start_fraction", "0.6", "--scheduler_type", "cosine",
                     "--warmup_proportion", "0", "--learning_rate", str(lr), "--patience", "5")
    summary = te.train(parse(argv))
    assert summary["exit_code"] == 0, summary
    # epoch 1 draws from the easiest 24 of 40 records (none from networking), epoch 2 from all 40: 6 + 10 steps
    lines = metrics(tmp_path / "run")
    assert summary["global_step"] == len(lines) == 16, \
        f"ran {summary['global_step']} steps ({len(lines)} logged) of the 6 + 10 the pools hold"
    assert "planned_steps" in summary, "needs the planned_steps summary key (CONTRACTS item 8)"
    assert summary["planned_steps"] == 16, summary
    n = summary["planned_steps"]
    cosine = [lr * 0.5 * (1 + math.cos(math.pi * k / n)) for k in range(n + 1)]
    logged = [line["lr"] for line in lines]
    after_step, before_step = cosine[1:], cosine[:-1]  # either way the logger reads the rate, the whole schedule
    assert logged == pytest.approx(after_step, rel=1e-6, abs=1e-12) or \
        logged == pytest.approx(before_step, rel=1e-6, abs=1e-12), logged
    if logged == pytest.approx(after_step, rel=1e-6, abs=1e-12):
        assert logged[-1] <= 1e-12  # the cosine ends at 0
