"""GPU and system figures for logs and emails: one ``nvidia-smi`` call, then ``torch.cuda``, then a CPU-only report.

Every function returns plain dicts and never raises: a missing driver, a hung ``nvidia-smi``, ``N/A`` fields or
garbage output all end in a smaller report, not an exception. Callers log or email the dicts.

    python -m src.utils.gpu_info              # JSON: every GPU, the best one, CPU and RAM
    python -m src.utils.gpu_info --summary    # one line, as the overnight banner shows it

    from src.utils.gpu_info import get_best_gpu_info
    info = get_best_gpu_info()   # {"available": True, "name": "NVIDIA GeForce RTX 3060", "memory_free_mb": ...}

"Best" is the GPU with the most free memory (ties: the lower index). ``nvidia-smi`` is looked up on PATH and, on
Windows, in the driver's usual folders, because the Windows driver does not always put it on PATH.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The query and the key each column lands in, in order. Units come from --format=csv,nounits:
# temperature in C, memory in MiB, utilisation in %, power in W.
QUERY_FIELDS: list[tuple[str, str]] = [
    ("index", "index"),
    ("name", "name"),
    ("temperature.gpu", "temperature_c"),
    ("memory.used", "memory_used_mb"),
    ("memory.total", "memory_total_mb"),
    ("utilization.gpu", "utilization_pct"),
    ("power.draw", "power_w"),
    ("power.limit", "power_limit_w"),
]
NVIDIA_SMI_TIMEOUT_S = 10.0
_IS_WINDOWS = os.name == "nt"
# What nvidia-smi prints for a field a card or driver does not report.
_MISSING = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]", "unknown error",
            "[insufficient permissions]", "[gpu is lost]", "err!"}


def nvidia_smi_command() -> list[str]:
    """The ``nvidia-smi`` argument list that queries every GPU in one call."""
    return ["--query-gpu=" + ",".join(q for q, _ in QUERY_FIELDS), "--format=csv,noheader,nounits"]


def find_nvidia_smi() -> str | None:
    """Path of ``nvidia-smi``: PATH first, then the usual driver folders (Windows, WSL). None when absent."""
    found = shutil.which("nvidia-smi")
    if found:
        return found
    candidates = []
    if _IS_WINDOWS:
        for var, sub in (("ProgramW6432", ("NVIDIA Corporation", "NVSMI")),
                         ("ProgramFiles", ("NVIDIA Corporation", "NVSMI")), ("SystemRoot", ("System32",))):
            base = os.environ.get(var)
            if base:
                candidates.append(Path(base, *sub, "nvidia-smi.exe"))
    else:
        candidates.append(Path("/usr/lib/wsl/lib/nvidia-smi"))
    for path in candidates:
        if path.is_file():
            return str(path)
    return None


def _number(text: str) -> float | int | None:
    value = text.strip()
    if value.lower() in _MISSING:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else number


def parse_nvidia_smi_csv(text: str) -> list[dict[str, Any]]:
    """Parse ``--format=csv,noheader,nounits`` output of :data:`QUERY_FIELDS`; lines that do not fit are skipped.

    ``N/A`` and ``[Not Supported]`` become None. ``memory_free_mb`` is added where used and total are known.
    GPU names may contain commas, so the name is whatever lies between the index and the last six fields.
    """
    gpus = []
    n_tail = len(QUERY_FIELDS) - 2
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < len(QUERY_FIELDS):
            if line.strip():
                logger.debug("nvidia-smi: skipping line %r (expected %d fields)", line, len(QUERY_FIELDS))
            continue
        index = _number(parts[0])
        if not isinstance(index, int):
            logger.debug("nvidia-smi: skipping line %r (no GPU index)", line)
            continue
        gpu: dict[str, Any] = {"index": index, "name": ", ".join(parts[1:len(parts) - n_tail]) or "unknown GPU"}
        for (_, key), raw in zip(QUERY_FIELDS[2:], parts[len(parts) - n_tail:]):
            gpu[key] = _number(raw)
        if gpu["memory_used_mb"] is not None and gpu["memory_total_mb"] is not None:
            gpu["memory_free_mb"] = max(0, gpu["memory_total_mb"] - gpu["memory_used_mb"])
        else:
            gpu["memory_free_mb"] = None
        gpus.append(gpu)
    return gpus


def query_nvidia_smi(executable: str | None = None, timeout: float = NVIDIA_SMI_TIMEOUT_S) -> list[dict] | None:
    """Every GPU from one ``nvidia-smi`` call; None when it is absent, fails, hangs or prints nothing usable."""
    executable = executable or find_nvidia_smi()
    if not executable:
        return None
    try:
        proc = subprocess.run([executable, *nvidia_smi_command()], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        logger.debug("nvidia-smi failed: %s", err)
        return None
    if proc.returncode != 0:
        logger.debug("nvidia-smi exit %d: %s", proc.returncode, proc.stderr.strip()[:200])
        return None
    return parse_nvidia_smi_csv(proc.stdout) or None


def query_torch_cuda(import_torch: bool | None = None) -> list[dict] | None:
    """GPUs as ``torch.cuda`` sees them (name and memory only); None without CUDA.

    ``import_torch=None`` uses torch only when the process already imported it: importing torch costs seconds,
    too much for a notification command on a machine that has no GPU anyway.
    """
    if import_torch is None:
        import_torch = "torch" in sys.modules
    if not import_torch:
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        gpus = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "temperature_c": None,
                         "memory_used_mb": round((total - free) / 2**20), "memory_total_mb": round(total / 2**20),
                         "memory_free_mb": round(free / 2**20), "utilization_pct": None, "power_w": None,
                         "power_limit_w": None})
        return gpus or None
    except Exception as err:  # a broken driver raises all sorts of things
        logger.debug("torch.cuda query failed: %s", err)
        return None


def get_system_info() -> dict[str, Any]:
    """CPU and RAM figures from psutil; fields it cannot read are None."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpu_percent": None, "ram_used_mb": None,
                            "ram_total_mb": None, "ram_percent": None}
    try:
        import psutil

        info["cpu_percent"] = psutil.cpu_percent(interval=0.1)
        mem = psutil.virtual_memory()
        info.update(ram_used_mb=round((mem.total - mem.available) / 2**20), ram_total_mb=round(mem.total / 2**20),
                    ram_percent=mem.percent)
    except Exception as err:
        logger.debug("psutil failed: %s", err)
    return info


