"""The overnight scripts: .sh and .bat run the same steps with the same flags; the .sh pipeline really runs (in a
copy of the project whose path has a space), emails its progress to a local SMTP server, leaks no password,
stops and reports a failing step, and resumes the same run after being killed.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_overnight_scripts.py -q            # all
    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_overnight_scripts.py -q -m "not slow"
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_email_notifier import PASSWORD, SmtpServer, email_env, parts, subj, tls_cert  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SH = ROOT / "train_overnight_enhanced.sh"
BAT = ROOT / "train_overnight_enhanced.bat"


# ---------------------------------------------------------------------------------------------------------------
# The two scripts agree
# ---------------------------------------------------------------------------------------------------------------

def logical_lines(text: str, continuation: str) -> list[str]:
    """Lines with continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith(continuation):
            buf += line[:-1] + " "
            continue
        line = buf + line
        buf = ""
        if not line.strip().lower().startswith(("#", "rem ", "::")):
            out.append(line)
    return out


def python_calls(text: str, continuation: str) -> list[tuple[str, tuple[str, ...]]]:
    """Every ``-m <module> [subcommand]`` the script runs, in order, with the ``--flags`` that follow it.

    Where one line runs a module through another (the .bat's tee), the last module counts.
    """
    calls = []
    for line in logical_lines(text, continuation):
        found = [m for m in re.finditer(r"-m ([\w.]+)(?: (start|failed|completed|tee)\b)?", line)
                 if m.group(2) != "tee"]  # the .bat's tee runs the real command
        if not found:
            continue
        m = found[-1]
        name = m.group(1) + (f" {m.group(2)}" if m.group(2) else "")
        calls.append((name, tuple(re.findall(r"(?<![\w-])--[a-z][a-z_-]*", line[m.end():]))))
    return calls


def flag_definitions(text: str, name: str) -> list[str]:
    return sorted(set(f for line in text.splitlines() if name in line and ("=(" in line or "set \"" in line)
                      for f in re.findall(r"--[a-z_]+", line)))


def test_sh_and_bat_run_the_same_steps_with_the_same_flags():
    sh = python_calls(SH.read_text(encoding="utf-8"), "\\")
    bat = python_calls(BAT.read_text(encoding="utf-8"), "^")
    # The failure command sits in a function before the steps in bash and after them in cmd: compare it apart.
    sh_fail = [c for c in sh if c[0].endswith(" failed")]
    bat_fail = [c for c in bat if c[0].endswith(" failed")]
    assert sh_fail == bat_fail and len(sh_fail) == 1
    sh_steps = [c for c in sh if not c[0].endswith(" failed")]
    bat_steps = [c for c in bat if not c[0].endswith(" failed")]
    assert sh_steps == bat_steps
    modules = [c[0] for c in sh_steps]
    assert modules.index("src.training.email_integration start") < modules.index(
        "src.data_processing.prepare_data_for_training") < modules.index("src.training.train_enhanced") < \
        modules.index("src.training.evaluate_model") < modules.index("src.training.optimize_for_inference") < \
        modules.index("src.training.email_integration completed")
    train = dict(sh_steps)["src.training.train_enhanced"]
    assert train == ("--profile", "--data_path", "--output_dir", "--resume")
    for variable in ("PREPARE_PROFILE_FLAGS", "RESUMING_FLAG"):
        assert flag_definitions(SH.read_text(), variable) == flag_definitions(BAT.read_text(), variable) != []
    for text in (SH.read_text(), BAT.read_text()):
        assert "THETA_NOTIFY_FROM_SCRIPT=1" in text and "--tensorboard" in text and "--gpus" in text


