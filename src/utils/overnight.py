"""The overnight run's lifecycle, one interface: train_overnight_enhanced.sh and .bat call these subcommands.

Each script still chains the steps itself (one visible line per step); everything else lives here: the
arguments, the profile and its flags, which run to resume and why (a fingerprint of what a run started from),
the run id, log rotation, the banner, running each step (its output to the console, the log and the step file;
signals passed on; finished steps recorded and skipped by a rerun), the chain's emails (start, failure,
completion: email is a dependency this module calls, src/utils/email_notifier.py) and the end of the run.

    python -m src.utils.overnight plan --format sh -- --profile quick -- --epochs 2   # shell variables to eval
    python -m src.utils.overnight plan --format cmd --out plan.cmd -- %*              # a batch file to call
    python -m src.utils.overnight banner --run_dir models/theta_enhanced_20260101_230000 --python .venv/bin/python
    python -m src.utils.overnight start --run_dir models/<run>        # the start email of the whole chain
    python -m src.utils.overnight step --run_dir models/<run> --step evaluate --number 4/5 \
        --output stats/evaluation_<run>.json -- .venv/bin/python -m src.training.evaluate_model ...
    python -m src.utils.overnight prepared --run_dir models/<run>     # after data preparation: record its output
    python -m src.utils.overnight failed --run_dir models/<run> --step train --exit_code 1 [--signal TERM]
    python -m src.utils.overnight completed --run_dir models/<run>

Resume rules (README.md, "Resuming"): a re-run resumes the newest unfinished run (no ``DONE``) only when its
fingerprint matches today's: the content hash of every input file under ``Datasets/`` (not the prepared outputs),
the data-preparation flags, the profile and the trainer flags. Otherwise a new run starts and the banner says
which of them changed. ``--fresh`` always starts a new run; ``--resume RUN_ID`` picks one. A run whose last step
ended with a user error (exit 2) is never resumed automatically: the fix is in the flags or the files. A run
that was interrupted (a signal, a closed window) is resumed, and the steps it had finished (training: theta_final/
and the trainer's completed status; evaluation and optimisation: their outputs) are skipped while their outputs
are as recorded.

Signals (documentation/TRAINING_PIPELINE.md, "Signals and interruptions"): the step runner
(src/utils/step_runner.py) passes TERM/INT/HUP on to the step's own process group and waits for it; an
interrupted step is recorded, reported (FAILED line, failure email) once, and ends the chain with 128 + the
signal's number.

State lives in ``models/<run>/overnight.json`` (written atomically): the fingerprint, the plan, the SHA-256 of
the prepared file the run trains on, the finished steps, and one event per start, failure, interruption and
completion. The lifecycle commands' lines also go to the run's log (``logs/training_enhanced_<run>.log``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils.common import (EXIT_USER_ERROR, PROJECT_ROOT, RUN_ID_PATTERN, FlagParser, UserError, atomic_write_json,
                              new_run_id)
from src.utils.data_layout import GENERATED_TEST_NAME, KNOWLEDGE_DIR, resolve_sources
from src.utils.profiles import CPU_DEFAULT_PROFILE, GPU_DEFAULT_PROFILE, PROFILE_NAMES, profiles_help

logger = logging.getLogger(__name__)

STATE_FILE = "overnight.json"
PREFLIGHT_FILE = "preflight.json"
KEEP_LOGS = 5  # the overnight logs kept, this run's own included
TENSORBOARD_PORT = 6006
PREPARED_REL = "Datasets/enhanced_training_data.json"
# What data preparation writes, and the knowledge step's output folder: not inputs of the fingerprint.
PREPARE_OUTPUTS = {"enhanced_training_data.json", "enhanced_data_stats.json", GENERATED_TEST_NAME}
DERIVED_DIRS = {"knowledge_base", "__pycache__"}
DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".tsv", ".parquet"}  # what preparation reads (knowledge folders: every file)
KB_MODULE_REL = "src/data_processing/knowledge_base_enhancer_main.py"
FINGERPRINT_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------
# The scripts' arguments
# ---------------------------------------------------------------------------------------------------------------

def build_script_parser(script: str = "train_overnight_enhanced.sh") -> argparse.ArgumentParser:
    p = FlagParser(
        prog=script, add_help=False,
        description="Theta overnight run: pre-flight, [knowledge base], prepare the data, train, evaluate and "
                    "optimise, in one unattended command. Flags after -- go to train_enhanced.py.",
        epilog="Re-running the same command resumes the unfinished run when Datasets/, the profile and the flags "
               "are unchanged (README.md, 'Resuming'). Email: documentation/EMAIL_NOTIFICATIONS.md.")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--profile", choices=PROFILE_NAMES, default=None,
                   help=f"{profiles_help()}. Default: {GPU_DEFAULT_PROFILE} where a CUDA GPU answers, "
                        f"{CPU_DEFAULT_PROFILE} otherwise")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs on this machine (torchrun --standalone); for several machines run train_enhanced.py "
                        "under multi-node torchrun yourself, see documentation/TRAINING_PIPELINE.md")
    p.add_argument("--tensorboard", action="store_true",
                   help="serve models/ with tensorboard on 127.0.0.1 while the run lasts")
    p.add_argument("--fresh", action="store_true", help="always start a new run (never resume)")
    p.add_argument("--resume", metavar="RUN_ID", default=None,
                   help="resume this unfinished run (theta_enhanced_<YYYYMMDD_HHMMSS>) whatever changed")
    p.add_argument("--preflight", action="store_true",
                   help="run the pre-flight checks alone (with a test email when email is on) and exit")
    p.add_argument("--strict", action="store_true",
                   help="a problem of the data in Datasets/ (a file that cannot be read, a file from which nothing "
                        "is kept, many records dropped) stops the run in the pre-flight instead of a warning "
                        "(the pre-flight and data preparation get --strict)")
    return p


def parse_script_args(argv: list[str], script: str = "train_overnight_enhanced.sh"
                      ) -> tuple[argparse.Namespace, list[str]]:
    """The script's own flags, and the trainer flags after ``--``. Bad flags are a UserError naming them."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        own, trainer = argv[:cut], argv[cut + 1:]
    else:
        own, trainer = argv, []
    parser = build_script_parser(script)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args, unknown = parser.parse_known_args(own)
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments"
            raise UserError(message.split("error: ", 1)[-1]) from None
    if unknown:
        nearest = parser.nearest_flag(unknown[0]) if unknown[0].startswith("-") else None
        raise UserError(f"unknown option '{unknown[0]}'" + (f": did you mean {nearest}?" if nearest else "")
                        + " (flags for the trainer go after --)")
    if args.gpus < 1:
        raise UserError(f"--gpus must be a whole number of at least 1, not {args.gpus}")
    if args.fresh and args.resume:
        raise UserError("--fresh and --resume exclude each other")
    if args.resume is not None and not RUN_ID_PATTERN.match(args.resume):
        raise UserError(f"--resume {args.resume}: a run id looks like theta_enhanced_20260101_230000 "
                        "(a folder name under models/)")
    return args, trainer


