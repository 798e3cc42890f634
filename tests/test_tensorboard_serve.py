"""``--tensorboard``: the overnight script serves models/ on 127.0.0.1 while the run lasts; the test reads a run's
scalars back over HTTP (tensorboard's /data/plugin/scalars API) and checks the values, then checks that the server
is gone with the script. Bounded in time; the script's whole process group is killed whatever happens.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_tensorboard_serve.py -q
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


from test_overnight_scripts import SH, STUB, clean_env, copy_project

RUN = "theta_enhanced_20200101_000000"
VALUES = [(1, 2.5), (2, 2.0), (3, 1.25)]
DEADLINE_S = 90


def write_events(run_dir: Path) -> None:
    """A finished run's tensorboard folder with three train/loss points (the trainer writes the same tags)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step, value in VALUES:
        writer.add_scalar("train/loss", value, step)
    writer.close()
    (run_dir / "DONE").write_text("x")  # finished: never resumed


def fetch_scalars(port: int, run: str, tag: str) -> list | None:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}", timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_tensorboard_flag_serves_the_runs(tmp_path, tiny_datasets_dir):
    project = copy_project(tmp_path / "my theta", tiny_datasets_dir)
    write_events(project / "models" / RUN)
    release = tmp_path / "release"
    log = tmp_path / "calls.jsonl"
    env = clean_env(THETA_PYTHON=str(STUB), STUB_LOG=str(log), STUB_REAL_PYTHON=sys.executable,
                    STUB_REAL="src.utils.overnight,tensorboard.main",
                    STUB_HOLD=f"src.training.train_enhanced={release}")
    # The stub holds the train step open; tensorboard itself runs for real (STUB_REAL).
    proc = subprocess.Popen([str(project / SH.name), "--profile", "quick", "--tensorboard"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.time() + DEADLINE_S
        port = None
        while port is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"tensorboard: http://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        points = None
        while points is None and time.time() < deadline:
            points = fetch_scalars(port, f"{RUN}/tensorboard", "train/loss") or None
            time.sleep(0.5)
        assert points is not None, f"no scalars from tensorboard on port {port} within {DEADLINE_S} s"
        # [wall_time, step, value] per point, the values as written (float32).
        assert [(p[1], p[2]) for p in points] == VALUES
        release.write_text("go")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + out
        # The server went with the script (its EXIT trap).
        stop = time.time() + 15
        while port_open(port) and time.time() < stop:
            time.sleep(0.2)
        assert not port_open(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a server left behind in the group, if any
        except ProcessLookupError:
            pass