def test_bat_is_portable():
    raw = BAT.read_bytes()
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n"), "cmd.exe wants CRLF line ends"
    text = raw.decode("ascii")
    assert not re.search(r"(?i)\b[a-z]:\\", text), "no drive letters"
    assert 'cd /d "%~dp0"' in text  # works from any current directory, spaces included
    assert "bootstrap_env.py --requirements requirements.txt" in text
    # Paths holding the project folder are always quoted.
    for line in logical_lines(text, "^"):
        for var in ("%PY%", "%LOG%", "%RUN_DIR%", "%STEP_OUT%"):
            for m in re.finditer(re.escape(var), line):
                before = line[:m.start()]
                assert before.count('"') % 2 == 1 or line.lstrip().lower().startswith("set "), line


def test_sh_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SH)]).returncode == 0
    out = subprocess.run([str(SH), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--profile quick" in out.stdout
    bad = subprocess.run([str(SH), "--profile", "huge"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "quick or rtx3060" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# Real runs of the .sh in a copy of the project
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, tiny_datasets_dir) -> Path:
    """src/, Datasets/ (the tiny records plus the repository's knowledge/ folder; prepare creates the test set),
    the requirements and the scripts in a folder with a space; .venv is a symlink (the bootstrap sees its stamp
    and installs nothing)."""
    d = tmp_path / "my theta"
    d.mkdir()
    paths = ["src", "Datasets", "requirements.txt", "requirements-dev.txt"]
    # The committed tree, so that half-saved edits elsewhere in a shared checkout do not break this test; the
    # files under test come from the working tree. Without git: the working tree.
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD", *paths],
                             capture_output=True)
    if archive.returncode == 0:
        subprocess.run(["tar", "-x", "-C", str(d)], input=archive.stdout, check=True)
    else:
        shutil.copytree(ROOT / "src", d / "src", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "Datasets", d / "Datasets")
        for name in paths[2:]:
            shutil.copy2(ROOT / name, d / name)
    for f in (d / "Datasets").iterdir():
        if f.suffix in (".json", ".jsonl"):
            f.unlink()
    for f in tiny_datasets_dir.iterdir():
        shutil.copy2(f, d / "Datasets" / f.name)
    for rel in (SH.name, BAT.name, "src/utils/email_notifier.py", "src/utils/gpu_info.py",
                "src/training/email_integration.py"):
        shutil.copy2(ROOT / rel, d / rel)
    (d / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    return d


def run_sh(project: Path, trainer_flags: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EMAIL_", "THETA_NOTIFY"))}
    base.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    # Started from another directory on purpose: the script must find its own folder.
    return subprocess.Popen([str(project / SH.name), "--profile", "quick", "--", *trainer_flags], cwd=project.parent,
                            env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def tiny_flags(model_dir: Path, epochs: int = 2) -> list[str]:
    return ["--model_name", str(model_dir), "--epochs", str(epochs), "--max_length", "128", "--num_samples", "1"]


@pytest.mark.slow
def test_quick_pipeline_emails_and_leaks_no_password(project, tiny_model_dir, tls_cert):
    server = SmtpServer(*tls_cert)
    try:
        proc = run_sh(project, tiny_flags(tiny_model_dir), env=email_env(server.port, tls_cert[0]))
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
        (run_dir,) = (project / "models").glob("theta_enhanced_*")
        run = run_dir.name
        assert (run_dir / "DONE").is_file() and (run_dir / "theta_inference").is_dir()
        assert f"Theta overnight run {run}" in out and "profile     quick" in out and "email: from" in out
        msgs = server.wait_for(4)
    finally:
        server.stop()
    subjects = [subj(m) for m in msgs]
    assert subjects[0].startswith(f"[Theta] started: {run}")
    assert [s for s in subjects if s.startswith("[Theta] epoch ")][:2] == [
        s for s in subjects if re.match(r"\[Theta\] epoch [12]/2: val loss \d", s)]
    assert sum(s.startswith("[Theta] epoch ") for s in subjects) == 2, subjects
    assert not any(s.startswith("[Theta] FAILED") for s in subjects)
    # One start and one completion only: the trainer leaves those to the script (THETA_NOTIFY_FROM_SCRIPT=1).
    assert sum(s.startswith("[Theta] started") for s in subjects) == 1
    (done,) = [m for m in msgs if subj(m).startswith("[Theta] completed")]
    assert subjects[-1] == subj(done) and "test perplexity" in subj(done)
    names = {p.get_filename() for p in done.iter_attachments()}
    assert names == {"loss_curve.png", f"evaluation_{run}.json"}
    evaluation = json.loads((project / "stats" / f"evaluation_{run}.json").read_text())
    assert f"{evaluation['perplexity']:.2f}" in parts(done)["text/plain"]
    log = project / "logs" / f"training_enhanced_{run}.log"
    assert "[5/5] optimise for inference" in log.read_text() and "Done:" in log.read_text()
    # The password is nowhere in what the run wrote: logs, train.log, training_config.json, checkpoints,
    # tensorboard events, stats.
    needle = PASSWORD.encode()
    written = [p for p in project.rglob("*") if p.is_file() and not p.is_symlink() and ".venv" not in p.parts]
    assert any(p.name == "train.log" for p in written) and any("tfevents" in p.name for p in written)
    assert any(p.name == "training_config.json" for p in written)
    assert [p for p in written if needle in p.read_bytes()] == []
    assert PASSWORD not in out


def test_failing_step_stops_the_chain_and_sends_the_failure_email(project, tls_cert):
    server = SmtpServer(*tls_cert)
    try:
        proc = run_sh(project, ["--model_name", str(project / "no such model")],
                      env=email_env(server.port, tls_cert[0]))
        out, _ = proc.communicate(timeout=300)
        msgs = server.wait_for(2)
    finally:
        server.stop()
    assert proc.returncode != 0
    assert "FAILED at step 'train'" in out and "log:   logs/training_enhanced_theta_enhanced_" in out
    assert "error:" in out and "[4/5] evaluate" not in out
    failed = [m for m in msgs if subj(m).startswith("[Theta] FAILED")]
    assert len(failed) == 1 and " at train: " in subj(failed[0])
    body = parts(failed[0])["text/plain"]
    assert "step 'train' failed with exit code" in body and "Last 40 lines of the log" in body
    (run_dir,) = (project / "models").glob("theta_enhanced_*")
    assert not (run_dir / "DONE").exists()


def test_prepare_failure_falls_back_to_the_previous_file_only_when_one_exists(project, prepared_data):
    datasets = project / "Datasets"
    for f in datasets.iterdir():  # nothing left to prepare: data preparation fails
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    env = {"PATH": os.environ["PATH"]}
    proc = run_sh(project, ["--model_name", str(project / "no such model")], env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "FAILED at step 'prepare data'" in out, out[-2000:]
    shutil.rmtree(project / "models")
    shutil.copy2(prepared_data, datasets / "enhanced_training_data.json")
    proc = run_sh(project, ["--model_name", str(project / "no such model")], env=env)
    out, _ = proc.communicate(timeout=300)
    assert "WARNING: data preparation FAILED; training on the PREVIOUS" in out
    assert proc.returncode != 0 and "FAILED at step 'train'" in out


@pytest.mark.slow
def test_killed_run_is_resumed_by_running_the_same_command(project, tiny_model_dir):
    flags = tiny_flags(tiny_model_dir, epochs=3)
    proc = run_sh(project, flags)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((project / "models").glob("theta_enhanced_*/checkpoints/*/COMPLETE")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before a checkpoint appeared"
        os.killpg(proc.pid, signal.SIGKILL)  # like a crash or a power cut: no clean-up at all
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = (project / "models").glob("theta_enhanced_*")
    assert not (run_dir / "DONE").exists()
    again = run_sh(project, flags)
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out[-3000:]
    assert [p.name for p in (project / "models").glob("theta_enhanced_*")] == [run_dir.name]
    assert f"Theta overnight run {run_dir.name} (resuming)" in out
    assert "prepare data: skipped: resuming" in out
    assert (run_dir / "DONE").is_file() and (run_dir / "theta_final").is_dir()
    train_log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert re.search(r"resum", train_log, re.IGNORECASE), "the trainer should say it resumed from a checkpoint"
    history = json.loads((run_dir / "loss_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
