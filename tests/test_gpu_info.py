"""gpu_info: nvidia-smi parsing from recorded outputs, the best-GPU choice, and the fallbacks that never raise.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_gpu_info.py -q
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from src.utils import gpu_info

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"


def read(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def fake_nvidia_smi(tmp_path: Path, output: str, exit_code: int = 0, sleep: float = 0.0) -> str:
    """An executable that records its arguments and prints ``output``, like a driver would."""
    script = tmp_path / "nvidia-smi"
    (tmp_path / "out.txt").write_text(output, encoding="utf-8")
    script.write_text(f"#!{sys.executable}\nimport sys, time, pathlib\n"
                      f"pathlib.Path({str(tmp_path / 'args.txt')!r}).write_text(' '.join(sys.argv[1:]))\n"
                      f"time.sleep({sleep})\n"
                      f"sys.stdout.write(pathlib.Path({str(tmp_path / 'out.txt')!r}).read_text())\n"
                      f"sys.exit({exit_code})\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_parse_one_gpu():
    (gpu,) = gpu_info.parse_nvidia_smi_csv(read("one_gpu.csv"))
    assert gpu == {"index": 0, "name": "NVIDIA GeForce RTX 3060", "temperature_c": 64, "memory_used_mb": 3120,
                   "memory_total_mb": 12288, "utilization_pct": 97, "power_w": 160.53, "power_limit_w": 170,
                   "memory_free_mb": 9168}


def test_parse_several_and_pick_most_free_memory():
    gpus = gpu_info.parse_nvidia_smi_csv(read("several_gpus.csv"))
    assert [g["index"] for g in gpus] == [0, 1, 2]
    assert gpu_info.pick_best_gpu(gpus)["name"] == "Tesla T4"  # 14860 MiB free beats 11264 and 4096


def test_na_fields_become_none():
    gpus = gpu_info.parse_nvidia_smi_csv(read("na_fields.csv"))
    assert gpus[0]["temperature_c"] is None and gpus[0]["power_w"] is None and gpus[0]["utilization_pct"] is None
    assert gpus[0]["memory_free_mb"] == 4096
    assert gpus[1]["memory_used_mb"] is None and gpus[1]["memory_free_mb"] is None
    # Unknown free memory counts as none free: the laptop GPU with 4 GB known free wins.
    assert gpu_info.pick_best_gpu(gpus)["index"] == 0


@pytest.mark.parametrize("name", ["garbage.txt", "garbage_mismatch.txt"])
def test_garbage_gives_no_gpus(name):
    assert gpu_info.parse_nvidia_smi_csv(read(name)) == []


def test_name_with_commas_is_kept_whole():
    (gpu,) = gpu_info.parse_nvidia_smi_csv("3, Quadro RTX 8000, Rev A, 50, 10, 100, 1, 20.5, 260\n")
    assert gpu["index"] == 3 and gpu["name"] == "Quadro RTX 8000, Rev A" and gpu["power_limit_w"] == 260


def test_one_call_with_the_documented_query(tmp_path):
    exe = fake_nvidia_smi(tmp_path, read("several_gpus.csv"))
    info = gpu_info.get_best_gpu_info(nvidia_smi=exe)
    args = (tmp_path / "args.txt").read_text()
    assert args.startswith("--query-gpu=index,name,temperature.gpu,memory.used,memory.total,utilization.gpu,")
    assert args.endswith("--format=csv,noheader,nounits")
    assert info["available"] and info["source"] == "nvidia-smi" and info["gpu_count"] == 3
    assert info["index"] == 2 and "ram_total_mb" in info["system"]
    assert "Tesla T4 (best of 3)" in gpu_info.summary_line(info)


@pytest.mark.parametrize("output, code", [(read("garbage.txt"), 0), ("", 9)])
def test_failing_nvidia_smi_falls_back_to_cpu_report(tmp_path, output, code):
    exe = fake_nvidia_smi(tmp_path, output, exit_code=code)
    info = gpu_info.get_best_gpu_info(nvidia_smi=exe, import_torch=False)
    assert info["available"] is False and info["name"] == "CPU only" and info["gpu_count"] == 0
    assert info["system"]["ram_total_mb"] > 0 and info["system"]["cpu_count"] >= 1
    assert gpu_info.summary_line(info).startswith("no CUDA GPU: CPU only")


def test_hung_nvidia_smi_times_out(tmp_path, monkeypatch):
    exe = fake_nvidia_smi(tmp_path, read("one_gpu.csv"), sleep=30)
    assert gpu_info.query_nvidia_smi(exe, timeout=0.5) is None


def test_missing_executable_and_no_torch(monkeypatch):
    monkeypatch.setenv("PATH", "")
    if not os.path.exists("/usr/lib/wsl/lib/nvidia-smi"):
        assert gpu_info.find_nvidia_smi() is None
    info = gpu_info.get_best_gpu_info(nvidia_smi="/nonexistent/nvidia-smi", import_torch=False)
    assert info["available"] is False


def test_torch_fallback_on_this_machine_reports_no_cuda():
    # CPU-only torch: the fallback answers None instead of raising.
    assert gpu_info.query_torch_cuda(import_torch=True) is None


def test_windows_driver_folder_is_searched(tmp_path, monkeypatch):
    nvsmi = tmp_path / "NVIDIA Corporation" / "NVSMI"
    nvsmi.mkdir(parents=True)
    (nvsmi / "nvidia-smi.exe").write_text("")
    monkeypatch.setattr(gpu_info, "_IS_WINDOWS", True)
    monkeypatch.setattr(gpu_info.shutil, "which", lambda name: None)
    monkeypatch.setenv("ProgramW6432", str(tmp_path))
    assert gpu_info.find_nvidia_smi() == str(nvsmi / "nvidia-smi.exe")


def test_never_raises_even_when_everything_breaks(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(gpu_info, "query_nvidia_smi", boom)
    assert gpu_info.get_best_gpu_info()["available"] is False


def test_cli_prints_json_and_summary(capsys):
    assert gpu_info.main([]) == 0
    assert '"source"' in capsys.readouterr().out
    assert gpu_info.main(["--summary"]) == 0
    assert capsys.readouterr().out.strip()
