"""One end-to-end run of the quick pipeline's four steps, each as its own script, on the tiny fixtures."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_script
from src.model.theta_model import ThetaModel


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path, tiny_datasets_dir, tiny_model_dir):
    data = tmp_path / "Datasets"
    shutil.copytree(tiny_datasets_dir, data)
    run = tmp_path / "models" / "theta_enhanced_20260101_000000"

    prep = run_script(["src/data_processing/prepare_data_for_training.py", "--datasets_dir", str(data),
                       "--min_domain_count", "0", "--synthetic_ratio", "0",
                       "--validation_fraction", "0.2", "--seed", "1"])
    assert prep.returncode == 0, prep.stderr
    assert (data / "enhanced_training_data.json").exists() and (data / "enhanced_test_set.json").exists()

    train = run_script(["-m", "src.training.train_enhanced", "--profile", "quick", "--model_name", str(tiny_model_dir),
                        "--data_path", str(data / "enhanced_training_data.json"), "--datasets_dir", str(data),
                        "--output_dir", str(run), "--epochs", "3", "--batch_size", "4",
                        "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--max_length", "128"])
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    for name in ("theta_final", "theta_best", "training_config.json", "loss_history.json", "metrics.jsonl",
                 "tensorboard", "train.log", "checkpoints"):
        assert (run / name).exists(), name
    history = json.loads((run / "loss_history.json").read_text())
    assert len(history) == 3
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # it learns
    config = json.loads((run / "training_config.json").read_text())
    assert config["status"] == "completed" and config["summary"]["best_epoch"] >= 1
    assert "\x1b[" not in (run / "train.log").read_text()  # no colour codes in the log file

    stats = tmp_path / "stats" / f"evaluation_{run.name}.json"
    ev = run_script(["-m", "src.training.evaluate_model", "--model_path", str(run / "theta_final"),
                     "--test_data", str(data / "enhanced_test_set.json"), "--output_file", str(stats), "--num_samples", "2"])
    assert ev.returncode == 0, ev.stderr
    result = json.loads(stats.read_text())
    assert result["perplexity"] > 1 and result["test_records"] >= 1

    opt = run_script(["src/training/optimize_for_inference.py", "--model_path", str(run / "theta_final"),
                      "--output_path", str(run / "theta_inference")])
    assert opt.returncode == 0, opt.stderr
    assert (run / "theta_inference" / "optimization_metrics.json").exists()

    AutoModelForCausalLM.from_pretrained(run / "theta_final")
    AutoTokenizer.from_pretrained(run / "theta_final")
    answer = ThetaModel.load(run / "theta_final", device="cpu").generate("What is a firewall?", max_length=16, seed=0)
    assert isinstance(answer, str)
    assert isinstance(ThetaModel.load(run / "theta_inference", device="cpu").generate("What is DNS?", max_length=8),
                      str)
