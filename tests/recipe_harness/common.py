"""Helpers of the recipe tests (test_recipe_matrix.py, test_recipe_regressions.py, test_multinode.py).

They drive training only through its public surface: ``train(parse_args([...]))``, the command line and the run
folder (``theta_final/``, ``loss_history.json``, ``metrics.jsonl``, ``training_config.json``).

- ``write_matrix_data``: a prepared data file of 40 training and 8 validation records whose every epoch pool
  (the curriculum's 70/80/90/100 % included) splits into whole global batches of 4, so one process and two DDP
  ranks see the same records per step (DDP drops an uneven tail; one process does not).
- ``write_warm_start``: a model folder whose weights differ from the base model's.
- ``final_weights``, ``max_difference``: theta_final/ read back with safetensors, compared.
- ``CONFIGS`` and ``argv_for``: the interaction matrix's configurations (every technique alone, each profile's
  full set) as command lines on the tiny fixtures.
- ``shared_env`` and ``shared_ddp_matrix``: the models, data and the one torchrun launch of ``ddp_matrix.py`` over
  every configuration, built once per test session however many test modules ask for them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import TINY_TEST_CONFIG

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().parent / "ddp_matrix.py"
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

# --- the matrix's configurations -------------------------------------------------------------------------------

# One configuration per technique: its switch and settings strong enough to change the weights.
TECHNIQUE_FLAGS: dict[str, list[str]] = {
    "ema": ["--use_ema", "--ema_decay", "0.8", "--ema_warmup_epochs", "1"],
    "label_smoothing": ["--use_label_smoothing", "--label_smoothing_epsilon", "0.1"],
    "quality_weighting": ["--use_quality_weighting", "--quality_weighting_floor", "0.2"],
    "rdrop": ["--use_rdrop", "--rdrop_alpha", "0.5"],
    "llrd": ["--use_llrd", "--llrd_factor", "0.7"],
    "gradient_noise": ["--use_gradient_noise", "--gradient_noise_eta", "1e-6"],
    "cpu_offload": ["--use_cpu_offload", "--cpu_offload_fraction", "0.5"],
    "code_contrastive": ["--use_code_contrastive", "--code_contrastive_weight", "0.5"],
    "curriculum": ["--use_curriculum", "--curriculum_start_fraction", "0.7"],
    "dynamic_curriculum": ["--use_dynamic_curriculum", "--dynamic_curriculum_warmup", "1",
                           "--dynamic_curriculum_momentum", "0.5"],
    "domain_stratified": ["--use_domain_stratified"],
}
PROFILE_FLAGS = {"profile_quick": ["--profile", "quick"], "profile_rtx3060": ["--profile", "rtx3060"]}
CONFIGS = {**{name: [*flags, "--learning_rate", "3e-3"] for name, flags in TECHNIQUE_FLAGS.items()},
           **PROFILE_FLAGS}
# rtx3060's tracker stays uniform for 3 epochs; 5 epochs also keep every curriculum pool (70/80/90/100 % of 40)
# a multiple of the global batch of 4, so DDP and one process see the same records (see write_matrix_data).
EPOCHS = {"profile_rtx3060": 5}
# DDP and micro-batch comparisons: no SGD flag exists, and Adam turns summation-order noise of near-zero
# gradients into weight differences of up to about the learning rate per step (test_recipe_matrix.py says more).
SMALL_LR = "1e-3"


def argv_for(env: dict, config: str, out: Path, model: str = "dropout", *extra: str) -> list[str]:
    """The configuration's flags, then the tiny overrides (explicit flags win over a profile's values)."""
    return [*CONFIGS[config], "--model_name", str(env[model]), "--data_path", str(env["data"]),
            "--datasets_dir", str(env["datasets"]), "--output_dir", str(out),
            "--epochs", str(EPOCHS.get(config, 2)), "--batch_size", "4", "--max_length", "64",
            "--num_samples", "0", "--domain_eval_frequency", "0", "--seed", "3", "--device", "cpu",
            "--no_progress_bar", *extra]


def one_torch_thread():
    """Generator for a fixture: torch on one intra-op thread while the module runs, then as it was.

    The tiny model's operations are too small to share between threads: measured on the 2-core machine while
    other jobs ran, one run took 17 s on torch's default 2 threads and 1.2 s on one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parse(argv: list[str], needs: str = ""):
    """``parse_args``, its argparse exit turned into a test failure that says which contract piece is missing."""
    import pytest

    import src.training.train_enhanced as te

    try:
        return te.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"parse_args refused the flags (exit {err.code}){': ' + needs if needs else ''}")


# --- data and models -------------------------------------------------------------------------------------------

def write_matrix_data(prepared_data: Path, records: list[dict], dest: Path, difficulty=None) -> Path:
    """A prepared file in the format of ``prepared_data`` holding ``records`` (the 48 tiny ones), split 40 / 8.

    Every sixth record is validation (2, 3 and 3 per domain). Difficulties cycle 1-3 and quality scores spread
    over 0.3-1.0, so the curriculum and quality weighting have something to act on; ``difficulty(i, record)``
    overrides the difficulty. Fields preparation wrote for a record (sample_weight, has_code, ...) are kept.
    """
    prepared = json.loads(Path(prepared_data).read_text(encoding="utf-8"))
    by_id = {r.get("id"): r for r in prepared["records"]}
    out_records = []
    for i, rec in enumerate(records):
        base = dict(by_id.get(rec["id"], rec))
        base.update(question=rec["question"], answer=rec["answer"], domain=rec["domain"], id=rec["id"])
        base["split"] = "validation" if i % 6 == 5 else "train"
        base["difficulty"] = difficulty(i, rec) if difficulty else 1 + i % 3
        base["quality_score"] = round(0.3 + 0.7 * ((i * 5) % 8) / 7, 4)
        base["has_code"] = "```" in rec["answer"]
        out_records.append(base)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({**prepared, "records": out_records}, indent=1), encoding="utf-8")
    return dest


