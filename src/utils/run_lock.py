"""One process at a time in a run folder: an OS lock on ``<folder>/run.lock``, whose text says who holds it.

Training takes the lock of its ``--output_dir`` before it writes anything there; evaluation and optimisation take
the lock of the run folder their model comes from (and of the file or folder they write). A second taker is
refused at once (exit 2) with the holder's pid, host, start time and command. The lock is the operating system's
(``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), not the file's existence: the kernel drops it when the
holder dies, however it dies (kill -9, a crash, a power cut), so a stale ``run.lock`` never blocks anyone; its
text then only says who held the folder last. A clean release removes the file while still holding the lock, and
a taker checks, once it holds a lock, that the name still leads to the file it locked (else it starts over), so
the removal never lets two processes in.

    python -m src.utils.run_lock check --dir models/<run>     # exit 0 when free, 2 naming the holder
    python -m src.utils.run_lock hold --dir models/<run> --what "overnight run" -- ./train_overnight_enhanced.sh
    exec 9>>models/.overnight.lock; python -m src.utils.run_lock take --fd 9 --lock_file models/.overnight.lock
    from src.utils.run_lock import RunLock
    with RunLock(run_dir, "training", hint="use another --output_dir"):
        ...

``hold`` keeps the lock while its command runs and hands it down: the command and everything it starts see the
lock's token in ``THETA_RUN_LOCK_TOKENS`` and take the held lock as theirs (the overnight script's steps each
take the lock of the run they write, and must not refuse their own script). On POSIX the lock's file descriptor
is also passed to the command, so the folder stays locked while the command runs even if ``hold`` itself is
killed. One process may take the same lock more than once (tests call ``train()`` repeatedly); only another
process is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils.common import FlagParser, UserError, run_entry_point

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
TOKENS_ENV = "THETA_RUN_LOCK_TOKENS"  # comma-separated tokens of the locks this process's ancestors hold
# Windows locks byte ranges, and a locked range cannot be read by others: lock one byte far past the text, so
# the holder's description stays readable (LockFile allows ranges beyond the end of the file).
_WINDOWS_LOCK_OFFSET = 0x7FFFFFF0
_MAX_COMMAND_CHARS = 500


class RunLocked(UserError):
    """The folder's lock is held by another live process (``holder``: its recorded description)."""

    def __init__(self, message: str, holder: dict | None):
        super().__init__(message)
        self.holder = holder


class _Handle:
    """One open, OS-locked lock file, shared by every RunLock of this process on that file."""

    def __init__(self, fd: int, token: str, lock_file: Path):
        self.fd, self.token, self.lock_file = fd, token, lock_file
        self.shares, self.closed = 0, False

    def close(self) -> None:
        """Remove the lock file while still holding it, then give the OS lock back. A taker that opened the file
        just before sees, once it has the lock, that the name no longer leads to its file, and starts over
        (``_same_file``); so no two processes ever hold it. Where an open file cannot be removed (Windows) it stays
        and means nothing. Idempotent: the descriptor's number may be reused once closed, so it is never touched
        again."""
        if self.closed:
            return
        self.closed = True
        try:
            if _same_file(self.fd, self.lock_file):
                os.unlink(self.lock_file)
        except OSError:
            pass
        try:
            _os_unlock(self.fd)
        finally:
            os.close(self.fd)


_HELD: dict[str, _Handle] = {}  # this process's OS-held locks by the lock file's real path


def _try_os_lock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False when another open file holds it."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:  # EWOULDBLOCK: another open file holds it
        return False


