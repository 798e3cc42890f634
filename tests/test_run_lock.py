"""src/utils/run_lock.py: one process per run folder. Two trainers in one --output_dir (the second exits 2 naming
the first; the first's files are whole), evaluation and optimisation refused while the run is locked, a holder
killed with -9 blocks nobody, and ``hold`` hands its lock down to its command.

    .venv/bin/python -m pytest tests/test_run_lock.py -q

Oracles: the holder's own pid and host (from the process the test started), and the step numbers and run headers
of the first trainer's metrics.jsonl and train.log as an uninterrupted run writes them (each step once, one header).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from src.utils.common import run_entry_point
from src.utils.run_lock import LOCK_NAME, RunLock, RunLocked, holder_of

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the tests kill process groups (POSIX)")


def _hold(folder: Path, *command: str) -> subprocess.Popen:
    """``python -m src.utils.run_lock hold --dir folder -- command`` in its own process group, once it holds."""
    proc = subprocess.Popen([sys.executable, "-m", "src.utils.run_lock", "hold", "--dir", str(folder), "--",
                             *command], cwd=PROJECT_ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: holder_of(folder) is not None and holder_of(folder).get("pid") == proc.pid, proc)
    return proc


def _wait_until(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


SLEEP = (sys.executable, "-c", "import time; time.sleep(60)")


def test_a_second_taker_is_refused_naming_the_holder_and_a_killed_holder_blocks_nobody(tmp_path):
    folder = tmp_path / "run"
    proc = _hold(folder, *SLEEP)
    try:
        with pytest.raises(RunLocked) as refused:
            RunLock(folder, "training", hint="a separate run needs its own --output_dir").acquire()
        message = str(refused.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and "overnight run" in message
        assert "src.utils.run_lock hold" in message and f"kill {proc.pid}" in message
        assert "its own --output_dir" in message
        check = subprocess.run([sys.executable, "-m", "src.utils.run_lock", "check", "--dir", str(folder)],
                               cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert check.returncode == 2 and f"pid {proc.pid}" in check.stderr and "Traceback" not in check.stderr
    finally:
        _kill_group(proc)  # kill -9: no clean-up at all
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == proc.pid  # the dead holder's text stays...
    assert holder_of(folder) is None  # ...and holds nothing
    with RunLock(folder, "training") as lock:
        assert lock.mode == "own" and json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()  # a clean release leaves nothing behind


def test_a_taker_that_opened_a_lock_file_being_removed_starts_over(tmp_path, monkeypatch):
    """The race of removing lock files: A releases (removes, unlocks) while B has the old file open; B must not
    hold the removed file while a third process locks a new one under the same name."""
    from src.utils import run_lock

    folder = tmp_path / "run"
    first = RunLock(folder, "training").acquire()
    run_lock._HELD.clear()  # the second taker must not share it, as another process would not
    real_open, opened = os.open, []

    def open_then_release_the_first(path, *args):
        fd = real_open(path, *args)
        if not opened:  # B has the old file open; now A releases and removes it
            opened.append(fd)
            first.release()
        return fd

    monkeypatch.setattr(run_lock.os, "open", open_then_release_the_first)
    second = RunLock(folder, "training").acquire()
    monkeypatch.undo()
    assert second.mode == "own" and run_lock._same_file(second.fd, folder / LOCK_NAME)
    assert holder_of(folder)["pid"] == os.getpid()
    second.release()


def test_hold_hands_its_lock_to_its_command_and_keeps_it_while_the_command_runs(tmp_path):
    folder = tmp_path / "run"
    nested = subprocess.run([sys.executable, "-m", "src.utils.run_lock", "hold", "--dir", str(folder), "--",
                             sys.executable, "-m", "src.utils.run_lock", "hold", "--dir", str(folder), "--",
                             sys.executable, "-c", "raise SystemExit(7)"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True)
    assert nested.returncode == 7, nested.stderr  # the inner taker ran under its parent's lock; the code passes up
    proc = _hold(folder, *SLEEP)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # hold alone dies; its command still runs, and still holds the folder
        proc.wait()
        time.sleep(0.2)
        assert holder_of(folder) is not None
    finally:
        _kill_group(proc)
    assert holder_of(folder) is None


def _trainer_argv(env, out, *extra):
    return ["--model_name", str(env["model"]), "--data_path", str(env["data"]), "--output_dir", str(out),
            "--batch_size", "2", "--learning_rate", "3e-3", "--max_length", "64", "--num_samples", "0",
            "--domain_eval_frequency", "0", "--seed", "3", "--device", "cpu", "--no_progress_bar", *extra]


def test_two_trainers_in_one_folder_the_second_exits_2_and_the_first_runs_whole(tmp_path, tiny_model_dir,
                                                                                  prepared_data, capsys):
    import src.training.train_enhanced as te
    from src.training import evaluate_model, optimize_for_inference

    env = {"model": tiny_model_dir, "data": prepared_data}
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "src.training.train_enhanced",
                              *_trainer_argv(env, run, "--epochs", "6")], cwd=PROJECT_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        _wait_until(lambda: holder_of(run) is not None and holder_of(run).get("pid") == first.pid, first)
        second = run_entry_point(te.main, _trainer_argv(env, run, "--epochs", "6"))  # the same command again
        err = capsys.readouterr().err
        output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second == 2 and f"pid {first.pid} on {socket.gethostname()}" in err and "training" in err, err
    assert "src.training.train_enhanced" in err and "Traceback" not in err
    assert first.returncode == 0, output[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "training_config.json").read_text())["summary"]
    assert steps == list(range(1, summary["global_step"] + 1))  # every step once: nobody else wrote here
    assert (run / "train.log").read_text().count("Theta training run") == 1
    # Evaluation and optimisation of that run refuse while something holds it (here: a script's hold).
    holder = _hold(run, *SLEEP)
    try:
        stats = tmp_path / "stats" / "evaluation.json"
        code = run_entry_point(evaluate_model.main, ["--model_path", str(run / "theta_final"), "--test_data",
                                                     str(prepared_data.parent / "test_set.json"),
                                                     "--output_file", str(stats), "--device", "cpu"])
        assert code == 2 and f"pid {holder.pid}" in capsys.readouterr().err and not stats.exists()
        code = run_entry_point(optimize_for_inference.main, ["--model_path", str(run / "theta_final"),
                                                             "--device", "cpu"])
        assert code == 2 and f"pid {holder.pid}" in capsys.readouterr().err
        assert not (run / "theta_inference").exists()
    finally:
        _kill_group(holder)