def write_warm_start(model_dir: Path, dest: Path, scale: float = 0.05, seed: int = 11) -> Path:
    """A copy of ``model_dir`` with every parameter moved by ``scale`` x N(0, 1) (the tied embedding once)."""
    from transformers import GPT2LMHeadModel

    shutil.copytree(model_dir, dest)
    model = GPT2LMHeadModel.from_pretrained(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(dest))
    return dest


def final_weights(run: Path, folder: str = "theta_final") -> dict[str, torch.Tensor]:
    """The model of a run folder, every parameter by name, the LM head included (tied to the embedding or not)."""
    from transformers import GPT2LMHeadModel

    path = Path(run) / folder
    assert (path / "config.json").is_file(), f"{path} is missing: the run did not finish with a saved model"
    model = GPT2LMHeadModel.from_pretrained(str(path))
    return {name: t.detach().clone() for name, t in model.state_dict().items() if not name.endswith(".attn.bias")}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest absolute element difference over the shared names, and the name where it is."""
    assert set(a) == set(b), f"different parameter names: {sorted(set(a) ^ set(b))[:5]}"
    worst, where = 0.0, ""
    for name in a:
        d = float((a[name].double() - b[name].double()).abs().max())
        if d > worst or not where:
            worst, where = d, name
    return worst, where


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (empty when every one is)."""
    assert set(a) == set(b), f"different parameter names: {sorted(set(a) ^ set(b))[:5]}"
    return [name for name in sorted(a) if not torch.equal(a[name], b[name])]


def history(run: Path) -> list[dict]:
    return json.loads((Path(run) / "loss_history.json").read_text(encoding="utf-8"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]


# --- launches --------------------------------------------------------------------------------------------------

def write_spec(path: Path, runs: dict[str, list[str]]) -> Path:
    path.write_text(json.dumps({"runs": [{"name": n, "argv": argv} for n, argv in runs.items()]}, indent=1),
                    encoding="utf-8")
    return path


def harness_result(run: Path, rank: int) -> dict:
    path = Path(run) / f"harness_rank{rank}.json"
    assert path.is_file(), f"rank {rank} left no {path.name} in {run}: the launch died before this run"
    return json.loads(path.read_text(encoding="utf-8"))


def harness_weights(run: Path, rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(run) / f"harness_rank{rank}.safetensors"
    assert path.is_file(), f"rank {rank} left no {path.name}: no module was wrapped in DistributedDataParallel"
    return load_file(str(path))


# --- built once per session ------------------------------------------------------------------------------------

_SESSION: dict[str, dict] = {}


def shared_env(tmp_path_factory, tiny_model_dir: Path, tiny_datasets_dir: Path, prepared_data: Path,
               tiny_records: list[dict]) -> dict:
    """Models (dropout on = conftest's, dropout off, a warm-start folder) and the 40 + 8 record data file."""
    if "env" not in _SESSION:
        from src.model.theta_model import build_tiny_model

        root = tmp_path_factory.mktemp("recipe_matrix")
        _SESSION["env"] = {
            "root": root, "dropout": tiny_model_dir, "datasets": tiny_datasets_dir,
            "nodrop": build_tiny_model(root / "nodrop", tiny_datasets_dir, **TINY_TEST_CONFIG, **NO_DROPOUT),
            "warm": write_warm_start(tiny_model_dir, root / "warm"),
            "data": write_matrix_data(prepared_data, tiny_records, root / "data" / "enhanced_training_data.json")}
    return _SESSION["env"]


def shared_ddp_matrix(env: dict) -> dict:
    """Every configuration under one ``torchrun --nproc_per_node 2`` launch (per-rank batch 2, no dropout, the
    small learning rate), and the one-process references at batch 4 run in this process meanwhile.

    Returns ``{"root", "returncode", "output", "single"}``; run ``c`` of DDP is in ``root/ddp/c`` (with the
    harness's per-rank files), its reference in ``root/single/c`` and its summary in ``single[c]``.
    """
    if "ddp" in _SESSION:
        return _SESSION["ddp"]
    import src.training.train_enhanced as te

    root = env["root"] / "ddp_matrix"
    runs = {name: argv_for(env, name, root / "ddp" / name, "nodrop", "--batch_size", "2", "--learning_rate",
                           SMALL_LR) for name in CONFIGS}
    spec = write_spec(env["root"] / "ddp_spec.json", runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HARNESS),
           str(spec)]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **QUIET_ENV})
    single = {}
    try:
        for name in CONFIGS:
            try:
                single[name] = te.train(te.parse_args(argv_for(env, name, root / "single" / name, "nodrop",
                                                               "--learning_rate", SMALL_LR)))
            except Exception as err:  # reported by the configuration's own test
                single[name] = {"error": f"{type(err).__name__}: {err}"}
        output, _ = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _SESSION["ddp"] = {"root": root, "returncode": proc.returncode, "output": output, "single": single}
    return _SESSION["ddp"]
