"""Email glue for the training chain: ``create_notifier()`` for the trainer and a small CLI for the overnight scripts.

    python -m src.training.email_integration start --run_id theta_enhanced_20260101_230000 --log logs/x.log
    python -m src.training.email_integration failed --run_id RUN --step train --exit_code 1 --error_file F --log LOG
    python -m src.training.email_integration completed --run_id RUN --log LOG
    python -m src.training.email_integration tee --log LOG --step_output F -- python -m src.training.evaluate_model ...

Who sends which email (so nobody gets two of the same):
  * The overnight scripts export ``THETA_NOTIFY_FROM_SCRIPT=1`` and send the start, failure and completion emails
    of the whole chain (pre-flight -> prepare -> train -> evaluate -> optimise) through this CLI; the start email
    carries the pre-flight's warnings and time estimate (``<run_dir>/preflight.json``), the failure and
    completion emails come through ``python -m src.utils.overnight failed|completed``.
  * The trainer calls ``create_notifier(run_dir, args)``; under ``THETA_NOTIFY_FROM_SCRIPT=1`` the notifier it
    gets sends only the per-epoch and periodic status emails. Run alone (no variable), the trainer's notifier
    sends all of them: start, epochs, status, completion and failure.

Every CLI command exits 0 whatever happens to the email (a notification never fails the chain) and waits a
bounded time (``EMAIL_TIMEOUT_S`` plus a few seconds) for the server. ``tee`` runs a command, copies its output to
the console and appends it to the log, and exits with the command's exit code: the Windows script has no tee.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils.email_notifier import NullNotifier, TrainingEmailNotifier, load_email_config, resolve_email_config
from src.utils.common import PROJECT_ROOT

logger = logging.getLogger(__name__)

NOTIFY_FROM_SCRIPT_ENV = "THETA_NOTIFY_FROM_SCRIPT"
ERROR_LINES = 30


def notify_from_script() -> bool:
    """True when an overnight script owns the start/failure/completion emails."""
    return os.environ.get(NOTIFY_FROM_SCRIPT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def create_notifier(run_dir: Path, args: Any = None) -> TrainingEmailNotifier | NullNotifier:
    """The trainer's notifier for ``run_dir``; a NullNotifier when email is off (decided in milliseconds, no
    threads), so the trainer calls the same methods either way.

    Only rank 0 of a distributed run gets one. Under ``THETA_NOTIFY_FROM_SCRIPT=1`` it sends epoch and status
    emails only (see the module docstring). ``args`` is accepted for symmetry with the trainer; the settings
    reach the notifier through ``start(args)``.
    """
    try:
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return NullNotifier()
        # Under an overnight script the banner already said why email is off; alone, the trainer logs it once.
        config = resolve_email_config()[0] if notify_from_script() else load_email_config()
        if config is None:
            return NullNotifier()
        run_dir = Path(run_dir)
        return TrainingEmailNotifier(config, run_name=run_dir.name, run_dir=run_dir, log_file=run_dir / "train.log",
                                     lifecycle_emails=not notify_from_script())
    except Exception as err:  # email must never stop training
        logger.warning("email notifications off: %s", err)
        return NullNotifier()


# ---------------------------------------------------------------------------------------------------------------
# CLI for the scripts
# ---------------------------------------------------------------------------------------------------------------

def _script_notifier(args: argparse.Namespace) -> TrainingEmailNotifier | None:
    config, _, _ = resolve_email_config()  # quiet when off: the script's banner already said why
    if config is None:
        return None
    # A one-shot process: no periodic status thread, and one quick attempt set bounded by the shutdown wait.
    config = dataclasses.replace(config, status_interval_min=0)
    run_dir = Path(args.run_dir) if args.run_dir else PROJECT_ROOT / "models" / args.run_id
    return TrainingEmailNotifier(config, run_name=args.run_id, run_dir=run_dir, log_file=args.log,
                                 retries=2, backoff_s=1.0, shutdown_wait_s=config.timeout_s * 2 + 5)


def _finish(notifier: TrainingEmailNotifier, what: str) -> None:
    notifier.close()
    if notifier.counts["sent"]:
        print(f"email: {what} email sent to {', '.join(notifier.config.recipients)}")
    else:
        kind, text = notifier.last_error or ("not sent", "")
        print(f"email: {what} email NOT sent ({kind}{': ' + text if text else ''}); the run goes on")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cmd_start(args: argparse.Namespace) -> None:
    notifier = _script_notifier(args)
    if notifier is None:
        return
    details = {"log": args.log, "gpus": args.gpus, "resuming": "yes" if args.resuming else "no",
               "trainer flags": args.trainer_flags or "(none)"}
    # The pre-flight's warnings and estimate (src/training/preflight.py writes them into the run folder).
    preflight = _read_json(Path(args.run_dir or PROJECT_ROOT / "models" / args.run_id) / "preflight.json")
    if isinstance(preflight, dict):
        if preflight.get("estimate"):
            details["pre-flight estimate"] = f"training about {preflight['estimate']}"
        for i, warning in enumerate(preflight.get("warnings") or [], 1):
            details[f"pre-flight warning {i}"] = warning
    notifier.start({"profile": args.profile, "output_dir": args.run_dir or f"models/{args.run_id}",
                    "details": details})
    _finish(notifier, "start")


def cmd_failed(args: argparse.Namespace) -> None:
    output: list[str] = []
    if args.error_file:
        try:
            text = Path(args.error_file).read_text(encoding="utf-8", errors="replace")
            output = [line for line in text.splitlines() if line.strip()][-ERROR_LINES:]
        except OSError:
            pass
    if args.show:
        print(f"FAILED at step '{args.step}' (exit {args.exit_code})")
        if args.log:
            print(f"  log:   {args.log}")
        if output:
            print("  error:")
            print("\n".join("    " + line for line in output[-8:]))
        if args.exit_code == 3:
            print("  training was interrupted after saving a checkpoint: run the same command to resume")
        sys.stdout.flush()
    notifier = _script_notifier(args)
    if notifier is None:
        return
    if output:
        output = ["", "last lines of the step's output:"] + output
    lines = [f"step '{args.step}' failed with exit code {args.exit_code}"]
    if args.exit_code == 3:
        lines.append("training was interrupted (SIGINT/SIGTERM) after saving a checkpoint")
    if args.error:
        lines.append(args.error)
    lines += output
    notifier.failed("\n".join(lines), step=args.step, log_file=Path(args.log) if args.log else None)
    _finish(notifier, "failure")


def cmd_completed(args: argparse.Namespace) -> None:
    notifier = _script_notifier(args)
    if notifier is None:
        return
    config = _read_json(notifier.run_dir / "training_config.json") or {}
    summary = dict(config.get("summary") or {}) if isinstance(config, dict) else {}
    summary.setdefault("status", "completed")
    summary.setdefault("final_model", str(notifier.run_dir / "theta_final"))
    summary["inference_model"] = str(notifier.run_dir / "theta_inference")
    notifier.completed(summary)
    _finish(notifier, "completion")


def cmd_tee(args: argparse.Namespace) -> int:
    """Run ``args.command``; its output goes to the console and is appended to ``args.log``."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: tee needs a command after --", file=sys.stderr)
        return 2
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    copy = open(args.step_output, "wb") if args.step_output else None
    try:
        return _tee(command, Path(args.log), copy)
    finally:
        if copy is not None:
            copy.close()


