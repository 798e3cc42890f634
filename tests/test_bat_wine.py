"""train_overnight_enhanced.bat run for real by Wine's cmd, its Python replaced by tests/overnight_stub/
python_stub.bat (which records each command line). The plan the helper would print is made beforehand by the real
src/utils/overnight.py; the .sh runs the same plan with python_stub.py, and both must make the same calls in the
same order, with the same arguments (quoting included), and end with the same exit codes. Each step is a call of
the lifecycle's step runner (``src.utils.overnight step ... -- PY -m <module> ...``), compared whole; the stubs
do not run the step inside it.

Skipped without wine (``apt-get install wine``); every wine start is bounded (its first start builds a prefix).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_bat_wine.py -q
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from src.utils import overnight as ov

ROOT = Path(__file__).resolve().parents[1]
STUB_DIR = ROOT / "tests" / "overnight_stub"
WINE = shutil.which("wine")
WINE_TIMEOUT_S = 180  # the first start creates ~/.wine (about 10 s here, minutes on a slow disk)
NOW = 1_800_000_000.0
ARGS = ["--profile", "quick", "--", "--epochs", "2", "--note", "a b & c (x)"]

pytestmark = pytest.mark.skipif(WINE is None, reason="wine is not installed (apt-get install wine)")


def win(path: Path) -> str:
    """Wine's Z: drive maps the Unix root."""
    return "Z:" + str(path).replace("/", "\\")


@pytest.fixture
def project(tmp_path) -> Path:
    """The two scripts and a Datasets/ folder in a folder whose name has a space and a parenthesis."""
    d = tmp_path / "my theta (test)"
    (d / "Datasets" / "knowledge").mkdir(parents=True)
    (d / "Datasets" / "a.json").write_text('[{"question": "q", "answer": "a"}]')
    (d / "src" / "data_processing").mkdir(parents=True)
    (d / "src" / "data_processing" / "knowledge_base_enhancer_main.py").write_text("")
    for name in ("train_overnight_enhanced.bat", "train_overnight_enhanced.sh"):
        shutil.copy2(ROOT / name, d / name)
    return d


@pytest.fixture(scope="module")
def call_keeps_exit_codes(tmp_path_factory) -> bool:
    """Whether this cmd returns a called batch file's exit code. Wine 8.0's does not: after ``call x.bat`` whose
    ``exit /b 3`` ran, ERRORLEVEL is 1. Windows keeps the 3, and the .bat calls python.exe there, not a batch file."""
    d = tmp_path_factory.mktemp("probe")
    (d / "three.bat").write_bytes(b"@exit /b 3\r\n")
    (d / "probe.bat").write_bytes(b"@call three.bat\r\n@echo code=%ERRORLEVEL%\r\n")
    try:
        out = subprocess.run([WINE, "cmd", "/c", "probe.bat"], cwd=d, capture_output=True, timeout=WINE_TIMEOUT_S,
                             env={**os.environ, "WINEDEBUG": "-all"}).stdout
    except subprocess.TimeoutExpired:
        pytest.skip(f"wine did not start within {WINE_TIMEOUT_S} s")
    return b"code=3" in out


def make_plan(project: Path, argv: list[str], **override) -> dict:
    plan = ov.make_plan(argv, project, now=NOW)
    plan.update(override)
    return plan


