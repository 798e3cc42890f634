"""Small helpers every Theta script shares: user-facing errors, atomic writes, logging set-up, run ids.

A write that fails for want of room (a full disk, a quota, a file-size limit) becomes ``WriteFailed``: the
message names the path, the cause, the free space and the fix, and ``run_entry_point`` exits with code 5 instead
of a traceback. The atomic writers leave the previous version in place when that happens.

    from src.utils.common import UserError, atomic_dir, atomic_write_json, setup_logging, run_entry_point

Every command line parser is a ``FlagParser``: flags are exact (no prefix matching, so ``--profil quick`` is an
error rather than ``--profile quick``) and an unknown flag's error names the nearest one.
"""

from __future__ import annotations

import argparse
import difflib
import errno
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
EXIT_WRITE_FAILED = 5

# Write failures for want of room by errno (no space, quota, file-size limit), and by the words that torch's
# zip writer and safetensors use, which carry no errno (torch: "[enforce fail at inline_container.cc:...]
# unexpected pos ..." or "... file write failed"; safetensors: "File too large (os error 27)").
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_WRITE_WORDS = re.compile(r"no space left|file too large|disk quota|quota exceeded|os error (?:27|28|122)\b|"
                          r"inline_container\.cc|pytorchstreamwriter|file write failed|filetoolarge|storagefull",
                          re.IGNORECASE)
# What interrupted atomic writes leave: mkstemp/mkdtemp names ".<name>.<8 random chars>.tmp" (and ".old" for the
# non-Linux swap of atomic_dir), and optimize_for_inference's ".<name>.staging-<pid>" folders.
_STALE = re.compile(r"^\.(?P<name>.+?)\.(?:[a-z0-9_]{8}\.(?:tmp|old)|staging-\d+)$")


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a record). Entry points print the message, never a traceback."""


class WriteFailed(Exception):
    """A file or folder could not be written for want of room: exit code 5, the message says what and the fix."""
    exit_code = EXIT_WRITE_FAILED


def write_failure_cause(err: BaseException) -> str | None:
    """The cause, when ``err`` (or an exception it came from) is a failed write for want of room; else None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return f"{e.strerror or e} (errno {e.errno})"
        if _WRITE_WORDS.search(str(e)):
            gloss = " (torch could not write the file to its end)" if "inline_container" in str(e) else ""
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{gloss}"
    return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _file_size_limit() -> int | None:
    """The soft RLIMIT_FSIZE (``ulimit -f``) in bytes, None when unlimited or unknown (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def write_failed_message(path: str | Path | None, cause: str) -> str:
    """What failed, why, how much room there is, what is intact and what to do (``path`` None: not known, e.g. a
    log file's flush; the room is then that of the current folder)."""
    where = Path(path) if path is not None else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
        room = f"{_human_bytes(usage.free)} free of {_human_bytes(usage.total)} on the disk of {where}"
    except OSError:
        room = f"free space on the disk of {where} unknown"
    limit = _file_size_limit()
    limit_text = f"; a file-size limit of {_human_bytes(limit)} is in force (ulimit -f)" if limit is not None else ""
    what = (f"could not write {path}: {cause}. {room}{limit_text}. Nothing was replaced: the previous "
            f"{Path(path).name} (if there was one) and everything written before are intact" if path is not None
            else f"a write failed: {cause}. {room}{limit_text}")
    return (f"{what}. Fix: free space on that disk{', raise the file-size limit' if limit is not None else ''}, "
            "or write to a larger disk (e.g. --output_dir), then run the same command again (training resumes "
            "from its last checkpoint)")


@contextmanager
def reporting_write_failures(path: str | Path):
    """Turn a failed write for want of room inside the block into WriteFailed naming ``path``; anything else
    passes unchanged (a bug must keep its traceback)."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as err:
        cause = write_failure_cause(err)
        if cause is None:
            raise
        raise WriteFailed(write_failed_message(path, cause)) from err


def remove_stale_temporaries(folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """Delete what interrupted atomic writes left directly in ``folder`` (``.<name>.<random>.tmp`` files and
    folders, ``.<name>.<random>.old`` folders, ``.<name>.staging-<pid>`` folders); only those of ``names`` when
    given. Returns what was removed. Call it only while holding the folder's lock (src/utils/run_lock.py): a live
    writer's temporary looks just the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _STALE.match(entry.name)
        if match is None or (names is not None and match["name"] not in names):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


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
    with reporting_write_failures(path):
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
    with reporting_write_failures(path):
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


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with exact flags: ``allow_abbrev=False`` (argparse otherwise takes a prefix,
    ``--profil`` for ``--profile`` and ``--epoch`` for ``--epochs``, silently), and an unknown flag's error names
    the nearest known one (``unrecognized arguments: --profil quick (did you mean --profile?)``). Sub-parsers made
    with ``add_subparsers`` are FlagParsers too (argparse builds them with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def option_names(self) -> list[str]:
        return [o for action in self._actions for o in action.option_strings if o.startswith("--")]

    def nearest_flag(self, flag: str) -> str | None:
        """The known ``--flag`` nearest to ``flag`` (its text before any ``=``), or None when none is close."""
        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, self.option_names(), n=1, cutoff=0.6)
        return close[0] if close else None

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            hints = [f"{f} -> {n}" for f in message.split(": ", 1)[1].split() if f.startswith("-")
                     for n in [self.nearest_flag(f)] if n]
            if hints:
                message += f" (did you mean {', '.join(hints)}?)" if len(hints) > 1 else \
                    f" (did you mean {hints[0].split(' -> ')[1]}?)"
        super().error(message)


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
    """Run a script's ``main``; a UserError becomes ``error: ...`` on stderr and exit code 2, a write that failed
    for want of room exit code 5 (``WriteFailed``; also one outside the atomic writers, e.g. a log file's flush,
    or one raised while cleaning up after the first: the first is reported)."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        first = next((e for e in _chain(err) if isinstance(e, WriteFailed)), None)
        cause = None if first is not None else write_failure_cause(err)
        if first is None and cause is None:
            raise
        message = str(first) if first is not None else write_failed_message(getattr(err, "filename", None), cause)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_WRITE_FAILED


def _chain(err: BaseException | None):
    """``err`` and the exceptions it came from (``__cause__`` / ``__context__``), newest first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