def _tee(command: list[str], log_path: Path, copy) -> int:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while True:
            try:
                chunk = proc.stdout.readline()
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                for fh in (log, copy):
                    if fh is not None:
                        fh.write(chunk)
                        fh.flush()
            except KeyboardInterrupt:
                continue  # Ctrl-C reached the child too; keep copying while it saves and exits
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Email notifications for the overnight scripts (always exits 0), "
                                            "and a tee for Windows.")
    sub = p.add_subparsers(dest="command_name", required=True)

    def run_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--run_id", required=True, help="theta_enhanced_<YYYYMMDD_HHMMSS>")
        sp.add_argument("--run_dir", default=None, help="run folder (default models/<run_id>)")
        sp.add_argument("--log", default=None, help="the overnight log file")

    s = sub.add_parser("start", help="the start email of the whole chain")
    run_args(s)
    s.add_argument("--profile", default=None, help="profile in effect")
    s.add_argument("--gpus", type=int, default=1, help="GPUs used")
    s.add_argument("--resuming", action="store_true", help="the run resumes an unfinished one")
    s.add_argument("--trainer_flags", default="", help="flags passed on to the trainer, as one string")
    f = sub.add_parser("failed", help="the failure email: step, error, last log lines")
    run_args(f)
    f.add_argument("--step", required=True, help="the step that failed")
    f.add_argument("--exit_code", type=int, default=1, help="its exit code")
    f.add_argument("--error", default="", help="an error message")
    f.add_argument("--error_file", default=None, help="a file holding the step's output; its last lines are shown")
    f.add_argument("--show", action="store_true", help="also print the step, the log and the error on the console")
    c = sub.add_parser("completed", help="the completion email with the evaluation summary and loss curve")
    run_args(c)
    t = sub.add_parser("tee", help="run a command, copy its output to the console and append it to --log")
    t.add_argument("--log", required=True, help="file to append to")
    t.add_argument("--step_output", default=None, help="also write the output to this file (replaced)")
    t.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    if args.command_name == "tee":
        return cmd_tee(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        {"start": cmd_start, "failed": cmd_failed, "completed": cmd_completed}[args.command_name](args)
    except Exception as err:  # a notification never fails the chain
        print(f"email: {args.command_name} notification skipped: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