def run_bat(project: Path, plan: dict, argv: list[str], fail: tuple[str, int] | None = None,
            plan_code: int = 0) -> tuple[int, str, list[list[str]]]:
    (project / "plan.cmd").write_bytes(ov.format_plan(plan, "cmd").encode("utf-8"))
    log = project.parent / "bat_calls.txt"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMAIL_", "THETA_", "STUB_"))}
    env.update(WINEDEBUG="-all", THETA_PYTHON=win(STUB_DIR / "python_stub.bat"), STUB_LOG=win(log),
               STUB_PLAN=win(project / "plan.cmd"), STUB_PLAN_CODE=str(plan_code),
               STUB_FAIL=fail[0] if fail else "", STUB_FAIL_CODE=str(fail[1] if fail else 0))
    # cmd /c strips the outer quotes of a quoted script path followed by quoted arguments, so the script (in a
    # folder with a space and parentheses) is called from a one-line launcher in the parent folder, the way
    # another batch file or a shortcut would call it; the current directory is that parent, not the project.
    launcher = project.parent / "launch.bat"
    launcher.write_bytes(f'@call "%~dp0{project.name}\\train_overnight_enhanced.bat" %*\r\n'
                         '@exit /b %ERRORLEVEL%\r\n'.encode("ascii"))
    try:
        proc = subprocess.run([WINE, "cmd", "/c", launcher.name, *argv],
                              cwd=project.parent, env=env, capture_output=True, timeout=WINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["wineserver", "-k"], capture_output=True, timeout=30)
        pytest.skip(f"wine did not finish within {WINE_TIMEOUT_S} s (first start of a slow machine?)")
    out = proc.stdout.decode("utf-8", "replace").replace("\r\n", "\n")
    return proc.returncode, out, [bat_argv(line) for line in log.read_text(errors="replace").splitlines() if line]


def bat_argv(line: str) -> list[str]:
    """A recorded cmd line as the C runtime would split it (double quotes group, backslashes are literal)."""
    lex = shlex.shlex(line[1:] if line.startswith(".") else line, posix=True)
    lex.whitespace_split, lex.escape, lex.commenters = True, "", ""
    return list(lex)


