"""The overnight scripts: the .sh chains its steps in order with the helper's flags (its Python steps replaced by
tests/overnight_stub/python_stub.py, which records them), resumes only what it should, stops at a failing step
and before any step when the pre-flight fails, and on SIGTERM/SIGINT stops the running step, leaves no process
behind, reports once and resumes without redoing finished steps; the real .sh pipeline runs in a copy of the
project whose path has a space, emails its progress to a local SMTP server, leaks no password and resumes after
being killed.
The .bat runs for real under Wine in tests/test_bat_wine.py.

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
import sys
import time
from pathlib import Path

import pytest

from test_email_notifier import PASSWORD, SmtpServer, email_env, parts, subj, tls_cert  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
SH = ROOT / "train_overnight_enhanced.sh"
BAT = ROOT / "train_overnight_enhanced.bat"
STUB = ROOT / "tests" / "overnight_stub" / "python_stub.py"
# Files under test come from the working tree; the rest of src/ from the last commit (see copy_project).
OWN_FILES = [SH.name, BAT.name, "src/utils/overnight.py", "src/utils/step_runner.py", "src/utils/run_lock.py", "src/training/preflight.py",
             "src/training/run_emails.py", "src/training/report.py", "src/utils/email_notifier.py",
             "src/utils/gpu_info.py"]
STEP_MODULES = ["src.training.preflight", "src.data_processing.knowledge_base_enhancer_main",
                "src.data_processing.prepare_data_for_training", "src.training.train_enhanced",
                "src.training.evaluate_model", "src.training.optimize_for_inference"]


def copy_project(d: Path, datasets: Path) -> Path:
    """src/, Datasets/ (the given records as the user's own, the sample's knowledge/ notes as the user's notes,
    the sample folder as shipped), the requirements and the scripts in ``d``; .venv is a symlink (the bootstrap
    sees its stamp and installs nothing).

    src/ is the committed tree, so that half-saved edits elsewhere in a shared checkout do not break these tests;
    the files under test come from the working tree. Without git: the working tree.
    """
    d.mkdir(parents=True)
    paths = ["src", "Datasets", "requirements.txt", "requirements-dev.txt"]
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
    for f in datasets.iterdir():
        shutil.copy2(f, d / "Datasets" / f.name)
    if (d / "Datasets" / "sample" / "knowledge").is_dir():
        shutil.copytree(d / "Datasets" / "sample" / "knowledge", d / "Datasets" / "knowledge")
    for rel in OWN_FILES:
        shutil.copy2(ROOT / rel, d / rel)
    (d / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    return d


def clean_env(**more) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EMAIL_", "THETA_", "STUB_"))}
    base.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **more)
    return base


# ---------------------------------------------------------------------------------------------------------------
# The .sh with its Python steps stubbed: control flow, flags, resume rules (seconds)
# ---------------------------------------------------------------------------------------------------------------

class StubbedRun:
    """Runs the project's .sh with THETA_PYTHON=python_stub.py; the helper and email glue run for real."""

    def __init__(self, project: Path):
        self.project = project
        self.log = project.parent / "stub_calls.jsonl"

    def __call__(self, *args: str, exit_codes: dict | None = None, real: tuple = (),
                 env: dict | None = None) -> tuple[int, str, list]:
        proc = self.start(*args, exit_codes=exit_codes, real=real, env=env)
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out, self.calls()

    def start(self, *args: str, exit_codes: dict | None = None, real: tuple = (),
              env: dict | None = None) -> subprocess.Popen:
        """The script, started in a session of its own: its pid is its process group's id."""
        self.log.write_text("")
        env = clean_env(THETA_PYTHON=str(STUB), STUB_LOG=str(self.log), STUB_REAL_PYTHON=sys.executable,
                        STUB_REAL=",".join(["src.utils.overnight", "src.utils.run_lock", *real]),
                        STUB_EXIT=json.dumps(exit_codes or {}), **(env or {}))
        return subprocess.Popen([str(self.project / SH.name), *args], cwd=self.project.parent, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def calls(self) -> list:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def runs(self) -> list[str]:
        return sorted(p.name for p in (self.project / "models").glob("theta_enhanced_*"))


def step_calls(calls: list[list[str]]) -> list[list[str]]:
    """The calls of the steps and of the helper's subcommands, as ``[module, args...]``; the step runner's own
    calls (``overnight step``) are left out: the step's call follows each; so is the script's lock."""
    return [c[1:] for c in calls if c[:1] == ["-m"] and c[1:3] != ["src.utils.overnight", "step"]
            and c[1:2] != ["src.utils.run_lock"]]


@pytest.fixture
def stubbed(tmp_path, tiny_datasets_dir) -> StubbedRun:
    return StubbedRun(copy_project(tmp_path / "my theta", tiny_datasets_dir))


def test_steps_run_in_order_with_the_helpers_flags(stubbed):
    code, out, calls = stubbed("--profile", "quick", "--", "--epochs", "2", "--note", "a b & c")
    assert code == 0, out
    (run,) = stubbed.runs()
    modules = [c[0] + (f" {c[1]}" if c[0] == "src.utils.overnight" else "") for c in step_calls(calls)]
    assert modules == ["src.utils.overnight plan", "src.training.preflight", "src.utils.overnight banner",
                       "src.utils.overnight start", "src.data_processing.knowledge_base_enhancer_main",
                       "src.data_processing.prepare_data_for_training", "src.utils.overnight prepared",
                       "src.training.preflight", "src.training.train_enhanced", "src.training.evaluate_model",
                       "src.training.optimize_for_inference", "src.utils.overnight completed"]
    by_module = {c[0]: c[1:] for c in step_calls(calls)}
    train = by_module["src.training.train_enhanced"]
    # The trainer flags after -- arrive unchanged, one argument each, after the script's own.
    assert train == ["--profile", "quick", "--data_path", "Datasets/enhanced_training_data.json", "--output_dir",
                     f"models/{run}", "--resume", "auto", "--epochs", "2", "--note", "a b & c"]
    plan = json.loads((stubbed.project / "models" / run / "overnight.json").read_text())["plan"]
    assert plan["prepare_flags"] == ["--profile", "quick"]
    # No --test_set: preparation and evaluation agree on the held-out set through src/utils/data_layout.py.
    assert by_module["src.data_processing.prepare_data_for_training"] == [
        "--datasets_dir", "Datasets", "--output", "Datasets/enhanced_training_data.json", *plan["prepare_flags"]]
    assert by_module["src.training.evaluate_model"] == [
        "--model_path", f"models/{run}/theta_final", "--output_file", f"stats/evaluation_{run}.json"]
    assert plan["optimise_flags"] == ["--quantize", "auto"]
    assert by_module["src.training.optimize_for_inference"] == [
        "--model_path", f"models/{run}/theta_final", "--output_path", f"models/{run}/theta_inference",
        *plan["optimise_flags"]]
    first_preflight = [c for c in step_calls(calls) if c[0] == "src.training.preflight"][0]
    assert first_preflight[-4:] == ["--epochs", "2", "--note", "a b & c"] and "--no_data" in first_preflight
    for header in ["[pre-flight]", "[1/5] knowledge base", "[2/5] prepare data", "[3/5] train", "[4/5] evaluate",
                   "[5/5] optimise for inference", f"Done: {run}"]:
        assert header in out
    assert out.index("[1/5]") < out.index("[2/5]") < out.index("[3/5]") < out.index("[4/5]") < out.index("[5/5]")
    assert (stubbed.project / "models" / run / "DONE").is_file()
    log = (stubbed.project / "logs" / f"training_enhanced_{run}.log").read_text()
    assert f"Theta overnight run {run}" in log and "[5/5] optimise for inference" in log


def test_resume_follows_the_fingerprint(stubbed):
    """Changing a dataset file between two invocations starts a new run; the same command resumes."""
    code, out, _ = stubbed("--profile", "quick", exit_codes={"src.training.train_enhanced": 3})
    assert code == 3 and "FAILED at step 'train' (exit 3)" in out
    (first,) = stubbed.runs()
    code, out, calls = stubbed("--profile", "quick", exit_codes={"src.training.train_enhanced": 3})
    assert stubbed.runs() == [first] and f"Theta overnight run {first} (resuming)" in out
    assert "prepare data: skipped: resuming, the run keeps the data it started with" in out
    assert "src.data_processing.prepare_data_for_training" not in [c[0] for c in step_calls(calls)]
    # The data changes: a new run, and the banner says why and how to continue the old one.
    part = stubbed.project / "Datasets" / "part_a.json"
    part.write_text(part.read_text().replace("filters network traffic", "filters traffic"))
    code, out, _ = stubbed("--profile", "quick", exit_codes={"src.training.train_enhanced": 3})
    second = [r for r in stubbed.runs() if r != first]
    assert len(second) == 1 and f"Theta overnight run {second[0]}\n" in out
    assert (f"Datasets/ changed (part_a.json changed) since run {first} was started: starting a new run; "
            f"`--resume {first}` continues the old one") in out
    # Other trainer flags: a new run too.
    code, out, _ = stubbed("--profile", "quick", "--", "--epochs", "9", exit_codes={"src.training.train_enhanced": 3})
    assert len(stubbed.runs()) == 3 and "the trainer flags changed (none, now --epochs 9)" in out
    # --resume picks the old one and warns what changed (--fresh and the rest: tests/test_overnight_helper.py).
    code, out, _ = stubbed("--profile", "quick", "--resume", first, exit_codes={"src.training.train_enhanced": 3})
    assert f"Theta overnight run {first} (resuming)" in out and f"resuming {first} as asked although" in out


def test_a_run_that_ended_with_a_user_error_is_not_resumed(stubbed):
    code, out, _ = stubbed("--profile", "quick", exit_codes={"src.training.train_enhanced": 2})
    assert code == 2 and "user error (exit 2)" in out
    (first,) = stubbed.runs()
    code, out, _ = stubbed("--profile", "quick")
    assert code == 0 and len(stubbed.runs()) == 2
    assert f"run {first} ended with a user error at step 'train' (exit 2): not resumed" in out


def test_failing_step_stops_the_chain(stubbed):
    code, out, calls = stubbed("--profile", "quick", exit_codes={"src.training.evaluate_model": 1})
    assert code == 1 and "FAILED at step 'evaluate' (exit 1)" in out and "log:   logs/training_enhanced_" in out
    assert "src.training.optimize_for_inference" not in [c[0] for c in step_calls(calls)]
    (run,) = stubbed.runs()
    assert not (stubbed.project / "models" / run / "DONE").exists()
    state = json.loads((stubbed.project / "models" / run / "overnight.json").read_text())
    assert state["events"][-1] == {**state["events"][-1], "event": "failed", "step": "evaluate", "exit_code": 1}


def test_prepare_failure_stops_before_training_even_with_an_old_prepared_file(stubbed):
    """Regression (stale data): a failed preparation used to train on the previous prepared file."""
    (stubbed.project / "Datasets" / "enhanced_training_data.json").write_text('{"records": []}')
    code, out, calls = stubbed("--profile", "quick",
                               exit_codes={"src.data_processing.prepare_data_for_training": 2})
    assert code == 2 and "FAILED at step 'prepare data'" in out
    assert "src.training.train_enhanced" not in [c[0] for c in step_calls(calls)]


def test_bad_arguments_and_help(stubbed):
    code, out, calls = stubbed("--profile", "huge")
    assert code == 2 and "invalid choice: 'huge'" in out and stubbed.runs() == []
    code, out, _ = stubbed("--gpus", "0")
    assert code == 2 and "--gpus must be a whole number of at least 1" in out
    code, out, _ = stubbed("--resume", "theta_enhanced_20200101_000000")
    assert code == 2 and "no such run folder" in out
    code, out, _ = stubbed("--help")
    assert code == 0 and "--profile {quick,rtx3060,rtx3060-lora}" in out and "TRAINING_PIPELINE.md" in out
    assert stubbed.runs() == []


def test_preflight_alone_runs_no_step(stubbed):
    code, out, calls = stubbed("--preflight", "--profile", "quick", "--", "--epochs", "2")
    assert code == 0 and stubbed.runs() == []
    (call,) = [c for c in step_calls(calls) if c[0] != "src.utils.overnight"]
    assert call[0] == "src.training.preflight" and "--email_test" in call and call[-2:] == ["--epochs", "2"]


def held_step(hold: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """The pid of the stub step that holds on ``hold`` (python_stub.py writes it), once it is running."""
    pid_file = Path(f"{hold}.pid")
    deadline = time.time() + timeout
    while not pid_file.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and pid_file.is_file(), "the held step never started"
    time.sleep(0.2)  # past the stub's first lines: it is waiting now
    return int(pid_file.read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_during_evaluation_leaves_nothing_running_reports_once_and_the_rerun_skips_training(
        stubbed, tls_cert):
    """Regression (orphans): SIGTERM to the script during evaluation left evaluate_model and two tees running,
    printed no FAILED line and sent no email; a rerun trained again."""
    server = SmtpServer(*tls_cert)
    hold = stubbed.project.parent / "release_evaluation"
    try:
        proc = stubbed.start("--profile", "quick", env={**email_env(server.port, tls_cert[0]),
                                                        "STUB_HOLD": f"src.training.evaluate_model={hold}"})
        step_pid = held_step(hold, proc)
        os.kill(proc.pid, signal.SIGTERM)  # the script only, as `kill PID` or a service manager would
        out, _ = proc.communicate(timeout=60)
        msgs = server.wait_for(2)
    finally:
        server.stop()
    assert proc.returncode == 143, out
    assert out.count("FAILED at step 'evaluate' (interrupted by SIGTERM, exit 143)") == 1
    assert "run the same command again to resume" in out
    # Nothing left behind: not the step (in a session of its own), nothing of the script's process group.
    assert gone(step_pid) and group_gone(step_pid) and group_gone(proc.pid)
    failed = [m for m in msgs if subj(m).startswith("[Theta] FAILED")]
    assert len(failed) == 1 and " at evaluate: " in subj(failed[0])
    assert "interrupted by SIGTERM" in parts(failed[0])["text/plain"]
    (run,) = stubbed.runs()
    state = json.loads((stubbed.project / "models" / run / "overnight.json").read_text())
    assert state["events"][-1] == {**state["events"][-1], "event": "interrupted", "step": "evaluate",
                                   "exit_code": 143, "signal": "SIGTERM"}
    assert [r["step"] for r in state["finished_steps"]] == ["train"]
    log = (stubbed.project / "logs" / f"training_enhanced_{run}.log").read_text()
    assert "FAILED at step 'evaluate'" in log
    # The same command resumes the run; training finished and is skipped, evaluation runs, the run completes.
    code, out, calls = stubbed("--profile", "quick")
    assert code == 0, out
    assert f"Theta overnight run {run} (resuming)" in out and "[3/5] train: skipped: finished at " in out
    modules = [c[0] for c in step_calls(calls)]
    assert "src.training.train_enhanced" not in modules and "src.training.evaluate_model" in modules
    assert (stubbed.project / "models" / run / "DONE").is_file()


def test_a_second_script_in_the_same_project_is_refused_naming_the_first(stubbed):
    """Regression (two runs in one folder): the script started twice (a double-click, or the same command typed
    again) ran twice over the same run, writing over each other. The second now exits 2 at once, naming the first;
    the first runs on to the end untouched; once it has ended, the lock is free again (nothing to clean up)."""
    hold = stubbed.project.parent / "release_training"
    first = stubbed.start("--profile", "quick", env={"STUB_HOLD": f"src.training.train_enhanced={hold}"})
    held_step(hold, first)
    second = subprocess.run([str(stubbed.project / SH.name), "--profile", "quick"], cwd=stubbed.project.parent,
                            env=clean_env(THETA_PYTHON=str(STUB), STUB_LOG=str(stubbed.project.parent / "second"),
                                          STUB_REAL_PYTHON=sys.executable,
                                          STUB_REAL="src.utils.overnight,src.utils.run_lock"),
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stdout + second.stderr
    message = second.stdout + second.stderr
    assert f"overnight run by pid {first.pid} on " in message and "one overnight run per project folder" in message
    assert "Traceback" not in message
    hold.write_text("go")
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    (run,) = stubbed.runs()
    assert (stubbed.project / "models" / run / "DONE").is_file()
    code, out, _ = stubbed("--profile", "quick")  # the lock went with the first script
    assert code == 0, out


def test_sigint_during_training_stops_it_and_the_rerun_trains_again(stubbed):
    hold = stubbed.project.parent / "release_training"
    proc = stubbed.start("--profile", "quick", env={"STUB_HOLD": f"src.training.train_enhanced={hold}"})
    step_pid = held_step(hold, proc)
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert out.count("FAILED at step 'train' (interrupted by SIGINT, exit 130)") == 1
    assert gone(step_pid) and group_gone(proc.pid)
    (run,) = stubbed.runs()
    code, out, calls = stubbed("--profile", "quick")
    assert code == 0 and f"Theta overnight run {run} (resuming)" in out
    assert "src.training.train_enhanced" in [c[0] for c in step_calls(calls)]  # it had not finished


def test_sh_syntax():
    assert subprocess.run(["bash", "-n", str(SH)]).returncode == 0


def test_bat_is_portable():
    raw = BAT.read_bytes()
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n"), "cmd.exe wants CRLF line ends"
    text = raw.decode("ascii")
    assert not re.search(r"(?i)\b[a-z]:\\", text), "no drive letters"
    assert 'cd /d "%~dp0"' in text  # works from any current directory, spaces included
    assert "bootstrap_env.py --requirements requirements.txt" in text
    # Paths holding the project folder are always quoted.
    for line in text.splitlines():
        if line.lower().startswith("rem "):
            continue
        for var in ("%PY%", "%LOG%", "%RUN_DIR%", "%STEP_OUT%", "%PLAN%"):
            for m in re.finditer(re.escape(var), line):
                before = line[:m.start()]
                assert before.count('"') % 2 == 1 or line.lstrip().lower().startswith("set "), line


# ---------------------------------------------------------------------------------------------------------------
# Real runs of the .sh in a copy of the project
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, tiny_datasets_dir) -> Path:
    return copy_project(tmp_path / "my theta", tiny_datasets_dir)


def run_sh(project: Path, trainer_flags: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    # Started from another directory on purpose: the script must find its own folder.
    return subprocess.Popen([str(project / SH.name), "--profile", "quick", "--", *trainer_flags], cwd=project.parent,
                            env=clean_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


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
        assert "pre-flight ok in" in out and "training about" in out
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


def test_missing_model_stops_at_preflight_and_sends_the_failure_email(project, tls_cert):
    server = SmtpServer(*tls_cert)
    try:
        proc = run_sh(project, ["--model_name", str(project / "no such model")],
                      env=email_env(server.port, tls_cert[0]))
        out, _ = proc.communicate(timeout=300)
        msgs = server.wait_for(1)
    finally:
        server.stop()
    assert proc.returncode == 2, out[-3000:]
    assert "FAILED at step 'pre-flight'" in out and "log:   logs/training_enhanced_theta_enhanced_" in out
    assert "FATAL model" in out and "fix:" in out and "[1/5]" not in out
    assert list((project / "models").glob("theta_enhanced_*")) == []  # nothing had run: no run folder left
    failed = [m for m in msgs if subj(m).startswith("[Theta] FAILED")]
    assert len(failed) == 1 and " at pre-flight: " in subj(failed[0])
    body = parts(failed[0])["text/plain"]
    assert "step 'pre-flight' failed with exit code 2" in body and "model folder not found" in body


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
