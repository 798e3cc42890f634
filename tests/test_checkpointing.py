"""src/training/checkpointing.py: no code runs from a checkpoint, and a checkpoint that loads but lacks what resume
needs is skipped like a torn one (``--resume auto`` falls back to an older one; ``--resume DIR`` exits 2 naming
what is wrong).

    .venv/bin/python -m pytest tests/test_checkpointing.py -q

Oracles: the planted payload runs under ``torch.load(weights_only=False)`` (so it is live), and its marker file;
an uninterrupted run's theta_final (a resume that fell back over bad checkpoints ends bit-identical to it);
draws of each generator before and after its state is restored.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import src.training.train_enhanced as te
from src.training import checkpointing as ck
from src.utils.common import run_entry_point, setup_logging


@pytest.fixture(autouse=True)
def fresh_logging():
    """Log to this test's captured output (an earlier in-process run left its handlers on a closed one)."""
    setup_logging(None)


def _argv(model_dir, data, out, *extra):
    return ["--model_name", str(model_dir), "--data_path", str(data), "--output_dir", str(out), "--epochs", "2",
            "--batch_size", "4", "--learning_rate", "3e-3", "--max_length", "96", "--num_samples", "0",
            "--seed", "3", "--no_progress_bar", "--domain_eval_frequency", "0", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, prepared_data):
    """An uninterrupted run, and the start of the same run stopped at step 3 with checkpoints step_1..3."""
    full = tmp_path_factory.mktemp("full")
    assert te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, full)))["exit_code"] == 0
    part = tmp_path_factory.mktemp("part")
    assert te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, part, "--save_every_steps", "1",
                                        "--keep_last_n_checkpoints", "9", "--stop_after_step", "3"))
                    )["exit_code"] == te.EXIT_INTERRUPTED
    return full, part


@pytest.fixture
def run(runs, tmp_path):
    """A fresh copy of the stopped run, to plant into."""
    shutil.copytree(runs[1], tmp_path / "run")
    return tmp_path / "run"


def _plant(run: Path, step: int, state) -> Path:
    """A folder that looks complete: the marker, a current checkpoint.json, and ``state`` as its state.pt."""
    folder = run / "checkpoints" / f"step_{step}"
    folder.mkdir()
    torch.save(state, folder / ck.STATE_FILE)
    (folder / ck.META_FILE).write_text(json.dumps({"version": ck.CHECKPOINT_VERSION, "global_step": step}))
    (folder / ck.COMPLETE_MARKER).write_text("complete\n")
    return folder


class Payload:
    """Unpickling this calls ``exec``, which writes a marker file: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def _model(tiny_model_dir):
    from src.model.theta_model import ThetaModel

    return ThetaModel.load(tiny_model_dir, device="cpu").model


def test_a_planted_pickle_payload_is_refused_unread_and_resume_falls_back(run, runs, tmp_path, tiny_model_dir,
                                                                        prepared_data, caplog, capsys):
    marker = tmp_path / "pwned"
    good = torch.load(run / "checkpoints" / "step_3" / ck.STATE_FILE, weights_only=True)
    planted = _plant(run, 9, {**good, "global_step": 9, "extra": Payload(marker)})
    torch.load(planted / ck.STATE_FILE, weights_only=False)  # the oracle: the payload is live...
    assert marker.read_text() == "the payload ran"
    marker.unlink()
    with caplog.at_level(logging.WARNING):  # ...and the safe loader never runs it
        path, state = ck.find_resume_checkpoint(run / "checkpoints", _model(tiny_model_dir))
    assert path.name == "step_3" and state["global_step"] == 3 and not marker.exists()
    warning = next(r.getMessage() for r in caplog.records if "step_9" in r.getMessage())
    assert "refused unread, nothing in it ran" in warning and "it would call exec" in warning
    code = run_entry_point(te.main, _argv(tiny_model_dir, prepared_data, run, "--resume", str(planted)))
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "refused unread" in err and "Traceback" not in err
    assert not marker.exists()
    # --resume auto (the same command again) skips it and ends as if nothing had happened
    assert te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, run)))["exit_code"] == 0
    assert not marker.exists()
    a, b = (load_file(str(r / "theta_final" / "model.safetensors")) for r in (runs[0], run))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage,named", [
    (lambda s: s.pop("args"), "missing 'args'"),
    (lambda s: s["run_state"].pop("epoch"), "missing 'run_state.epoch'"),
    (lambda s: s.update(optimizer=[1, 2]), "'optimizer' is a list, not dict"),
    (lambda s: s["model"].update({"transformer.wte.weight": torch.zeros(3, 3)}), "shapes differ: transformer.wte"),
    (lambda s: s["model"].pop("transformer.h.0.attn.c_attn.weight"), "transformer.h.0.attn.c_attn.weight"),
])
def test_a_checkpoint_that_loads_but_lacks_what_resume_needs_is_skipped_or_refused(run, tiny_model_dir,
                                                                                 prepared_data, damage, named,
                                                                                 caplog, capsys):
    state = torch.load(run / "checkpoints" / "step_3" / ck.STATE_FILE, weights_only=True)
    damage(state)
    state["global_step"] = state["run_state"]["global_step"] = 8  # newer than step_3: tried first
    bad = _plant(run, 8, state)
    with caplog.at_level(logging.WARNING):
        path, _ = ck.find_resume_checkpoint(run / "checkpoints", _model(tiny_model_dir))
    assert path.name == "step_3"  # fell back, as over a torn file
    assert any("skipping unusable checkpoint" in r.getMessage() and named in r.getMessage() for r in caplog.records)
    code = run_entry_point(te.main, _argv(tiny_model_dir, prepared_data, run, "--resume", str(bad)))
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err


def test_an_older_version_checkpoint_is_skipped_with_the_reason(run, caplog):
    old = run / "checkpoints" / "step_7"
    shutil.copytree(run / "checkpoints" / "step_3", old)
    (old / ck.META_FILE).unlink()  # what version 2 wrote: state.pt and the marker
    torn = run / "checkpoints" / "step_6"
    shutil.copytree(run / "checkpoints" / "step_3", torn)
    (torn / ck.STATE_FILE).write_bytes((torn / ck.STATE_FILE).read_bytes()[:5000])  # cut short
    with caplog.at_level(logging.WARNING):
        path, _ = ck.find_resume_checkpoint(run / "checkpoints")
    assert path.name == "step_3"
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "step_7" in messages and "older Theta" in messages and "step_6" in messages and "unreadable" in messages


def test_a_state_that_the_safe_loader_would_refuse_is_not_saved(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        ck.save_checkpoint(tmp_path, {"version": 3, "global_step": 1, "rng": {"numpy": ("MT", np.zeros(3))}}, 1)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ck.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
