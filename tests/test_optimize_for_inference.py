"""optimize_for_inference.py: every block linear layer quantised, outputs close, the folder loads back, the
perplexity gate refuses (and writes nothing), pruning hits its target, user errors exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import TINY_TEST_CONFIG, run_script
from src.model.theta_model import QUANTIZED_MARKER, ThetaModel
from src.training import optimize_for_inference as opt
from src.utils.common import run_entry_point

N_BLOCK_LAYERS = 4 * TINY_TEST_CONFIG["n_layer"]  # attention qkv + out, MLP in + out


def _ids(tm: ThetaModel) -> torch.Tensor:
    return torch.tensor([tm.tokenizer("Question: What is a firewall and why does it matter?\nAnswer:")["input_ids"]])


def test_conv1d_to_linear_is_exact(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    x = _ids(tm)
    with torch.no_grad():
        ref = tm.model.eval()(x).logits
        assert opt.conv1d_to_linear(tm.model.transformer.h) == N_BLOCK_LAYERS
        assert not any(isinstance(m, Conv1D) for m in tm.model.modules())
        assert torch.allclose(tm.model(x).logits, ref, atol=1e-5)


def test_int8_quantises_every_block_linear_and_stays_close(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    x = _ids(tm)
    with torch.no_grad():
        ref = tm.model.eval()(x).logits  # (1, T, V)
        assert opt.quantize_blocks_int8(tm.model) == N_BLOCK_LAYERS
        out = tm.model(x).logits
    blocks = list(tm.model.transformer.h.modules())
    assert sum(opt._is_quantized_linear(m) for m in blocks) == N_BLOCK_LAYERS
    assert not any(type(m) in (nn.Linear, Conv1D) for m in blocks)  # nothing left in float
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, f"relative logit error {rel:.4f}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_prune_reaches_target_sparsity(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    sparsity = opt.prune_blocks(tm.model, 0.5)
    assert sparsity == pytest.approx(0.5, abs=0.01)
    for _, layer in opt.block_linear_layers(tm.model):
        assert not hasattr(layer, "weight_orig")  # made permanent, saves as a plain weight
    assert (tm.model.transformer.wte.weight != 0).all()  # embeddings untouched


def _args(model_dir, out, test_set, *extra):
    return ["--model_path", str(model_dir), "--output_path", str(out), "--test_data", str(test_set),
            "--max_new_tokens", "4", "--repeats", "1", "--max_eval_records", "6", *extra]


def test_int8_folder_round_trip_and_chat_loads_it(tmp_path, tiny_model_dir, prepared_data):
    out = tmp_path / "theta_inference"
    test_set = prepared_data.parent / "test_set.json"
    assert opt.main(_args(tiny_model_dir, out, test_set, "--quantize", "int8")) == 0
    m = json.loads((out / "optimization_metrics.json").read_text())
    assert m["quantize"] == "int8" and m["quantized_layers"] == N_BLOCK_LAYERS
    assert m["size_bytes"]["after"] < m["size_bytes"]["before"]
    for side in ("before", "after"):
        assert m["generation"][side]["tokens_per_sec"] > 0 and m["generation"][side]["new_tokens"] == 3 * 4
        assert m["perplexity"][side]["perplexity"] > 1
    assert abs(m["perplexity"]["relative_change"]) < 0.05
    assert (out / QUANTIZED_MARKER).is_file() and not (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".theta_inference.*"))  # no staging folder left

    loaded = ThetaModel.load(out, device="cpu")
    assert sum(opt._is_quantized_linear(m) for m in loaded.model.modules()) == N_BLOCK_LAYERS
    original = ThetaModel.load(tiny_model_dir, device="cpu")
    x = _ids(original)
    with torch.no_grad():
        ref, got = original.model.eval()(x).logits, loaded.model(x).logits
    assert (got - ref).norm() / ref.norm() < 0.05

    chat = run_script(["-m", "src.model.theta_model", "generate", "--model_path", str(out), "--prompt",
                       "What is DNS?", "--max_length", "5", "--seed", "0"])
    assert chat.returncode == 0, chat.stderr
    assert "tokens/s]" in chat.stdout


def test_worse_perplexity_is_refused_unless_forced(tmp_path, tiny_model_dir, prepared_data, monkeypatch, capsys):
    calls = iter([10.0, 12.0, 10.0, 12.0])  # before, after: +20%

    def fake_perplexity(tm, records, batch_size, max_length):
        return {"perplexity": next(calls), "loss": 0.0, "token_accuracy": 0.0, "answer_tokens": 1}

    monkeypatch.setattr(opt, "measure_perplexity", fake_perplexity)
    out = tmp_path / "theta_inference"
    test_set = prepared_data.parent / "test_set.json"
    args = _args(tiny_model_dir, out, test_set, "--max_perplexity_increase", "0.1")
    assert run_entry_point(opt.main, args) == 2
    err = capsys.readouterr().err
    assert "error: perplexity got worse by 20.0%" in err and "--force" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no staging left

    assert run_entry_point(opt.main, args + ["--force"]) == 0
    m = json.loads((out / "optimization_metrics.json").read_text())
    assert m["forced"] and m["perplexity"]["relative_change"] == pytest.approx(0.2)
    assert (out / "model.safetensors").is_file()  # --quantize none: a plain Hugging Face folder


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int8", "--dtype", "fp16"], "--quantize int8 needs --dtype fp32"),
    (["--prune_sparsity", "1.5"], "--prune_sparsity must be in [0, 1)"),
    (["--quantize", "int4"], "invalid choice: 'int4'"),
])
def test_bad_flags_exit_2(tiny_model_dir, flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        opt.parse_args(["--model_path", str(tiny_model_dir), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path):
    proc = run_script(["src/training/optimize_for_inference.py", "--model_path", str(tmp_path / "nope")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: model folder not found")
    assert "Traceback" not in proc.stderr