def run_sh(project: Path, plan: dict, argv: list[str], fail: tuple[str, int] | None = None) -> tuple[int, str, list]:
    (project / "plan.sh").write_text(ov.format_plan(plan, "sh"))
    log = project.parent / "sh_calls.jsonl"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMAIL_", "THETA_", "STUB_"))}
    env.update(THETA_PYTHON=str(STUB_DIR / "python_stub.py"), STUB_LOG=str(log), STUB_PLAN=str(project / "plan.sh"),
               STUB_REAL="", STUB_EXIT=json.dumps({fail[0]: fail[1]} if fail else {}))
    proc = subprocess.run([str(project / "train_overnight_enhanced.sh"), *argv], cwd=project.parent, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, [json.loads(x) for x in log.read_text().splitlines()]


def normalise(calls: list[list[str]], python: str) -> list[list[str]]:
    """Each call as ``[module, args...]``, paths with /, the interpreter as PY. The plan call is compared apart
    (its --format and --out differ by design). A step runs as ``src.utils.overnight step <options> -- PY -m
    <module> ...``, the whole of which is compared."""
    out = []
    for argv in calls:
        argv = ["PY" if a == python else a.replace("\\", "/") for a in argv]
        assert argv[0] == "-m", argv
        if argv[1:3] != ["src.utils.overnight", "plan"]:
            out.append(argv[1:])
    return out


def module_of(call: list[str]) -> str:
    """The module a call runs: a step's own module for the step runner's calls."""
    if call[:2] == ["src.utils.overnight", "step"]:
        inner = call[call.index("--") + 1:]
        return inner[2] if inner[1:2] == ["-m"] else inner[0]
    return call[0]


def plan_args(calls: list[list[str]]) -> list[str]:
    (plan,) = [c for c in calls if c[1:3] == ["src.utils.overnight", "plan"]]
    return plan[plan.index("--") + 1:]


def test_bat_runs_the_same_calls_as_the_sh(project):
    plan = make_plan(project, ARGS)
    code, out, calls = run_bat(project, plan, ARGS)
    assert code == 0, out
    sh_code, sh_out, sh_calls = run_sh(project, plan, ARGS)
    assert sh_code == 0, sh_out
    bat_calls = normalise(calls, win(STUB_DIR / "python_stub.bat"))
    assert bat_calls == normalise(sh_calls, str(STUB_DIR / "python_stub.py"))
    assert plan_args(calls) == plan_args(sh_calls) == ARGS  # cmd's %* reached the helper argument by argument
    modules = [module_of(c) + (f" {c[1]}" if module_of(c) == "src.utils.overnight" else "") for c in bat_calls]
    assert modules == ["src.training.preflight", "src.utils.overnight banner", "src.utils.overnight start",
                       "src.data_processing.knowledge_base_enhancer_main",
                       "src.data_processing.prepare_data_for_training", "src.utils.overnight prepared",
                       "src.training.preflight", "src.training.train_enhanced", "src.training.evaluate_model",
                       "src.training.optimize_for_inference", "src.utils.overnight completed"]
    train = bat_calls[modules.index("src.training.train_enhanced")]
    assert train[:9] == ["src.utils.overnight", "step", "--run_dir", plan["RUN_DIR"], "--step", "train", "--number",
                         "3/5", "--output"] and train[-4:] == ["--epochs", "2", "--note", "a b & c (x)"]
    # The step runner prints each step's header line "[N/5] name"; the scripts number the steps the same way.
    steps = [(c[c.index("--step") + 1], c[c.index("--number") + 1] if "--number" in c else None)
             for c in bat_calls if c[:2] == ["src.utils.overnight", "step"]]
    assert steps == [("pre-flight", None), ("knowledge base", "1/5"), ("prepare data", "2/5"), ("data check", None),
                     ("train", "3/5"), ("evaluate", "4/5"), ("optimise for inference", "5/5")]


def test_bat_failure_resume_and_errors_match_the_sh(project, call_keeps_exit_codes):
    plan = make_plan(project, ARGS)
    # A failing step: its exit code comes back, the failure is reported for that step, nothing runs after it.
    # (Under Wine 8 a called batch file's code arrives as 1: see call_keeps_exit_codes.)
    expected = 3 if call_keeps_exit_codes else 1
    code, out, calls = run_bat(project, plan, ARGS, fail=("src.training.train_enhanced", 3))
    sh_code, _, sh_calls = run_sh(project, plan, ARGS, fail=("src.training.train_enhanced", expected))
    assert code == sh_code == expected
    bat_calls = normalise(calls, win(STUB_DIR / "python_stub.bat"))
    assert bat_calls == normalise(sh_calls, str(STUB_DIR / "python_stub.py"))
    assert bat_calls[-1][:7] == ["src.utils.overnight", "failed", "--run_dir", plan["RUN_DIR"], "--step", "train",
                                 "--exit_code"] and bat_calls[-1][7] == str(expected)
    assert "src.training.evaluate_model" not in [module_of(c) for c in bat_calls]
    # A resumed run whose data is kept: knowledge base and preparation are skipped with the plan's reasons.
    resumed = {**plan, "RESUMING": "1", "RESUMING_FLAG": ["--resuming"], "PREPARE": "0", "KB": "0",
               "PREPARE_WHY": "skipped: resuming, the run keeps the data it started with",
               "KB_WHY": "skipped: resuming"}
    code, out, calls = run_bat(project, resumed, ARGS)
    sh_code, sh_out, sh_calls = run_sh(project, resumed, ARGS)
    assert code == sh_code == 0
    bat_calls = normalise(calls, win(STUB_DIR / "python_stub.bat"))
    assert bat_calls == normalise(sh_calls, str(STUB_DIR / "python_stub.py"))
    assert "src.data_processing.prepare_data_for_training" not in [module_of(c) for c in bat_calls]
    assert "[2/5] prepare data: skipped: resuming, the run keeps the data it started with" in out
    assert "[2/5] prepare data: skipped: resuming" in (project / plan["LOG"]).read_text(errors="replace")  # :say
    assert ["src.utils.overnight", "start", "--run_dir", plan["RUN_DIR"]] in bat_calls  # the plan says it resumes
    # The helper refuses the arguments (exit 2): nothing else runs.
    code, out, calls = run_bat(project, plan, ["--profile", "huge"], plan_code=2)
    assert code == (2 if call_keeps_exit_codes else 1) and len(calls) == 1
    # --help: the helper's usage, exit 0, no step.
    code, out, calls = run_bat(project, {"ACTION": "help"}, ["--help"])
    assert code == 0 and normalise(calls, "") == [["src.utils.overnight", "usage", "--script",
                                                   "train_overnight_enhanced.bat"]]
