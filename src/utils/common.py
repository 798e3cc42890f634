"""Small helpers every Theta script shares: user-facing errors, atomic writes, logging set-up, run ids.

    from src.utils.common import UserError, atomic_dir, atomic_write_json, setup_logging, run_entry_point
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RUN_ID_PATTERN = re.compile(r"^theta_enhanced_\d{8}_\d{6}$")
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a record). Entry points print the message, never a traceback."""


def stable_hash(text: str) -> int:
    """A 48-bit number fixed by ``text`` (SHA-256), the same in every process and on every machine (unlike
    ``hash()``): splits and curriculum tie-breaks key on it, so adding records never moves the others."""
    return int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12], 16)


def new_run_id(now: float | None = None) -> str:
    """``theta_enhanced_<YYYYMMDD_HHMMSS>`` in local time, digits only (no locale-dependent names)."""
    return time.strftime("theta_enhanced_%Y%m%d_%H%M%S", time.localtime(now))


def umask_modes() -> tuple[int, int]:
    """(file mode, folder mode) that a plain ``open()`` / ``mkdir()`` would give now: 0644 / 0755 under umask 022.

    ``mkstemp``/``mkdtemp`` (and some writers, transformers' safetensors among them) make private 0600/0700
    entries whatever the umask; the atomic writers below give theirs these modes instead. Linux reports the umask in
    /proc without changing it; elsewhere it is read by setting and restoring it (not thread-safe, but only the
    main thread writes outputs).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


@contextmanager
def atomic_open(path: str | Path):
    """A text file handle whose content replaces ``path`` only once the ``with`` block succeeds.

    Written to a temporary file in the same folder, flushed and fsynced, then ``os.replace``d: a crash at any
    point leaves either the old file or the new one, never half of one. Streams large outputs without holding
    them in memory. The file gets the user's umask mode (``mkstemp`` alone would leave it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, umask_modes()[0])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (folders only where the OS allows it: not on Windows)."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_dir(path: str | Path, marker: str | None = None):
    """A temporary folder next to ``path`` that replaces ``path`` only once the ``with`` block succeeds.

    On success: every file is fsynced, the folder takes ``path``'s place, the parent folder is fsynced, then the
    optional ``marker`` file (e.g. ``COMPLETE``) is written inside it. Where ``path`` already exists the two are
    swapped in one atomic rename (Linux), so ``path`` is never absent, not even for a moment, and the old folder is
    removed only afterwards; elsewhere the old folder is moved aside just before the new one is renamed in (a
    window of one rename) and removed after. A failure inside the block removes the temporary folder and leaves
    ``path`` as it was. Files and folders get the user's umask modes (``mkdtemp`` and some writers, transformers'
    safetensors among them, make them private). Used for every folder a later step reads: model folders, checkpoints, theta_best/,
    theta_final/. Writers of the same ``path`` must not run concurrently (under DDP only rank 0 writes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        file_mode, dir_mode = umask_modes()
        for folder, _, files in os.walk(tmp):
            for name in files:
                os.chmod(Path(folder) / name, file_mode)
                _fsync_path(Path(folder) / name)
            os.chmod(folder, dir_mode)
            _fsync_path(Path(folder))
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        elif path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(path.parent)
    if marker is not None:
        with open(path / marker, "w", encoding="utf-8") as fh:  # open() honours the umask itself
            fh.write("complete\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Load a JSON file; a missing or broken file is a UserError naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") \
            from err
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start})") from err


class _PlainFormatter(logging.Formatter):
    """File logs without colour codes."""
    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def format(self, record: logging.LogRecord) -> str:
        return self.ANSI.sub("", super().format(record))


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO, quiet_console: bool = False) -> None:
    """One console handler and (optionally) one plain-text file handler on the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    if not quiet_console:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(fh)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_entry_point(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's ``main``; a UserError becomes ``error: ...`` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