# ---------------------------------------------------------------------------------------------------------------
# Profile and per-step flags
# ---------------------------------------------------------------------------------------------------------------

def detect_profile(requested: str | None) -> tuple[str, str]:
    """The profile and why: as asked, else rtx3060 where ``nvidia-smi -L`` answers, quick otherwise."""
    if requested:
        return requested, "chosen with --profile"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            if subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0:
                return GPU_DEFAULT_PROFILE, "a CUDA GPU was found (nvidia-smi)"
        except (OSError, subprocess.SubprocessError):
            pass
    return CPU_DEFAULT_PROFILE, "no CUDA GPU was found"


def prepare_flags(profile: str, strict: bool = False) -> list[str]:
    """Data-preparation flags: the profile (its values live in src/utils/profiles.py, one table) and --strict."""
    return ["--profile", profile] + (["--strict"] if strict else [])


def optimise_flags() -> list[str]:
    """Inference optimisation: int8 (CPU) or fp16/bf16 (CUDA) only when measured faster within the perplexity
    gate, else fp32 (optimize_for_inference.py says which and why in optimization_metrics.json)."""
    return ["--quantize", "auto"]


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint and resume choice
# ---------------------------------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def datasets_fingerprint(datasets_dir: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every input file under ``datasets_dir``: data files anywhere, every file
    under a ``knowledge/`` folder (``Datasets/knowledge/``, ``Datasets/sample/knowledge/``).

    Left out: preparation's own outputs, the knowledge step's output folder, hidden files and the rest (a
    README). The test set is in:
    preparation reads it (overlap removal), and a created one is recorded after the prepare step.
    """
    out: dict[str, str] = {}
    datasets_dir = Path(datasets_dir)
    if not datasets_dir.is_dir():
        return out
    for path in sorted(datasets_dir.rglob("*")):
        rel = path.relative_to(datasets_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.parts[0] in DERIVED_DIRS or (len(rel.parts) == 1 and rel.name in PREPARE_OUTPUTS):
            continue
        if KNOWLEDGE_DIR not in rel.parts[:-1] and path.suffix.lower() not in DATA_SUFFIXES:
            continue
        out[rel.as_posix()] = sha256_file(path)
    return out


def make_fingerprint(root: Path, profile: str, prep_flags: list[str], trainer_flags: list[str]) -> dict:
    return {"version": FINGERPRINT_VERSION, "profile": profile, "prepare_flags": list(prep_flags),
            "trainer_flags": list(trainer_flags), "datasets": datasets_fingerprint(root / "Datasets")}


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty when they match)."""
    changes = []
    old_files, new_files = old.get("datasets", {}), new.get("datasets", {})
    changed = sorted(n for n in old_files.keys() & new_files.keys() if old_files[n] != new_files[n])
    added, removed = sorted(new_files.keys() - old_files.keys()), sorted(old_files.keys() - new_files.keys())
    if changed or added or removed:
        parts = [f"{_listed(v)} {w}" for v, w in ((changed, "changed"), (added, "added"), (removed, "removed")) if v]
        changes.append(f"Datasets/ changed ({'; '.join(parts)})")
    if old.get("profile") != new.get("profile"):
        changes.append(f"the profile changed ({old.get('profile')}, now {new.get('profile')})")
    if old.get("prepare_flags") != new.get("prepare_flags"):
        changes.append("the data-preparation flags changed")
    if old.get("trainer_flags") != new.get("trainer_flags"):
        before = " ".join(old.get("trainer_flags") or []) or "none"
        now = " ".join(new.get("trainer_flags") or []) or "none"
        changes.append(f"the trainer flags changed ({before}, now {now})")
    return changes


def read_state(run_dir: Path) -> dict:
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write_json(Path(run_dir) / STATE_FILE, state)


def add_event(run_dir: Path, event: str, **details: Any) -> dict:
    state = read_state(run_dir)
    state.setdefault("events", []).append({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details})
    write_state(run_dir, state)
    return state


