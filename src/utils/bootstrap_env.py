"""Create the project's virtual environment and keep it in step with the requirements files.

Runs with the system Python before anything else exists, so it uses the standard library only.
The overnight scripts and ``tests/run.sh`` call it; it prints the venv's Python on its last line.

    python src/utils/bootstrap_env.py                                  # .venv + requirements.txt
    python src/utils/bootstrap_env.py --requirements requirements-dev.txt
    THETA_TORCH_SPEC="torch==2.13.0" python src/utils/bootstrap_env.py

Why torch is installed on its own, first: an open range such as ``torch>=2.4`` makes pip choose the newest
release, which on Linux is a multi-GB CUDA build. Installing ``THETA_TORCH_SPEC`` (default ``torch==2.13.0``,
which on our CPU machines resolves to a local CPU wheel) before the requirements means the range in
``requirements.txt`` is already satisfied and pip leaves torch alone. A GPU user who installed a CUDA build
into ``.venv`` keeps it: torch is only installed when ``import torch`` fails in the venv.

Installs happen only when the requirements changed: a SHA-256 of the requirements files (and the files they
include with ``-r``), the Python version and the torch spec is kept in ``.venv/.theta_requirements.sha256``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TORCH_SPEC = "torch==2.13.0"
STAMP_NAME = ".theta_requirements.sha256"
MIN_PYTHON = (3, 10)


def venv_python(venv_dir: Path) -> Path:
    """Path of the interpreter inside a venv, on Windows and elsewhere."""
    if os.name == "nt":
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def requirement_files(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """The file and every file it includes with ``-r``, in order, each once."""
    seen = seen if seen is not None else set()
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    files = [path]
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith(("-r ", "--requirement ")):
            files += requirement_files(path.parent / line.split(maxsplit=1)[1], seen)
    return files


def requirements_digest(paths: list[Path], torch_spec: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"python {sys.version_info[:2]} torch {torch_spec}\n".encode())
    for path in paths:
        for included in requirement_files(path):
            digest.update(included.name.encode() + b"\0" + included.read_bytes() + b"\0")
    return digest.hexdigest()


def run(cmd: list[str]) -> None:
    print("[bootstrap] " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)  # stdout carries only the venv's Python path


def ensure_venv(venv_dir: Path, requirements: list[Path], torch_spec: str) -> Path:
    """Create ``venv_dir`` if needed and install what changed. Returns the venv's Python."""
    python = venv_python(venv_dir)
    if not python.exists():
        print(f"[bootstrap] creating virtual environment {venv_dir}", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True, clear=venv_dir.exists()).create(venv_dir)

    stamp = venv_dir / STAMP_NAME
    wanted = requirements_digest(requirements, torch_spec)
    if stamp.exists() and stamp.read_text(encoding="utf-8").strip() == wanted:
        return python

    has_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        run([str(python), "-m", "pip", "install", "--disable-pip-version-check", torch_spec])
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    for path in requirements:
        cmd += ["-r", str(path)]
    run(cmd)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(wanted + "\n", encoding="utf-8")
    os.replace(tmp, stamp)
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=PROJECT_ROOT / ".venv", help="virtual environment folder")
    parser.add_argument("--requirements", type=Path, nargs="+", default=[PROJECT_ROOT / "requirements.txt"],
                        help="requirements files to install (default: requirements.txt)")
    args = parser.parse_args(argv)
    if sys.version_info < MIN_PYTHON:
        print(f"error: Theta needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; this is {sys.version.split()[0]}. "
              "Install a newer Python and run the command again.", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.requirements if not p.is_file()]
    if missing:
        print(f"error: requirements file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    torch_spec = os.environ.get("THETA_TORCH_SPEC", DEFAULT_TORCH_SPEC)
    try:
        python = ensure_venv(args.venv.resolve(), [p.resolve() for p in args.requirements], torch_spec)
    except subprocess.CalledProcessError as err:
        print(f"error: installing the requirements failed (exit {err.returncode}) while running: "
              f"{' '.join(err.cmd)}\nCheck the network or the package index settings and run the command again.",
              file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