def _os_unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _same_file(fd: int, path: Path) -> bool:
    """``path`` still names the file open as ``fd`` (not removed or replaced since it was opened)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_description(fd: int, data: dict) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def read_holder(lock_file: Path) -> dict | None:
    """The description a lock file holds (pid, host, what, command, since, token), or None if unreadable."""
    try:
        data = json.loads(Path(lock_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict | None) -> str:
    """``training by pid 123 on host-a since 2026-01-01 23:00:00 (python -m ...)``, for messages."""
    if not holder:
        return "a process that has not written its description yet"
    return (f"{holder.get('what', 'a process')} by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"since {holder.get('since', '?')} ({holder.get('command', '?')})")


def _inherited_tokens() -> set[str]:
    return {t for t in os.environ.get(TOKENS_ENV, "").split(",") if t}


class RunLock:
    """The exclusive lock of one run folder (``<folder>/run.lock``), or of one output (``RunLock.beside``).

    ``acquire()`` takes it or raises ``RunLocked`` (a UserError: exit 2) naming the holder and what to do;
    ``release()`` gives it back and removes the file (also on leaving a ``with`` block); a file left behind by a
    holder that died means nothing. ``mode`` says how it is held: ``own`` (this
    process holds the OS lock, its description in the file), ``inherited`` (an ancestor's ``hold`` holds it, its
    token is in our environment) or ``unguarded`` (the filesystem cannot lock, e.g. some network mounts answer
    ENOLCK: a warning, and the run goes on without the guard rather than not at all).
    """

    def __init__(self, folder: str | Path, what: str, hint: str = "", lock_file: str | Path | None = None):
        self.folder = Path(folder)
        self.lock_file = Path(lock_file) if lock_file is not None else self.folder / LOCK_NAME
        self.what, self.hint = what, hint
        self.mode: str | None = None  # None while not held
        self._handle: _Handle | None = None

    @classmethod
    def beside(cls, path: str | Path, what: str, hint: str = "") -> "RunLock":
        """The lock of one output file or folder outside any run folder: ``.<name>.lock`` next to it."""
        path = Path(path)
        return cls(path.parent, what, hint, lock_file=path.parent / f".{path.name}.lock")

    @property
    def token(self) -> str | None:
        return self._handle.token if self._handle is not None else None

    @property
    def fd(self) -> int | None:
        return self._handle.fd if self._handle is not None else None

    def acquire(self) -> "RunLock":
        if self.mode is not None:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.lock_file)
        handle = _HELD.get(key)
        if handle is None:
            handle = self._lock_new(key)
        if handle is not None:  # ours (new, or shared with another RunLock of this process)
            handle.shares += 1
            self._handle, self.mode = handle, "own"
        return self

    def _lock_new(self, key: str) -> _Handle | None:
        for _ in range(100):  # a releasing holder removes the file: lock the one the name leads to now
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_os_lock(fd)
            except OSError as err:
                os.close(fd)
                logger.warning("could not lock %s (%s): running without the one-process-per-folder guard",
                               self.lock_file, err)
                self.mode = "unguarded"
                return None
            if not locked or _same_file(fd, self.lock_file):
                break
            os.close(fd)
        if not locked:
            os.close(fd)
            holder = read_holder(self.lock_file)
            if holder and holder.get("token") in _inherited_tokens():
                self.mode = "inherited"
                return None
            raise RunLocked(self._refusal(holder), holder)
        handle = _Handle(fd, secrets.token_hex(8), self.lock_file)
        _write_description(fd, self._description(handle.token))
        _HELD[key] = handle
        return handle

    def release(self) -> None:
        """Give back this object's share; the OS lock goes with the last share of the process."""
        handle, self._handle, self.mode = self._handle, None, None
        if handle is None or handle.closed:
            return
        handle.shares -= 1
        if handle.shares <= 0:
            _HELD.pop(os.path.realpath(handle.lock_file), None)
            handle.close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _description(self, token: str) -> dict:
        command = shlex.join(getattr(sys, "orig_argv", sys.argv))
        return {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command[:_MAX_COMMAND_CHARS] + ("..." if len(command) > _MAX_COMMAND_CHARS else ""),
                "token": token,
                "note": "The folder is locked while this process holds an OS lock on this file. A clean exit "
                        "removes the file; one left by a process that died means nothing (python -m "
                        "src.utils.run_lock check --dir FOLDER asks the OS)."}

    def _refusal(self, holder: dict | None) -> str:
        same_host = holder is not None and holder.get("host") == socket.gethostname()
        stop = f"stop it (kill {holder.get('pid')})" if same_host else "stop it"
        return (f"{self.folder} is in use: {describe_holder(holder)}. Only one process may write a run's files at "
                f"a time, so this {self.what} did not start. Wait for that process to finish or {stop}, then run "
                f"this again" + (f"; {self.hint}" if self.hint else "") + f" (lock file {self.lock_file}).")


