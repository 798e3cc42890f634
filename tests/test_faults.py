"""The night survives faults around the trainer: a full disk while saving (``ulimit -f``), temporaries that killed
saves left, and bad values that used to pass (non-finite flags, a nan validation loss, a file as --output_dir, a
non-numeric quality_score, a data file with no answer text).

    .venv/bin/python -m pytest tests/test_faults.py -q

Oracles: an uninterrupted run's theta_final (a rerun after the failed save ends bit-identical to it), the
checkpoint's own step and loadability, the files the test planted, the exit codes the trainer documents.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import src.training.train_enhanced as te
from conftest import PROJECT_ROOT
from src.utils.common import EXIT_WRITE_FAILED, run_entry_point, setup_logging


def _argv(model_dir, data, out, *extra):
    return ["--model_name", str(model_dir), "--data_path", str(data), "--output_dir", str(out), "--epochs", "2",
            "--batch_size", "4", "--learning_rate", "3e-3", "--max_length", "96", "--num_samples", "0",
            "--seed", "3", "--no_progress_bar", "--domain_eval_frequency", "0", *extra]


def _final(run):
    return load_file(str(run / "theta_final" / "model.safetensors"))


@pytest.fixture(autouse=True)
def fresh_logging():
    """Log to this test's captured output (an earlier in-process run left its handlers on a closed one)."""
    setup_logging(None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, prepared_data):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, out)))
    assert summary["exit_code"] == 0 and summary["global_step"] == 16  # 2 epochs of 32 records / 4
    return out


# --- a full disk while saving ----------------------------------------------------------------------------------

def _train_with_file_size_limit(argv: list[str], limit_bytes: int, in_process: bool, capsys) -> tuple[int, str]:
    """(exit code, stderr) of the trainer whose files may not grow past ``limit_bytes`` (``ulimit -f``: writes fail
    with EFBIG, as on a full disk; Python ignores SIGXFSZ). In a child process as a user would see it, or (to keep
    the suite short: an import of the trainer costs seconds) in this one, through the same entry point, with the
    limit lifted again at once."""
    if not in_process:
        out = subprocess.run([sys.executable, "-m", "src.training.train_enhanced", *argv], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes)),
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        return out.returncode, out.stderr
    capsys.readouterr()
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, before[1]))
    try:
        code = run_entry_point(te.main, argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
    return code, capsys.readouterr().err


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")
@pytest.mark.parametrize("stop_at,limit,failing,intact,in_process", [
    # a checkpoint (1.7 MB here) cannot be written, theta_best/ (0.6 MB) can: the end of epoch 1 fails at step_8
    (3, 1_000_000, "checkpoints/step_8", "step_3", False),
    # nothing of 256 KB or more can: the end of epoch 2 fails at theta_best/, the first large write after step 10
    (10, 256_000, "theta_best", "step_10", True),
])
def test_a_full_disk_while_saving_exits_5_keeps_the_last_checkpoint_and_the_rerun_is_bit_identical(
        tmp_path, tiny_model_dir, prepared_data, uninterrupted, capsys, stop_at, limit, failing, intact, in_process):
    run = tmp_path / "run"
    argv = _argv(tiny_model_dir, prepared_data, run)
    assert te.train(te.parse_args(argv + ["--stop_after_step", str(stop_at)]))["global_step"] == stop_at
    best_before = (run / "theta_best" / "theta_run.json").read_text() if (run / "theta_best").is_dir() else None
    code, err = _train_with_file_size_limit(argv, limit, in_process, capsys)
    assert code == EXIT_WRITE_FAILED == 5, err[-3000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: could not write {run / failing}") and "free of" in message, message
    assert "file-size limit" in message and "run the same command again" in message
    path, state = te.find_resume_checkpoint(run / "checkpoints")
    assert path.name == intact and state["global_step"] == stop_at  # the previous checkpoint, whole
    assert not [p for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.endswith(".tmp")]
    if best_before is not None:  # the theta_best/ of before is the one still there
        assert (run / "theta_best" / "theta_run.json").read_text() == best_before
    assert te.train(te.parse_args(argv))["exit_code"] == 0  # room again: the same command resumes and finishes
    a, b = _final(uninterrupted), _final(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- nothing left behind ---------------------------------------------------------------------------------------

def test_stale_temporaries_of_killed_saves_are_removed_at_start_only_by_the_lock_holder(tmp_path, tiny_model_dir,
                                                                                      prepared_data, capsys):
    from test_run_lock import SLEEP, _hold, _kill_group

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    # named as the atomic writers name them (mkdtemp/mkstemp next to the destination)
    stale = [tempfile.mkdtemp(prefix=".step_5.", suffix=".tmp", dir=run / "checkpoints"),
             tempfile.mkdtemp(prefix=".theta_best.", suffix=".tmp", dir=run),
             tempfile.mkdtemp(prefix=".theta_final.", suffix=".tmp", dir=run),
             tempfile.mkdtemp(prefix=".theta_final.", suffix=".old", dir=run),
             tempfile.mkstemp(prefix=".training_config.json.", suffix=".tmp", dir=run)[1]]
    (run / ".theta_best.x").write_text("not ours")  # a name the writers never use: kept
    (run / "notes.tmp").write_text("not hidden: kept")
    holder = _hold(run, *SLEEP)  # another live process holds the run: nothing may be touched
    try:
        assert run_entry_point(te.main, _argv(tiny_model_dir, prepared_data, run)) == 2
        assert all(os.path.exists(p) for p in stale)
    finally:
        _kill_group(holder)
    assert te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, run, "--epochs", "1")))["exit_code"] == 0
    assert not any(os.path.exists(p) for p in stale)
    assert (run / ".theta_best.x").exists() and (run / "notes.tmp").exists()
    log = (run / "train.log").read_text()
    assert all(f"removed {p}, left by an interrupted save" in log for p in stale)


