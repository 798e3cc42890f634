"""The shared atomic writers in src/utils/common.py: what a later step reads is whole, and readable like any file
the user creates.

    ./tests/run.sh -k test_common
"""

from __future__ import annotations

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