def holder_of(folder: str | Path, lock_file: str | Path | None = None) -> dict | None:
    """Who holds the folder's lock now (its description, ``{}`` if none was written), or None when it is free.

    Asks the OS, never trusts the text: a dead holder's description is still there, and means nothing.
    """
    lock_file = Path(lock_file) if lock_file is not None else Path(folder) / LOCK_NAME
    if not lock_file.is_file():
        return None
    if os.path.realpath(lock_file) in _HELD:
        return read_holder(lock_file) or {}
    fd = os.open(lock_file, os.O_RDONLY)
    try:
        if _try_os_lock(fd):
            _os_unlock(fd)
            return None
    finally:
        os.close(fd)
    return read_holder(lock_file) or {}


def release_all(folder: str | Path) -> None:
    """Give back every share this process holds of ``folder``'s lock: the end of a run, shares that a failed
    earlier call in this process left behind included."""
    handle = _HELD.pop(os.path.realpath(Path(folder) / LOCK_NAME), None)
    if handle is not None:
        handle.close()


def claim_run_folder(folder: str | Path, what: str, flag: str = "--output_dir") -> RunLock:
    """Make ``folder`` ready for one writer, before anything is written into it: refused (UserError naming
    ``flag``) when it names a file or cannot be created, else created and locked (RunLocked when held)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder: give a folder (e.g. models/<run>) or move the "
                        "file away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UserError(f"{flag} {folder}: cannot be created, a part of the path is a file ({err.filename})") \
            from err
    except PermissionError as err:
        raise UserError(f"{flag} {folder}: cannot be created here (permission denied); choose a folder you can "
                        "write") from err
    return RunLock(folder, what, hint=f"a separate run needs its own {flag}").acquire()


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a model or output path belongs to: itself or its parent when that holds the run's
    ``training_config.json`` (``models/<run>/theta_final`` -> ``models/<run>``), else None."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / "training_config.json").is_file():
            return candidate
    return None


def lock_outputs(what: str, reads: list[str | Path], writes: list[str | Path], hint: str = "") -> list[RunLock]:
    """Take the locks an evaluation or optimisation needs: the run folder of every path it reads or writes
    (training must not be running there), and each written path outside a run folder (``RunLock.beside``: two
    evaluations must not write one file). All or nothing: a refusal releases what was taken. Release the returned
    locks with :func:`release_locks`."""
    wanted: dict[str, RunLock] = {}
    for path in [*reads, *writes]:
        folder = run_folder_of(path)
        if folder is not None:
            wanted.setdefault(os.path.realpath(folder / LOCK_NAME), RunLock(folder, what, hint))
    for path in writes:
        if run_folder_of(path) is None:
            lock = RunLock.beside(path, what, hint)
            wanted.setdefault(os.path.realpath(lock.lock_file), lock)
    taken: list[RunLock] = []
    try:
        for _, lock in sorted(wanted.items()):  # a fixed order: two takers never hold one lock each
            taken.append(lock.acquire())
    except BaseException:
        release_locks(taken)
        raise
    return taken


def release_locks(locks: list[RunLock]) -> None:
    for lock in reversed(locks):
        lock.release()


# ---------------------------------------------------------------------------------------------------------------
# Command line: check a folder, or hold its lock while a command runs
# ---------------------------------------------------------------------------------------------------------------

def take_inherited(fd: int, lock_file: Path, what: str, holder_pid: int, hint: str = "") -> None:
    """Lock the open file ``fd`` that this process inherited from its parent (a shell's ``exec 9>>FILE``), on the
    parent's behalf: a ``flock`` belongs to the open file, not to the process, so the lock stays with the parent
    (and whatever it starts) after this process exits, and goes when the last of them closes it. The description
    names ``holder_pid`` (the shell). POSIX only; refused with ``RunLocked`` when another open file holds it."""
    if os.name == "nt":
        raise UserError("take: only on POSIX (the .bat holds its lock with `hold`)")
    lock_file = Path(lock_file)
    if not _same_file(fd, lock_file):
        raise UserError(f"take: descriptor {fd} is not {lock_file} (open it first: exec {fd}>>{lock_file})")
    lock = RunLock(lock_file.parent, what, hint, lock_file=lock_file)
    if not _try_os_lock(fd):
        holder = read_holder(lock_file)
        if holder and holder.get("token") in _inherited_tokens():
            return
        raise RunLocked(lock._refusal(holder), holder)
    description = lock._description(secrets.token_hex(8))
    description.update(pid=holder_pid, command=description["command"] if holder_pid == os.getpid() else
                       _parent_command(holder_pid))
    _write_description(fd, description)


def _parent_command(pid: int) -> str:
    """The command line of process ``pid`` (for the lock's description), or ``pid N`` where it cannot be read."""
    try:
        import psutil

        return shlex.join(psutil.Process(pid).cmdline())[:_MAX_COMMAND_CHARS]
    except Exception:  # psutil missing, the process gone, no permission: the pid alone still says who
        return f"pid {pid}"


def hold(folder: Path, what: str, command: list[str], lock_file: Path | None = None, hint: str = "") -> int:
    """Run ``command`` holding ``folder``'s lock; returns its exit code (128 + N when signal N ended it).

    ``hold`` waits for the command whatever happens, so the lock is never given back while it runs: SIGTERM sent
    to ``hold`` is passed on to the command; SIGINT and SIGHUP are ignored here, because the terminal sends them
    to the command itself (same process group), and passing them on would deliver them twice (a second Ctrl-C
    makes the trainer exit without its checkpoint).
    """
    if not command:
        raise UserError("hold: give the command to run after --, e.g. hold --dir models/<run> -- ./train.sh")
    lock = RunLock(folder, what, hint, lock_file=lock_file).acquire()
    try:
        env = {**os.environ, TOKENS_ENV: ",".join(sorted(_inherited_tokens() | {lock.token} - {None}))}
        extra = {"pass_fds": (lock.fd,)} if os.name != "nt" and lock.fd is not None else {}
        try:
            child = subprocess.Popen(command, env=env, **extra)
        except OSError as err:
            raise UserError(f"hold: cannot run {command[0]!r}: {err}") from err
        handlers = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: lambda signum, frame: child.send_signal(signum)}
        if hasattr(signal, "SIGHUP"):
            handlers[signal.SIGHUP] = signal.SIG_IGN
        previous = {s: signal.signal(s, h) for s, h in handlers.items()}
        try:
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 128 - code if code < 0 else code
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    p = FlagParser(prog="python -m src.utils.run_lock", description="The lock of a run folder: who "
                   "holds it, or hold it while a command runs.")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="exit 0 when the folder is free, 2 naming its holder")
    c.add_argument("--dir", type=Path, required=True, help="the run folder, e.g. models/<run>")
    h = sub.add_parser("hold", help="hold the folder's lock while the command after -- runs (exit: its code)")
    h.add_argument("--dir", type=Path, required=True, help="the run folder, e.g. models/<run> (created if absent)")
    h.add_argument("--what", type=str, default="overnight run", help="what the holder does, for the messages")
    h.add_argument("--lock_file", type=Path, default=None, help="the lock file (default: <dir>/run.lock)")
    h.add_argument("--hint", type=str, default="", help="added to the refusal")
    h.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    t = sub.add_parser("take", help="lock an inherited open file for the parent shell (POSIX): the overnight .sh")
    t.add_argument("--fd", type=int, required=True, help="the descriptor the shell opened on --lock_file")
    t.add_argument("--lock_file", type=Path, required=True, help="the lock file, e.g. models/.overnight.lock")
    t.add_argument("--what", type=str, default="overnight run", help="what the holder does, for the messages")
    t.add_argument("--hint", type=str, default="", help="added to the refusal")
    args = p.parse_args(argv)
    if args.action == "take":
        take_inherited(args.fd, args.lock_file, args.what, os.getppid(), args.hint)
        return 0
    if args.action == "check":
        holder = holder_of(args.dir)
        if holder is None:
            print(f"{args.dir} is free")
            return 0
        raise RunLocked(f"{args.dir} is in use: {describe_holder(holder)}", holder)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise UserError(f"--dir {args.dir} is a file, not a folder")
    return hold(args.dir, args.what, command, args.lock_file, args.hint)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