# --- bad values that used to pass ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--learning_rate", "inf"), ("--weight_decay", "nan"),
                                        ("--max_grad_norm", "inf"), ("--min_delta", "inf"),
                                        ("--rdrop_alpha", "inf"), ("--dynamic_curriculum_max_weight", "inf")])
def test_non_finite_flags_are_refused_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        te.parse_args([flag, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{flag} {value}: must be a finite number" in err


def _nan_validation(monkeypatch, nan_from_epoch: int):
    """Validation returns a nan loss from the ``nan_from_epoch``-th call on (the model's own figures before)."""
    real, calls = te.evaluate, []

    def evaluate(*args, **kwargs):
        m = real(*args, **kwargs)
        calls.append(1)
        return {**m, "loss": float("nan"), "perplexity": float("nan")} if len(calls) >= nan_from_epoch else m

    monkeypatch.setattr(te, "evaluate", evaluate)


def test_a_nan_validation_loss_never_becomes_theta_best_or_theta_final(tmp_path, tiny_model_dir, prepared_data,
                                                                       monkeypatch):
    _nan_validation(monkeypatch, nan_from_epoch=1)
    run = tmp_path / "all_nan"
    summary = te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, run)))
    assert summary["exit_code"] == te.EXIT_NONFINITE == 4 and summary["status"] == "failed: no finite validation loss"
    assert not (run / "theta_best").exists() and not (run / "theta_final").exists()
    assert te.find_resume_checkpoint(run / "checkpoints") is not None  # the checkpoints are kept
    assert json.loads((run / "training_config.json").read_text())["summary"]["exit_code"] == 4
    assert "neither theta_best/ nor theta_final/ was written" in (run / "train.log").read_text()


def test_a_nan_epoch_after_a_finite_one_keeps_the_finite_one(tmp_path, tiny_model_dir, prepared_data, monkeypatch):
    _nan_validation(monkeypatch, nan_from_epoch=2)
    run = tmp_path / "nan_later"
    summary = te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, run)))
    assert summary["exit_code"] == 0 and summary["best_epoch"] == 1 and math.isfinite(summary["best_val_loss"])
    assert json.loads((run / "theta_final" / "theta_run.json").read_text())["epoch"] == 1


def test_an_output_dir_that_is_a_file_is_refused_naming_the_flag(tmp_path, tiny_model_dir, prepared_data, capsys):
    afile = tmp_path / "run"
    afile.write_text("a file")
    assert run_entry_point(te.main, _argv(tiny_model_dir, prepared_data, afile)) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {afile} is a file, not a folder" in err and "Traceback" not in err


def _prepared(tmp_path: Path, prepared_data: Path, change) -> Path:
    data = json.loads(prepared_data.read_text())
    change(data["records"])
    path = tmp_path / "prepared.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change,named", [
    (lambda recs: recs[5].update(quality_score="high"), "record 5 (id {ids[5]!r}) has quality_score 'high'"),
    (lambda recs: recs[7].update(difficulty=float("nan")), "record 7 (id {ids[7]!r}) has difficulty nan"),
    (lambda recs: [r.update(answer="  ") for r in recs if r.get("split", "train") == "train"],
     "every one of its {n_train} training records has an empty answer"),
])
def test_bad_records_are_refused_naming_the_file_and_record(tmp_path, tiny_model_dir, prepared_data, change, named,
                                                            capsys):
    data = _prepared(tmp_path, prepared_data, change)
    records = json.loads(data.read_text())["records"]
    named = named.format(ids=[r.get("id") for r in records],
                         n_train=sum(r.get("split", "train") == "train" for r in records))
    assert run_entry_point(te.main, _argv(tiny_model_dir, data, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"--data_path {data}" in err and named in err and "Traceback" not in err, err
