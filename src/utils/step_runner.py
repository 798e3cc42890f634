"""Run one step of the overnight chain as a child process: its output copied to the console, the run's log and the
step's output file, and TERM/INT/HUP passed on to it, so that no step outlives the script that started it.

The lifecycle (``python -m src.utils.overnight step``) decides what a step is and records how it ended; this
module only runs the process:

    from src.utils.step_runner import StepProcess
    result = StepProcess(["python", "-m", "src.training.evaluate_model", "--model_path", "..."],
                         log=Path("logs/training_enhanced_<run>.log"), step_output=Path("logs/.step_output.txt")).run()
    result.exit_code, result.signal          # (0, None); (143, "SIGTERM") when a signal stopped it

POSIX: the child runs in a session of its own, so the terminal's Ctrl-C and hang-up reach it only through this
runner, once: the runner gets a signal from the terminal (it is in the script's process group) and the same one
forwarded by the script's trap, and passes on one copy per second of each signal (a second Ctrl-C a second later
still reaches the trainer, which then exits at once). HUP is passed on as TERM, on which the trainer saves a
checkpoint (HUP would end it on the spot). When the child has ended, what is left of its process group
(a worker it started) gets TERM, then KILL. On Linux the child also dies with the runner (``PR_SET_PDEATHSIG``),
so a ``kill -9`` of the script's process group leaves no step behind.

Windows: the console sends Ctrl-C and Ctrl-Break to every process attached to it, the step included, so the
runner passes nothing on and only records that it happened. Closing the window sends CTRL_CLOSE_EVENT and
terminates every process of the console about 5 seconds later; the runner's console handler calls ``on_close``
(the lifecycle records the step as interrupted and tries the failure email) in that time.

Sharp edge: the exit code is 128 + the signal's number whenever a signal reached the runner, whatever the child
returned (the trainer's 3 after its checkpoint included): the chain was interrupted, not the step's work wrong.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, BinaryIO

logger = logging.getLogger(__name__)

IS_WINDOWS = os.name == "nt"
HANDLED = [s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK")) if s]
FORWARD_AS = {getattr(signal, "SIGHUP", -1): signal.SIGTERM}  # the trainer checkpoints on TERM; HUP ends it at once
DUPLICATE_WINDOW_S = 1.0  # the terminal's and the script's copies of one Ctrl-C arrive milliseconds apart
STRAGGLER_WAIT_S = 3.0
CLOSE_EVENTS = {2: "CTRL_CLOSE_EVENT", 5: "CTRL_LOGOFF_EVENT", 6: "CTRL_SHUTDOWN_EVENT"}


@dataclass
class StepResult:
    exit_code: int
    signal: str | None = None  # the first signal that reached the runner ("SIGTERM"), or a console close event


def _linux_parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the runner dies (Linux ``prctl``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before prctl took effect
            os._exit(137)
    return die_with_parent


class StepProcess:
    """One step's process: start, copy its output, pass signals on, wait, clean up its process group."""

    def __init__(self, command: list[str], log: Path | None = None, step_output: Path | None = None,
                 on_close: Callable[[str], None] | None = None):
        self.command = command
        self.log, self.step_output, self.on_close = log, step_output, on_close
        self.proc: subprocess.Popen | None = None
        self.received: int | str | None = None
        self._forwarded: dict[int, float] = {}
        self._console: BinaryIO | None = getattr(sys.stdout, "buffer", None)
        self._close_handler = None  # the ctypes callback must stay referenced while installed

    def run(self) -> StepResult:
        old = {s: signal.signal(s, self._on_signal) for s in HANDLED}
        self._install_close_handler()
        try:
            return self._run()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _run(self) -> StepResult:
        sys.stdout.flush()
        outputs = []
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            outputs.append(open(self.log, "ab"))
        if self.step_output is not None:
            outputs.append(open(self.step_output, "wb"))
        try:
            try:
                self.proc = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=not IS_WINDOWS, preexec_fn=None if IS_WINDOWS else _linux_parent_death_signal())
            except OSError as err:
                self._write(f"error: cannot start {self.command[0]}: {err}\n".encode(), outputs)
                return StepResult(127)
            if self.received is not None and not isinstance(self.received, str):
                self._forward(self.received)  # a signal that came while the step was starting
            copier = threading.Thread(target=self._copy, args=(self.proc.stdout, outputs), daemon=True)
            copier.start()
            code = self.proc.wait()
            self._end_stragglers()
            copier.join(STRAGGLER_WAIT_S)
        finally:
            for fh in outputs:
                fh.close()
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
        if self.received is None:
            return StepResult(code)
        if isinstance(self.received, str):
            return StepResult(128 + getattr(signal, "SIGHUP", 1), self.received)
        return StepResult(128 + int(self.received), signal.Signals(self.received).name)

    # --- output ------------------------------------------------------------------------------------------------
    def _copy(self, pipe, outputs: list) -> None:
        fd = pipe.fileno()
        while True:
            chunk = os.read(fd, 65536)  # what is there now: progress lines without a newline come through too
            if not chunk:
                break
            self._write(chunk, outputs)
        pipe.close()

    def _write(self, chunk: bytes, outputs: list) -> None:
        if self._console is not None:
            try:
                self._console.write(chunk)
                self._console.flush()
            except (OSError, ValueError):  # the terminal is gone (hang-up): the log still gets everything
                self._console = None
        for fh in outputs:
            fh.write(chunk)
            fh.flush()

    # --- signals -----------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        now = time.monotonic()
        if now - self._forwarded.get(signum, -DUPLICATE_WINDOW_S) < DUPLICATE_WINDOW_S:
            return  # the second copy of one signal (the terminal's and the script's)
        self._forwarded[signum] = now
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        if IS_WINDOWS or self.proc is None:
            return  # Windows: the console gave the step its own copy
        try:
            os.killpg(self.proc.pid, FORWARD_AS.get(signum, signum))
        except (ProcessLookupError, PermissionError):
            pass

    def _end_stragglers(self) -> None:
        """TERM, then KILL, to what is left of the step's process group after the step itself ended."""
        if IS_WINDOWS or self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return  # nobody left
            deadline = time.monotonic() + STRAGGLER_WAIT_S
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.05)

    def _install_close_handler(self) -> None:
        """Windows: closing the console window (or logging off) calls ``on_close`` before the end."""
        if not IS_WINDOWS or self.on_close is None:
            return
        try:
            import ctypes

            def handler(event: int) -> bool:
                name = CLOSE_EVENTS.get(event)
                if name is None:
                    return False  # Ctrl-C and Ctrl-Break: Python's own handling (the SIGINT/SIGBREAK handler)
                if self.received is None:
                    self.received = name
                    try:
                        self.on_close(name)
                    except Exception as err:  # the process ends in a few seconds whatever happens here
                        logger.warning("could not record the interruption: %s", err)
                return True

            self._close_handler = ctypes.WINFUNCTYPE(ctypes.c_bool, ctypes.c_uint)(handler)
            ctypes.windll.kernel32.SetConsoleCtrlHandler(self._close_handler, True)
        except Exception as err:
            logger.debug("no console close handler: %s", err)