def last_failure(state: dict) -> dict | None:
    """The run's last event when it is a failure (a later start or completion clears it)."""
    events = state.get("events") or []
    return events[-1] if events and events[-1].get("event") == "failed" else None


@dataclass
class RunChoice:
    """Which run this invocation works on, and why (one line for the banner)."""
    run_id: str
    resuming: bool
    why: str
    notes: list[str] = field(default_factory=list)  # warnings for the banner


def unfinished_runs(models_dir: Path) -> list[str]:
    """Run ids without a DONE marker, newest first (ids sort by time)."""
    if not Path(models_dir).is_dir():
        return []
    return sorted((d.name for d in Path(models_dir).iterdir()
                   if d.is_dir() and RUN_ID_PATTERN.match(d.name) and not (d / "DONE").exists()), reverse=True)


def choose_run(models_dir: Path, fingerprint: dict, fresh: bool = False, resume_id: str | None = None,
               now: float | None = None) -> RunChoice:
    """Resume or start anew, following the rules of the module docstring."""
    models_dir = Path(models_dir)
    if resume_id:
        run_dir = models_dir / resume_id
        if not run_dir.is_dir():
            left = unfinished_runs(models_dir)
            raise UserError(f"--resume {resume_id}: no such run folder {run_dir}. Unfinished runs: "
                            f"{', '.join(left) if left else 'none'}")
        if (run_dir / "DONE").exists():
            raise UserError(f"--resume {resume_id}: that run is finished ({run_dir / 'DONE'} exists); "
                            "run without --resume to start a new one")
        old = read_state(run_dir).get("fingerprint")
        notes = []
        if old:
            changes = fingerprint_changes(old, fingerprint)
            if changes:
                notes.append(f"resuming {resume_id} as asked although {'; '.join(changes)} since it was started")
        return RunChoice(resume_id, True, f"resuming {resume_id} (--resume)", notes)
    if fresh:
        return RunChoice(_new_id(models_dir, now), False, "new run (--fresh)")
    notes = []
    for run_id in unfinished_runs(models_dir):
        state = read_state(models_dir / run_id)
        failure = last_failure(state)
        if failure is not None and failure.get("exit_code") == EXIT_USER_ERROR:
            notes.append(f"run {run_id} ended with a user error at step '{failure.get('step')}' (exit 2): "
                         f"not resumed (`--resume {run_id}` retries it)")
            continue
        old = state.get("fingerprint")
        new_id = None
        if not old:
            why = (f"run {run_id} has no fingerprint (started by an older script): starting a new run; "
                   f"`--resume {run_id}` continues the old one")
        else:
            changes = fingerprint_changes(old, fingerprint)
            if not changes:
                return RunChoice(run_id, True, f"resuming {run_id}: Datasets/, the profile and the flags are the "
                                               "same as when it was started", notes)
            why = (f"{'; '.join(changes)} since run {run_id} was started: starting a new run; "
                   f"`--resume {run_id}` continues the old one")
        new_id = _new_id(models_dir, now)
        return RunChoice(new_id, False, why, notes)
    return RunChoice(_new_id(models_dir, now), False, "new run (no unfinished run to resume)", notes)


def _new_id(models_dir: Path, now: float | None) -> str:
    """A fresh run id; a second run in the same second takes the next free second."""
    now = time.time() if now is None else now
    run_id = new_run_id(now)
    while (Path(models_dir) / run_id).exists():
        now += 1
        run_id = new_run_id(now)
    return run_id


def rotate_logs(logs_dir: Path, keep_name: str, keep: int = KEEP_LOGS) -> list[Path]:
    """Delete all but the newest ``keep`` overnight logs, counting and never deleting ``keep_name``."""
    logs = sorted(p for p in Path(logs_dir).glob("training_enhanced_*.log") if p.name != keep_name)
    doomed = logs[:max(0, len(logs) - (keep - 1))]
    for p in doomed:
        p.unlink(missing_ok=True)
        (p.parent / f".step_output_{p.name[len('training_enhanced_'):-len('.log')]}.txt").unlink(missing_ok=True)
    return doomed


