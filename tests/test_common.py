"""The shared atomic writers in src/utils/common.py: what a later step reads is whole, and readable like any file
the user creates.

    ./tests/run.sh -k test_common
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from src.utils.common import atomic_dir, atomic_write_json, atomic_write_text, umask_modes


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writers_follow_the_umask_not_mkstemp(tmp_path, umask):
    """Regression (issues 11 and 14): mkstemp/mkdtemp made every atomic output 0600/0700 whatever the umask."""
    old = os.umask(umask)
    try:
        assert umask_modes() == (0o666 & ~umask, 0o777 & ~umask)
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"k": 1})
        with atomic_dir(tmp_path / "model", marker="COMPLETE") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # a private writer
            os.close(fd)
    finally:
        os.umask(old)
    for path in ("a.txt", "b.json", "model/sub/weights.bin", "model/COMPLETE"):
        assert _mode(tmp_path / path) == 0o666 & ~umask, path
    for path in ("model", "model/sub"):
        assert _mode(tmp_path / path) == 0o777 & ~umask, path


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "theta_final"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("crash while writing")
    assert (target / "v").read_text() == "1"  # the failed write left the old folder as it was
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theta_final"]  # no temp or old folder left behind


# --- a write that fails for want of room -----------------------------------------------------------------------

def test_a_full_disk_in_an_atomic_write_names_path_cause_and_room_and_keeps_the_old_version(tmp_path, monkeypatch):
    import errno

    from src.utils import common

    atomic_write_json(tmp_path / "loss_history.json", [1])
    with atomic_dir(tmp_path / "theta_best") as tmp:
        (tmp / "model.safetensors").write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.os, "fsync", full)
    with pytest.raises(common.WriteFailed) as failed:
        atomic_write_json(tmp_path / "loss_history.json", [1, 2])
    message = str(failed.value)
    assert message.startswith(f"could not write {tmp_path / 'loss_history.json'}: No space left on device")
    assert "free of" in message and "run the same command again" in message
    with pytest.raises(common.WriteFailed, match="theta_best: RuntimeError: .*inline_container"):
        with atomic_dir(tmp_path / "theta_best") as tmp:  # torch.save's own wording, no errno
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(PermissionError):  # not a want of room: passes unchanged, with its traceback
        with atomic_dir(tmp_path / "theta_best") as tmp:
            raise PermissionError(errno.EACCES, "Permission denied")
    assert json.loads((tmp_path / "loss_history.json").read_text()) == [1]  # the old versions, whole
    assert (tmp_path / "theta_best" / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_history.json", "theta_best"]  # no temporaries


def test_run_entry_point_exits_5_for_a_failed_write_and_keeps_tracebacks_for_bugs(capsys):
    import errno

    from src.utils.common import EXIT_WRITE_FAILED, WriteFailed, run_entry_point

    def fails(error):
        def main(argv):
            raise error
        return main

    assert run_entry_point(fails(WriteFailed("could not write x: full"))) == EXIT_WRITE_FAILED == 5
    assert capsys.readouterr().err == "error: could not write x: full\n"
    # a write outside the atomic writers (a log's flush): the cause and the room, though no path is known
    assert run_entry_point(fails(OSError(errno.EFBIG, "File too large"))) == 5
    assert capsys.readouterr().err.startswith("error: a write failed: File too large (errno 27)")
    try:  # a clean-up that failed while the first failure unwound: the first is the one reported
        try:
            raise WriteFailed("could not write step_8: full")
        finally:
            raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as second:
        assert run_entry_point(fails(second)) == 5
    assert "could not write step_8" in capsys.readouterr().err
    with pytest.raises(ValueError):
        run_entry_point(fails(ValueError("a bug")))


def test_remove_stale_temporaries_takes_only_the_writers_names(tmp_path):
    import tempfile

    from src.utils.common import remove_stale_temporaries

    ours = [tempfile.mkdtemp(prefix=".theta_best.", suffix=".tmp", dir=tmp_path),
            tempfile.mkstemp(prefix=".metrics.json.", suffix=".tmp", dir=tmp_path)[1],
            tempfile.mkdtemp(prefix=".theta_final.", suffix=".old", dir=tmp_path)]
    (tmp_path / ".theta_inference.staging-1234").mkdir()
    kept = [".theta_best.lock", "run.lock", "notes.tmp", ".hidden", ".a.b.tmp"]
    for name in kept:
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(tmp_path, names=["theta_inference"]) == [tmp_path / ".theta_inference.staging-1234"]
    assert sorted(map(str, remove_stale_temporaries(tmp_path))) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