def get_gpu_info(nvidia_smi: str | None = None, import_torch: bool | None = None) -> dict[str, Any]:
    """``{"source": "nvidia-smi"|"torch"|"none", "gpus": [...], "system": {...}}``; never raises."""
    try:
        gpus = query_nvidia_smi(nvidia_smi)
        source = "nvidia-smi"
        if gpus is None:
            gpus, source = query_torch_cuda(import_torch), "torch"
        if gpus is None:
            gpus, source = [], "none"
        return {"source": source, "gpus": gpus, "system": get_system_info()}
    except Exception as err:  # belt and braces: this runs inside training and email threads
        logger.debug("gpu info failed: %s", err)
        return {"source": "none", "gpus": [], "system": {}}


def pick_best_gpu(gpus: list[dict]) -> dict | None:
    """The GPU with the most free memory (unknown free memory counts as 0; ties go to the lower index)."""
    if not gpus:
        return None
    return max(gpus, key=lambda g: (g.get("memory_free_mb") or 0, -g.get("index", 0)))


def get_best_gpu_info(nvidia_smi: str | None = None, import_torch: bool | None = None) -> dict[str, Any]:
    """The best GPU's figures plus ``available``, ``source``, ``gpu_count`` and ``system``; a CPU-only report
    (``available: False``, ``name: "CPU only"``) when there is no GPU. Never raises."""
    info = get_gpu_info(nvidia_smi, import_torch)
    best = pick_best_gpu(info["gpus"])
    if best is None:
        return {"available": False, "source": "cpu", "name": "CPU only", "gpu_count": 0, "system": info["system"]}
    return {"available": True, "source": info["source"], "gpu_count": len(info["gpus"]), **best,
            "system": info["system"]}


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, (int, float)) else f"{value}{unit}"


def summary_line(info: dict[str, Any] | None = None) -> str:
    """One human line: ``GPU 0 NVIDIA ..., 3.1/12.0 GB, 64 C, 97% busy, 160 W`` or the CPU/RAM figures."""
    info = info if info is not None else get_best_gpu_info()
    system = info.get("system") or {}
    if not info.get("available"):
        ram = system.get("ram_total_mb")
        return (f"no CUDA GPU: CPU only ({_fmt(system.get('cpu_count'))} cores, "
                f"RAM {_fmt(ram and ram / 1024, ' GB', 1)})")
    used, total = info.get("memory_used_mb"), info.get("memory_total_mb")
    mem = f"{_fmt(used and used / 1024, '', 1)}/{_fmt(total and total / 1024, ' GB', 1)}"
    more = f" (best of {info['gpu_count']})" if info.get("gpu_count", 1) > 1 else ""
    # No | < > & in this line: the Windows script echoes it.
    return (f"GPU {info.get('index')} {info.get('name')}{more}, {mem}, {_fmt(info.get('temperature_c'), ' C')}, "
            f"{_fmt(info.get('utilization_pct'), '%')} busy, {_fmt(info.get('power_w'), ' W')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description="Print GPU, CPU and RAM figures (never fails).")
    p.add_argument("--summary", action="store_true", help="one line instead of JSON")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=False,
                   help="ask torch.cuda when nvidia-smi gives nothing (imports torch: a few seconds)")
    args = p.parse_args(argv)
    if args.summary:
        print(summary_line(get_best_gpu_info(import_torch=args.torch)))
    else:
        info = get_gpu_info(import_torch=args.torch)
        info["best"] = pick_best_gpu(info["gpus"])
        print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