def free_port(start: int = TENSORBOARD_PORT, tries: int = 50) -> int:
    """The first port from ``start`` that 127.0.0.1 can bind (tensorboard's)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return start


# ---------------------------------------------------------------------------------------------------------------
# plan: every decision of one invocation, as variables for the script
# ---------------------------------------------------------------------------------------------------------------

def make_plan(argv: list[str], root: Path = PROJECT_ROOT, script: str = "train_overnight_enhanced.sh",
              now: float | None = None) -> dict[str, Any]:
    """Parse the script's arguments and decide: profile, run (new or resumed, and why), steps to run or skip.

    Creates the run folder, logs/ and stats/, records the fingerprint of a new run and a start event, and rotates
    the logs. ``--preflight`` decides the profile and flags only (no run folder).
    """
    root = Path(root)
    args, trainer = parse_script_args(argv, script)
    if args.help:
        return {"ACTION": "help"}
    profile, profile_why = detect_profile(args.profile)
    prep = prepare_flags(profile, args.strict)
    strict = ["--strict"] if args.strict else []
    plan: dict[str, Any] = {
        "ACTION": "preflight" if args.preflight else "run", "PROFILE": profile, "PROFILE_WHY": profile_why,
        "GPUS": str(args.gpus), "TENSORBOARD": "1" if args.tensorboard else "0",
        "TB_PORT": str(free_port()) if args.tensorboard else "", "PREPARE_FLAGS": prep,
        "OPTIMISE_FLAGS": optimise_flags(), "TRAIN_EXTRA": list(trainer),
        "TRAIN_FLAGS_TEXT": " ".join(trainer),
        # The pre-flight checks the prepared data when the run trains on the file that exists now; otherwise
        # the scripts check it after the prepare step (--only data).
        "PREFLIGHT_FLAGS": [], "RUN_ID": "", "RUN_DIR": "", "LOG": "", "STEP_OUT": "", "RESUMING": "0",
        "RESUMING_FLAG": [], "PREPARE": "1", "PREPARE_WHY": "", "KB": "0", "KB_WHY": "",
    }
    prepared = root / PREPARED_REL
    if args.preflight:
        plan["PREFLIGHT_FLAGS"] = ["--email_test"] + ([] if prepared.is_file() else ["--no_data"]) + strict
        return plan
    fingerprint = make_fingerprint(root, profile, prep, trainer)
    choice = choose_run(root / "models", fingerprint, args.fresh, args.resume, now)
    run_dir = root / "models" / choice.run_id
    for d in (run_dir, root / "logs", root / "stats"):
        d.mkdir(parents=True, exist_ok=True)
    state = read_state(run_dir) if choice.resuming else {}
    if not state:
        state = {"run_id": choice.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "fingerprint": fingerprint, "prepared_sha256": None, "events": []}
    prepare, prepare_why = _prepare_decision(choice, state, prepared)
    notes = resolve_sources(root / "Datasets").knowledge_dirs  # the knowledge folders this run's data uses
    kb_on = (root / KB_MODULE_REL).is_file() and bool(notes)
    if not prepare:
        kb_why = "skipped: resuming"
    elif kb_on:
        kb_why = "on (" + ", ".join(f"{p.relative_to(root).as_posix()}/" for p in notes) + " found)"
    elif (root / KB_MODULE_REL).is_file():
        kb_why = "skipped (no knowledge/ folder for this run's data)"
    else:
        kb_why = "skipped (knowledge_base_enhancer_main.py not installed)"
    log_name = f"training_enhanced_{choice.run_id}.log"
    plan.update(RUN_ID=choice.run_id, RUN_DIR=f"models/{choice.run_id}", LOG=f"logs/{log_name}",
                STEP_OUT=f"logs/.step_output_{choice.run_id}.txt", RESUMING="1" if choice.resuming else "0",
                RESUMING_FLAG=["--resuming"] if choice.resuming else [], PREPARE="1" if prepare else "0",
                PREPARE_WHY=prepare_why, KB="1" if (prepare and kb_on) else "0", KB_WHY=kb_why,
                PREFLIGHT_FLAGS=(["--no_data"] if prepare else []) + strict)
    state["plan"] = {"profile": profile, "profile_why": profile_why, "resume_why": choice.why,
                     "notes": choice.notes, "gpus": args.gpus, "resuming": choice.resuming,
                     "tensorboard_port": int(plan["TB_PORT"]) if args.tensorboard else None,
                     "prepare_why": prepare_why, "kb_why": kb_why, "prepare_flags": prep, "trainer_flags": trainer,
                     "optimise_flags": plan["OPTIMISE_FLAGS"], "log": plan["LOG"], "step_output": plan["STEP_OUT"]}
    state.setdefault("events", []).append({"event": "resume" if choice.resuming else "start",
                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    (run_dir / PREFLIGHT_FILE).unlink(missing_ok=True)  # this invocation's pre-flight writes a new one
    write_state(run_dir, state)
    rotate_logs(root / "logs", log_name)
    return plan


def _prepare_decision(choice: RunChoice, state: dict, prepared: Path) -> tuple[bool, str]:
    """Prepare again, or keep the prepared file the resumed run started with (when it is still that file)."""
    if not choice.resuming:
        return True, f"Datasets/ to {PREPARED_REL}"
    recorded = state.get("prepared_sha256")
    if not recorded:
        return True, f"Datasets/ to {PREPARED_REL} (run {choice.run_id} had not finished preparing)"
    if prepared.is_file() and sha256_file(prepared) == recorded:
        return False, "skipped: resuming, the run keeps the data it started with"
    return True, (f"Datasets/ to {PREPARED_REL} again: the file is no longer the one run {choice.run_id} "
                  "started with (another run wrote it); preparing it from Datasets/ as it is now")


def cmd_quote(arg: str) -> str:
    """One argument for a cmd command line, in double quotes (the C runtime's rules for backslashes)."""
    if '"' in arg or "\n" in arg or "\r" in arg:
        raise UserError(f"the argument {arg!r} holds a double quote or a line break, which cannot pass through "
                        "cmd.exe: drop it, or run python -m src.training.train_enhanced yourself")
    trailing = len(arg) - len(arg.rstrip("\\"))
    return f'"{arg}{chr(92) * trailing}"'


def cmd_set_line(name: str, value: str) -> str:
    """``set "NAME=value"`` for a batch file, safe for any value without line breaks.

    ``%`` is doubled (a batch file expands it); ``^ & | < > ( )`` get a caret wherever the quotes around and
    inside the value leave them unquoted, so cmd reads them as text, never as a command separator.
    """
    if "\n" in value or "\r" in value:
        raise UserError(f"{name}: a line break cannot pass through cmd.exe")
    out, quoted = ['set "'], True
    for ch in f"{name}={value}":
        if ch == '"':
            quoted = not quoted
        elif ch in "^&|<>()" and not quoted:
            ch = "^" + ch
        out.append("%%" if ch == "%" else ch)
    out.append('"')
    return "".join(out)


def format_plan(plan: dict[str, Any], fmt: str) -> str:
    """The plan as bash assignments (lists become arrays) or as a batch file of ``set`` lines (lists become
    quoted argument strings; paths use backslashes)."""
    lines = []
    for name, value in plan.items():
        if fmt == "sh":
            if isinstance(value, list):
                lines.append(f"{name}=({' '.join(shlex.quote(v) for v in value)})")
            else:
                lines.append(f"{name}={shlex.quote(value)}")
        else:
            if isinstance(value, list):
                value = " ".join(cmd_quote(v) for v in value)
            elif name in ("RUN_DIR", "LOG", "STEP_OUT"):
                value = value.replace("/", "\\")
            lines.append(cmd_set_line(name, value))
    if fmt == "cmd":
        return "@echo off\r\n" + "\r\n".join(lines) + "\r\nexit /b 0\r\n"
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The run's console and log
# ---------------------------------------------------------------------------------------------------------------

RULE = "=" * 78


def run_root(run_dir: Path) -> Path:
    """The project folder of ``models/<run>``: the paths a plan records (the log, the step output) are relative
    to it."""
    return Path(run_dir).resolve().parent.parent


def run_file(run_dir: Path, key: str) -> Path | None:
    """The plan's ``log`` or ``step_output`` of the run, as a path; None before a plan recorded it."""
    rel = (read_state(run_dir).get("plan") or {}).get(key)
    return run_root(run_dir) / rel if rel else None


_output_handlers: list[logging.Handler] = []


def setup_run_output(log: Path | None) -> None:
    """The lifecycle commands' lines go to the console and are appended to the run's log, so neither script needs
    a tee (and none is left running when a script is stopped). A console gone with its terminal (hang-up) costs
    only the console copy: logging reports the failed write and goes on."""
    root = logging.getLogger()
    for handler in _output_handlers:
        root.removeHandler(handler)
        handler.close()
    _output_handlers[:] = [logging.StreamHandler(sys.stdout)]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        _output_handlers.append(logging.FileHandler(log, encoding="utf-8"))
    for handler in _output_handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def read_preflight(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / PREFLIGHT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# banner, start, prepared
# ---------------------------------------------------------------------------------------------------------------

def banner_lines(run_dir: Path, python: str = "", device: str | None = None, email: str | None = None) -> list[str]:
    """The run banner: what this invocation will do and why, pre-flight warnings included."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    plan = state.get("plan") or {}
    if device is None:
        from src.utils import gpu_info
        device = gpu_info.summary_line(gpu_info.get_best_gpu_info(import_torch=False))
    if email is None:
        from src.utils.email_notifier import resolve_email_config
        config, _, message = resolve_email_config()
        email = f"email: {config.describe()}" if config else message
    gpus = int(plan.get("gpus", 1))
    port = plan.get("tensorboard_port")
    trainer = " ".join(["--profile", plan.get("profile", "?"), "--resume auto", *plan.get("trainer_flags", [])])
    prepare = plan.get("prepare_why", "")
    if not prepare.startswith("skipped"):
        prepare += " " + " ".join(plan.get("prepare_flags", []))
    lines = [RULE,
             f" Theta overnight run {run_dir.name}{' (resuming)' if plan.get('resuming') else ''}",
             f" started     {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f" profile     {plan.get('profile')} ({plan.get('profile_why')})",
             f" run         {plan.get('resume_why', '')}",
             f" device      {device}",
             f" gpus        {gpus}" + (" (torchrun on this machine; more machines: documentation/TRAINING_PIPELINE.md)"
                                      if gpus > 1 else ""),
             f" python      {python}",
             f" run folder  {run_dir.parent.name}/{run_dir.name}",
             f" log         {plan.get('log', '')}",
             f" data        {prepare.strip()}",
             f" knowledge   {plan.get('kb_why', '')}",
             f" trainer     {trainer}",
             f" optimise    {' '.join(plan.get('optimise_flags') or [])}",
             f" tensorboard {f'http://127.0.0.1:{port}/' if port else 'off'}"]
    preflight = read_preflight(run_dir)
    if preflight is not None:
        warnings = preflight.get("warnings", [])
        lines.append(f" pre-flight  {'ok' if not preflight.get('fatal') else 'FAILED'} in "
                     f"{preflight.get('seconds', 0):.1f} s, {len(warnings)} warning{'s' * (len(warnings) != 1)}"
                     + (f"; whole run about {preflight['estimate']}" if preflight.get("estimate") else ""))
    else:
        warnings = []
    for note in [*plan.get("notes", []), *warnings]:
        lines.append(f" WARNING     {note}")
    lines += [f" {email}", RULE]
    return lines


def cmd_prepared(run_dir: Path, root: Path = PROJECT_ROOT) -> None:
    """After a successful prepare step: record the prepared file's hash and the inputs as they are now (a test set
    that preparation created belongs to the run's inputs from here on)."""
    state = read_state(run_dir)
    prepared = Path(root) / PREPARED_REL
    if prepared.is_file():
        state["prepared_sha256"] = sha256_file(prepared)
    fingerprint = state.get("fingerprint") or {}
    fingerprint["datasets"] = datasets_fingerprint(Path(root) / "Datasets")
    state["fingerprint"] = fingerprint
    write_state(run_dir, state)


# ---------------------------------------------------------------------------------------------------------------
# step: run one step; record it when it finished, skip it when a rerun finds it finished
# ---------------------------------------------------------------------------------------------------------------

# The steps whose finish is recorded in overnight.json, in chain order. A rerun skips a recorded step while its
# output is as recorded; running one forgets its own record and those of the steps after it (they read its output).
RECORDED_STEPS = ("train", "evaluate", "optimise for inference")


def output_fingerprint(path: Path) -> str | None:
    """A file's SHA-256; for a folder, the hash of its listing (path, size and modification time of every file,
    which tells a rewritten model folder from the recorded one without reading gigabytes); None when absent."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8"))
        return "tree:" + h.hexdigest()
    return None


def training_finished(run_dir: Path) -> str | None:
    """None when the trainer's run is done (theta_final/ there, training_config.json: status completed, exit code
    0); otherwise why not."""
    run_dir = Path(run_dir)
    if not (run_dir / "theta_final").is_dir():
        return "theta_final/ is missing"
    config = _read_json(run_dir / "training_config.json")
    config = config if isinstance(config, dict) else {}
    if config.get("status") != "completed" or (config.get("summary") or {}).get("exit_code") != 0:
        return f"training_config.json says status {config.get('status')!r}"
    return None


FINISH_CHECKS: dict[str, Any] = {"train": training_finished}  # step -> check(run_dir): None when finished


def _rank(step: str) -> int:
    return RECORDED_STEPS.index(step) if step in RECORDED_STEPS else len(RECORDED_STEPS)


def finished_record(run_dir: Path, step: str, output: Path) -> dict | None:
    """The step's record when a rerun may skip it: recorded, its output as it was then, its check still true."""
    for record in read_state(run_dir).get("finished_steps") or []:
        if record.get("step") == step and record.get("output") == output.as_posix():
            check = FINISH_CHECKS.get(step)
            if record.get("fingerprint") == output_fingerprint(run_root(run_dir) / output) \
                    and (check is None or check(run_dir) is None):
                return record
    return None


def record_finished(run_dir: Path, step: str, output: Path) -> None:
    state = read_state(run_dir)
    records = [r for r in state.get("finished_steps") or [] if r.get("step") != step]
    records.append({"step": step, "output": output.as_posix(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "fingerprint": output_fingerprint(run_root(run_dir) / output)})
    state["finished_steps"] = records
    write_state(run_dir, state)


def forget_from(run_dir: Path, step: str) -> None:
    """Drop the records of ``step`` and of every recorded step after it in the chain."""
    state = read_state(run_dir)
    records = state.get("finished_steps") or []
    kept = [r for r in records if _rank(r.get("step", "")) < _rank(step)]
    if kept != records:
        state["finished_steps"] = kept
        write_state(run_dir, state)


def cmd_step(args: argparse.Namespace) -> int:
    """Run one step (or skip it when it finished in an earlier invocation); returns its exit code."""
    from src.utils.step_runner import StepProcess

    run_dir = Path(args.run_dir)
    command = args.step_command[1:] if args.step_command[:1] == ["--"] else args.step_command
    if not command:
        raise UserError("step: the step's command goes after --")
    title = f"[{args.number}] {args.step}" if args.number else f"[{args.step}]"
    output = Path(args.output) if args.output else None
    if output is not None:
        done = finished_record(run_dir, args.step, output)
        if done is not None:
            logger.info("")
            logger.info("%s: skipped: finished at %s (%s is as it was then)", title, done["time"].replace("T", " "),
                        output.as_posix())
            return 0
        forget_from(run_dir, args.step)
    logger.info("")
    logger.info("%s  (%s)", title, time.strftime("%H:%M:%S"))

    def window_closed(event: str) -> None:  # Windows: a few seconds are left to record it and try the email
        report_failure(run_dir, args.step, 129, event, email_wait_s=3.0)

    result = StepProcess(command, run_file(run_dir, "log"), run_file(run_dir, "step_output"), window_closed).run()
    if result.signal is not None:
        report_failure(run_dir, args.step, result.exit_code, result.signal)
        return result.exit_code
    if result.exit_code == 0 and output is not None:
        check = FINISH_CHECKS.get(args.step)
        why = "its output is missing" if output_fingerprint(run_root(run_dir) / output) is None else (
            check(run_dir) if check else None)
        if why is None:
            record_finished(run_dir, args.step, output)
        else:
            logger.warning("  %s ended with exit code 0 but %s: a rerun runs it again", args.step, why)
    return result.exit_code


# ---------------------------------------------------------------------------------------------------------------
# failed, completed
# ---------------------------------------------------------------------------------------------------------------

FAILURE_EVENTS = {"failed", "preflight_failed", "interrupted"}
TRAINER_INTERRUPTED = 3  # train_enhanced.EXIT_INTERRUPTED (not imported: the trainer is a heavy import)
OUTPUT_LINES = 30


def _last_lines(path: Path | None, n: int) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-n:]


def report_failure(run_dir: Path, step: str, exit_code: int, signal_name: str | None = None,
                   email_wait_s: float | None = None) -> None:
    """Record the failure of ``step`` in overnight.json, print it (step, log, the step's last lines, what to do)
    and send the failure email: once per invocation. The step runner reports the interruptions it saw; the
    scripts' ``failed`` after it finds the failure recorded and says nothing more.

    An interruption (``signal_name``) is recorded as ``interrupted``: never a user error, the run resumes. A
    failed pre-flight changed nothing in the run and does not count as how the run ended (a resumed run stopped
    for a full disk is resumed again once there is room); a new run stopped there leaves no folder behind.
    """
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    events = state.get("events") or []
    if events and events[-1].get("event") in FAILURE_EVENTS:
        return  # reported already in this invocation (a start or resume event opens every invocation)
    log = (state.get("plan") or {}).get("log")
    output = _last_lines(run_file(run_dir, "step_output"), OUTPUT_LINES)
    event = "interrupted" if signal_name else ("preflight_failed" if step == "pre-flight" else "failed")
    if run_dir.is_dir():
        details = {"step": step, "exit_code": exit_code, **({"signal": signal_name} if signal_name else {})}
        events = add_event(run_dir, event, **details)["events"]
    logger.info("")
    logger.info("FAILED at step '%s' (%s)", step,
                f"interrupted by {signal_name}, exit {exit_code}" if signal_name else f"exit {exit_code}")
    if log:
        logger.info("  log:   %s", log)
    if output:
        logger.info("  error:")
        for line in output[-8:]:
            logger.info("    %s", line)
    if signal_name:
        logger.info("  the run was stopped (%s): run the same command again to resume; finished steps are skipped",
                    signal_name)
    elif exit_code == TRAINER_INTERRUPTED and step == "train":
        logger.info("  training was interrupted after saving a checkpoint: run the same command to resume")
    elif exit_code == EXIT_USER_ERROR and event == "failed":
        logger.info("  this was a user error (exit 2): fix what the message names and run the same command again; "
                    "this run will not be resumed")
    elif exit_code == EXIT_USER_ERROR:
        logger.info("  fix what the pre-flight names and run the same command again")
    send_chain_email(run_dir, "failure", lambda: chain_failure_email(run_dir, step, exit_code, signal_name, output,
                                                                     log), wait_s=email_wait_s)
    if not signal_name and [e.get("event") for e in events] == ["start", "preflight_failed"]:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing was done: leave no empty run folder behind
        logger.info("  %s removed (nothing had run yet)", run_dir)


def cmd_completed(run_dir: Path, python: str = "") -> int:
    """Mark the run done (DONE), send the completion email and print where everything is."""
    run_dir = Path(run_dir)
    (run_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n", encoding="utf-8")
    add_event(run_dir, "done")
    step_output = run_file(run_dir, "step_output")
    if step_output is not None:
        step_output.unlink(missing_ok=True)
    send_chain_email(run_dir, "completion", lambda: chain_completion_email(run_dir))
    run, sep = run_dir.name, os.sep
    folder = f"models{sep}{run}"
    for line in ["", RULE, f" Done: {run}  ({time.strftime('%Y-%m-%d %H:%M:%S')})",
                 f" model       {folder}{sep}theta_final", f" inference   {folder}{sep}theta_inference",
                 f" evaluation  stats{sep}evaluation_{run}.json", f" report      stats{sep}{run}{sep}",
                 f" log         {(read_state(run_dir).get('plan') or {}).get('log', '')}",
                 f" try it      {python or 'python'} -m src.model.theta_model chat --model_path {folder}{sep}theta_final",
                 RULE]:
        logger.info("%s", line)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The chain's emails: start, failure and completion of the whole run (the trainer sends epochs and status)
# ---------------------------------------------------------------------------------------------------------------

def send_chain_email(run_dir: Path, what: str, build, wait_s: float | None = None) -> None:
    """Send one email of the chain now and say whether it went. A one-shot process: two quick attempts and a
    bounded wait (2 x EMAIL_TIMEOUT_S + 5 s unless ``wait_s``); a notification never fails the chain."""
    from src.utils.email_notifier import EmailSender, resolve_email_config

    try:
        config = resolve_email_config()[0]  # quiet when off: the banner said why
        if config is None:
            return
        sender = EmailSender(config, run_name=Path(run_dir).name, retries=2, backoff_s=1.0,
                             shutdown_wait_s=config.timeout_s * 2 + 5 if wait_s is None else wait_s)
        sender.send(what, build, priority=True)
        sender.close()
    except Exception as err:
        logger.info("email: %s email skipped: %s", what, err)
        return
    if sender.counts["sent"]:
        logger.info("email: %s email sent to %s", what, ", ".join(config.recipients))
    else:
        kind, text = sender.last_error or (("could not build it", "") if sender.counts["build_error"]
                                           else ("not sent", ""))
        logger.info("email: %s email NOT sent (%s%s); the run goes on", what, kind, f": {text}" if text else "")


def chain_start_email(run_dir: Path, gpu: dict | None = None):
    """The run started: the plan (profile, resume or not and why, flags, log), the pre-flight's estimate and
    warnings, the GPU."""
    from src.training.run_emails import gpu_sections
    from src.utils import gpu_info
    from src.utils.email_notifier import SUBJECT_PREFIX, Email, Section

    run_dir = Path(run_dir)
    plan = read_state(run_dir).get("plan") or {}
    rows = [("started", time.strftime("%Y-%m-%d %H:%M:%S")), ("host", socket.gethostname()),
            ("profile", f"{plan.get('profile')} ({plan.get('profile_why')})"), ("run", plan.get("resume_why", "")),
            ("gpus", str(plan.get("gpus", 1))), ("resuming", "yes" if plan.get("resuming") else "no"),
            ("trainer flags", " ".join(plan.get("trainer_flags") or []) or "(none)"), ("log", plan.get("log", ""))]
    alerts = [("warning", note) for note in plan.get("notes") or []]
    preflight = read_preflight(run_dir)
    if isinstance(preflight, dict):
        if preflight.get("estimate"):
            rows.append(("pre-flight estimate", f"training about {preflight['estimate']}"))
        alerts += [("warning", f"pre-flight: {w}") for w in preflight.get("warnings") or []]
    sections, gpu_alerts = gpu_sections(gpu if gpu is not None else gpu_info.get_gpu_info())
    resuming = ", resuming" if plan.get("resuming") else ""
    return Email(f"{SUBJECT_PREFIX} started: {run_dir.name} ({plan.get('profile')} profile{resuming})",
                 f"Overnight run started: {run_dir.name}", alerts + gpu_alerts,
                 [Section("Run", rows=rows)] + sections)


def chain_failure_email(run_dir: Path, step: str, exit_code: int, signal_name: str | None, output: list[str],
                        log: str | None):
    """A step of the chain failed or was interrupted: the step, the exit code, its last output lines."""
    from src.training.run_emails import failure_email

    if signal_name:
        lines = [f"step '{step}' was interrupted by {signal_name} (exit code {exit_code}); the run resumes when "
                 "the same command runs again, and the steps that finished are skipped"]
    else:
        lines = [f"step '{step}' failed with exit code {exit_code}"]
        if exit_code == TRAINER_INTERRUPTED and step == "train":
            lines.append("training was interrupted (SIGINT/SIGTERM) after saving a checkpoint")
    if output:
        lines += ["", "last lines of the step's output:"] + output
    return failure_email(Path(run_dir).name, step, "\n".join(lines), run_root(run_dir) / log if log else None)


def chain_completion_email(run_dir: Path):
    """The run is done: the trainer's summary and loss history, the test-set evaluation and its file, the
    report's loss curve, where the inference model is."""
    from src.training.report import LOSS_CURVE, load_history
    from src.training.run_emails import completion_email

    run_dir = Path(run_dir)
    root, run = run_root(run_dir), run_dir.name
    config = _read_json(run_dir / "training_config.json")
    summary = (config.get("summary") if isinstance(config, dict) else None) or {}
    log = (read_state(run_dir).get("plan") or {}).get("log")
    return completion_email(run, summary, load_history(run_dir), root / log if log else None,
                            evaluation_file=root / "stats" / f"evaluation_{run}.json",
                            curve_file=root / "stats" / run / LOSS_CURVE,
                            extra_rows=[("inference model", str(run_dir / "theta_inference"))])


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m src.utils.overnight",
                   description="The overnight run's lifecycle, one subcommand per moment of it (see "
                               "the module docstring).")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("plan", help="parse the script's arguments and decide the run; print variables")
    s.add_argument("--format", choices=["sh", "cmd"], default="sh", help="bash assignments or a batch file")
    s.add_argument("--out", type=Path, default=None, help="write there instead of stdout")
    s.add_argument("--script", default="train_overnight_enhanced.sh", help="the script's name, for the help")
    s.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the script's own arguments")
    u = sub.add_parser("usage", help="the scripts' help")
    u.add_argument("--script", default="train_overnight_enhanced.sh", help="the script's name")
    b = sub.add_parser("banner", help="print the run banner")
    b.add_argument("--run_dir", type=Path, required=True, help="models/<run>")
    b.add_argument("--python", default="", help="the Python the steps use (shown)")
    st = sub.add_parser("start", help="send the start email of the whole chain")
    st.add_argument("--run_dir", type=Path, required=True, help="models/<run>")
    sp = sub.add_parser("step", help="run one step: output to the console, the log and the step file; signals "
                                     "passed on; a finished step recorded, and skipped by a rerun")
    sp.add_argument("--run_dir", type=Path, required=True, help="models/<run>")
    sp.add_argument("--step", required=True, help="the step's name (train, evaluate, ...)")
    sp.add_argument("--number", default=None, help="its place in the chain, N/M, for the header line")
    sp.add_argument("--output", default=None,
                    help=f"what the step writes; one of {', '.join(RECORDED_STEPS)} is then recorded as finished "
                         "and skipped while the output stays as it was")
    sp.add_argument("step_command", nargs=argparse.REMAINDER, help="-- then the step's command")
    r = sub.add_parser("prepared", help="after the prepare step: record the prepared file and the inputs")
    r.add_argument("--run_dir", type=Path, required=True, help="models/<run>")
    f = sub.add_parser("failed", help="record and report a failed or interrupted step (once), send the failure "
                                      "email")
    f.add_argument("--run_dir", type=Path, required=True, help="models/<run>")
    f.add_argument("--step", required=True, help="the step that failed")
    f.add_argument("--exit_code", type=int, required=True, help="its exit code")
    f.add_argument("--signal", default=None, help="the signal that stopped the script (TERM, INT, HUP)")
    c = sub.add_parser("completed", help="mark the run done, send the completion email, print the summary")
    c.add_argument("--run_dir", type=Path, required=True, help="models/<run>")
    c.add_argument("--python", default="", help="the venv's Python (for the 'try it' line)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("plan", "usage"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr: stdout carries the plan
    else:
        setup_run_output(run_file(args.run_dir, "log"))
    try:
        if args.command == "plan":
            script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
            text = format_plan(make_plan(script_args, script=args.script), args.format)
            if args.out:
                args.out.write_bytes(text.encode("utf-8"))
            else:
                sys.stdout.write(text)
        elif args.command == "usage":
            build_script_parser(args.script).print_help()
        elif args.command == "banner":
            for line in banner_lines(args.run_dir, args.python):
                logger.info("%s", line)
        elif args.command == "start":
            send_chain_email(args.run_dir, "start", lambda: chain_start_email(args.run_dir))
        elif args.command == "step":
            return cmd_step(args)
        elif args.command == "prepared":
            cmd_prepared(args.run_dir)
        elif args.command == "failed":
            name = args.signal.upper() if args.signal else None
            report_failure(args.run_dir, args.step, args.exit_code,
                           None if name is None else name if name.startswith("SIG") else "SIG" + name)
        elif args.command == "completed":
            return cmd_completed(args.run_dir, args.python)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
