"""LoRA and QLoRA (src/model/adapters.py and the trainer's --peft): the adapters train, their folder loads on the
base with peft and matches the merged model, the base's other weights stay as they were, resume is bit-identical,
the accumulation split matches, DDP ranks stay identical, every technique runs with adapters, and one --peft lora
run goes through every step of the overnight chain.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_adapters.py

Oracles: ``PeftModel.from_pretrained`` on the base (peft's own loading, not ours); the base folder's own weights;
an uninterrupted run; the gradient of one whole batch.

The trainer-level tests run on theta-tiny (GPT-2) and, for the tiny Llama and Qwen2 of tests/model_families.py,
``test_lora_on_other_families_resumes_and_merges`` (untied and tied heads, LLRD and R-Drop on the adapters); the
tests of src/model/adapters.py alone load every family with the Auto classes.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import src.training.train_enhanced as te
from recipe_harness.fixtures import one_thread  # noqa: F401 (pytest fixture)
from src.model import adapters
from src.utils.common import UserError

ADAPTER_FAMILIES = ("gpt2",)  # the `runs` fixture's family (theta-tiny); other families: their own test below


def _argv(model: Path, data: Path, datasets: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name", str(model), "--data_path", str(data), "--datasets_dir", str(datasets),
            "--output_dir", str(out), "--batch_size", "4", "--learning_rate", "3e-3", "--max_length", "48",
            "--num_samples", "0", "--domain_eval_frequency", "0", "--seed", "3", "--device", "cpu",
            "--no_progress_bar", "--epochs", "1", "--lora_r", "4", "--lora_alpha", "8", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, prepared_data, tiny_datasets_dir):
    """One --peft lora run, the same stopped after step 3 and resumed, and one --peft qlora run."""
    root = tmp_path_factory.mktemp("adapter_runs")

    def argv(name, *extra):
        return te.parse_args(_argv(tiny_model_dir, prepared_data, tiny_datasets_dir, root / name, *extra))

    out = {"root": root, "base": tiny_model_dir}
    out["lora"] = te.train(argv("lora", "--peft", "lora"))
    out["stopped"] = te.train(argv("resumed", "--peft", "lora", "--stop_after_step", "3"))
    out["resumed"] = te.train(argv("resumed", "--peft", "lora"))
    out["qlora"] = te.train(argv("qlora", "--peft", "qlora", "--gradient_checkpointing"))
    return out


# --- src/model/adapters.py on every family ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "phi3"])
def test_targets_are_the_decoder_linears_and_the_merge_matches_peft(family, family_dirs):
    base = AutoModelForCausalLM.from_pretrained(family_dirs[family])
    names = adapters.decoder_linear_names(base)
    head = base.get_output_embeddings()
    assert names and all(n != "lm_head" for n in names)
    peft_model = adapters.wrap_with_adapters(base, adapters.adapter_config(base, r=4, alpha=8, dropout=0.0))
    assert head.weight.requires_grad is False  # the head is frozen, never an adapter
    with torch.no_grad():  # adapters that do something (B starts at zero)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randint(0, base.config.vocab_size, (2, 9))
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
        merged = adapters.merge_adapter(AutoModelForCausalLM.from_pretrained(family_dirs[family]), peft_model)
        assert (merged(input_ids=x).logits - want).abs().max() < 1e-4
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_qlora_base_is_4bit_and_trains_on_the_cpu(family_dirs):
    import bitsandbytes as bnb

    base = adapters.load_4bit(family_dirs["llama"], torch.device("cpu"))
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = adapters.wrap_with_adapters(base, adapters.adapter_config(base, r=4, alpha=8), True, quantized=True)
    x = torch.randint(0, base.config.vocab_size, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_without_bitsandbytes_names_the_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UserError, match=r"pip install -r requirements-qlora\.txt"):
        adapters.require_bitsandbytes()


def test_an_added_token_that_is_a_target_gets_a_trained_row(family_dirs):
    base = AutoModelForCausalLM.from_pretrained(family_dirs["llama"])  # untied head: both rows train
    vocab = base.config.vocab_size
    base.resize_token_embeddings(vocab + 1, mean_resizing=False)
    assert adapters.added_target_tokens(vocab, vocab + 1, [3, vocab, 5]) == [vocab]
    assert adapters.added_target_tokens(vocab, vocab + 1, [3, 5]) == []  # an added pad is no target
    model = adapters.wrap_with_adapters(base, adapters.adapter_config(base, 4, 8, 0.0, trainable_tokens=[vocab]))
    x = torch.tensor([[1, 2, vocab, 3, vocab]])
    model(input_ids=x, labels=x).loss.backward()
    deltas = [(n, p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in deltas)


def test_unknown_lora_target_is_a_user_error(family_dirs):
    base = AutoModelForCausalLM.from_pretrained(family_dirs["qwen2"])
    assert adapters.resolve_targets(base, "q_proj,v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="--lora_target lm_head: lm_head is not a linear layer"):
        adapters.resolve_targets(base, "lm_head")


# --- the trainer with --peft -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ADAPTER_FAMILIES)
def test_lora_and_qlora_train_and_write_adapter_and_merged_folders(runs, family):
    from peft import PeftModel

    for mode in ("lora", "qlora"):
        summary, run = runs[mode], runs["root"] / mode
        assert summary["exit_code"] == 0 and summary["global_step"] == 8, summary
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
        assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
        for ckpt in (run / "checkpoints").iterdir():  # adapter-sized: no base weights in them
            state = torch.load(ckpt / "state.pt", weights_only=True)
            assert all("lora_" in k for k in state["model"]), list(state["model"])[:3]
        # peft's own loading on the base gives the merged model's logits
        base = AutoModelForCausalLM.from_pretrained(runs["base"])
        loaded = PeftModel.from_pretrained(base, run / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(run / "theta_final").eval()
        x = torch.randint(0, merged.config.vocab_size, (2, 16))
        with torch.no_grad():
            assert (loaded(input_ids=x).logits - merged(input_ids=x).logits).abs().max() < 1e-4
    log = (runs["root"] / "qlora" / "train.log").read_text()
    assert "adapters: qlora r 4" in log and "base in 4-bit NF4" in log


def test_merged_model_keeps_the_base_weights_outside_the_adapted_layers(runs):
    base = load_file(str(Path(runs["base"]) / "model.safetensors"))
    merged = load_file(str(runs["root"] / "lora" / "theta_final" / "model.safetensors"))
    assert set(base) == set(merged)
    adapted = [k for k in base if k.split(".")[-2] in ("c_attn", "c_fc", "c_proj") and k.endswith("weight")]
    assert adapted and all(not torch.equal(base[k], merged[k]) for k in adapted)
    for k in set(base) - set(adapted):
        assert torch.equal(base[k], merged[k]), k


def test_resume_after_a_stop_is_bit_identical(runs):
    assert runs["stopped"]["exit_code"] == te.EXIT_INTERRUPTED and runs["stopped"]["global_step"] == 3
    assert runs["resumed"]["exit_code"] == 0
    a = load_file(str(runs["root"] / "lora" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs["root"] / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert runs["lora"]["replica_sha256"] == runs["resumed"]["replica_sha256"]


def test_accumulation_split_matches_one_batch(tiny_model_no_dropout, tiny_records):
    """The gradient of the adapters over one batch of 4 uneven records equals that of 2 micro-batches of 2."""
    from src.model.theta_model import ThetaModel
    from src.training.lm_data import TokenizedDataset, collate

    tm = ThetaModel(str(tiny_model_no_dropout), device="cpu")
    model = adapters.wrap_with_adapters(tm.model, adapters.adapter_config(tm.model, 4, 8, 0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    records = [tiny_records[0], tiny_records[1], tiny_records[17], tiny_records[30]]  # different lengths
    ds = TokenizedDataset(records, tm.tokenizer, max_length=96)
    setup, pad = te.LossSetup(), tm.tokenizer.pad_token_id

    def grads(window):
        model.zero_grad(set_to_none=True)
        te.accumulate_gradients(model, window, {"targets": setup.normaliser(window)}, setup,
                                torch.device("cpu"), nullcontext())
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = grads([collate(ds.examples, pad)])
    halves = grads([collate(ds.examples[:2], pad), collate(ds.examples[2:], pad)])
    assert set(whole) == set(halves) and all("lora_" in n for n in whole)
    for n in whole:
        assert torch.allclose(whole[n], halves[n], atol=1e-7, rtol=1e-4), n


def test_every_technique_runs_with_adapters(tmp_path, tiny_model_dir, prepared_data, tiny_datasets_dir):
    on = ["--use_ema", "--use_llrd", "--use_gradient_noise", "--use_rdrop", "--use_code_contrastive",
          "--use_label_smoothing", "--use_curriculum", "--use_domain_stratified", "--use_quality_weighting",
          "--use_dynamic_curriculum"]
    args = te.parse_args(_argv(tiny_model_dir, prepared_data, tiny_datasets_dir, tmp_path / "all", "--peft", "lora",
                               "--max_steps", "2", *on))
    run = te.start_run(args)
    te.load_data(run)
    te.setup_run(run)
    try:
        ema = next(t for t in run.techniques if t.name == "ema").ema
        assert ema.names and all("lora_" in n for n in ema.names)  # the EMA averages the adapter factors only
        trained = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
        frozen = [n for n, p in run.model.named_parameters() if id(p) in trained and not p.requires_grad]
        assert not frozen
        scales = {g["lr_scale"] for g in run.optimizer.param_groups if any("lora_" in n for n in g["names"])}
        assert len(scales) == 2  # LLRD: each adapter at its own block's rate (2 blocks)
    finally:
        te.close_outputs(run)
        te.release_all(run.out)
    summary = te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, tiny_datasets_dir, tmp_path / "b",
                                           "--peft", "lora", "--max_steps", "2", *on)))
    assert summary["exit_code"] == 0
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["kl"] > 0 and x["loss"] == x["loss"] for x in lines)  # R-Drop: LoRA dropout
    offload = te.train(te.parse_args(_argv(tiny_model_dir, prepared_data, tiny_datasets_dir, tmp_path / "c",
                                           "--peft", "lora", "--max_steps", "2", "--use_cpu_offload",
                                           "--warm_start", str(tmp_path / "b" / "adapter"))))
    assert offload["exit_code"] == 0
    assert "warm start from the adapter" in (tmp_path / "c" / "train.log").read_text()


def test_warm_start_from_a_full_model_folder_is_refused(tiny_model_dir, prepared_data, tiny_datasets_dir, tmp_path,
                                                         capsys):
    with pytest.raises(SystemExit):
        te.parse_args(_argv(tiny_model_dir, prepared_data, tiny_datasets_dir, tmp_path, "--peft", "lora",
                            "--warm_start", str(tiny_model_dir)))
    assert "it takes an adapter folder" in capsys.readouterr().err


def test_quick_profile_lora_run_goes_through_every_overnight_step(tmp_path, tiny_model_dir, prepared_data,
                                                                  tiny_datasets_dir, capsys):
    """The chain's steps in order (pre-flight, train, evaluate, optimise, chat), each through its entry point."""
    from src.model.theta_model import ThetaModel
    from src.training import evaluate_model, optimize_for_inference, preflight

    run = tmp_path / "models" / "theta_enhanced_20260101_000000"
    run.mkdir(parents=True)
    flags = ["--model_name", str(tiny_model_dir), "--datasets_dir", str(tiny_datasets_dir), "--peft", "lora",
             "--epochs", "1", "--batch_size", "4", "--max_length", "48", "--num_samples", "1", "--lora_r", "4"]
    assert preflight.main(["--profile", "quick", "--run_dir", str(run), "--data_path", str(prepared_data), "--",
                           *flags]) == 0, capsys.readouterr().out[-2000:]
    summary = te.train(te.parse_args(["--profile", "quick", *flags, "--data_path", str(prepared_data),
                                      "--output_dir", str(run), "--no_progress_bar"]))
    assert summary["exit_code"] == 0 and (run / "adapter" / "adapter_model.safetensors").is_file()
    stats = tmp_path / "stats" / f"evaluation_{run.name}.json"
    test_set = prepared_data.parent / "enhanced_test_set.json"
    assert evaluate_model.main(["--model_path", str(run / "theta_final"), "--test_data", str(test_set),
                                "--output_file", str(stats), "--num_samples", "1", "--max_new_tokens", "8",
                                "--device", "cpu"]) == 0
    assert json.loads(stats.read_text())["perplexity"] > 1
    assert optimize_for_inference.main(["--model_path", str(run / "theta_final"), "--test_data", str(test_set),
                                        "--device", "cpu", "--max_new_tokens", "4", "--repeats", "1"]) == 0
    assert (run / "theta_inference" / "optimization_metrics.json").is_file()
    for folder in ("theta_final", "theta_inference"):
        assert isinstance(ThetaModel.load(run / folder, device="cpu").generate("What is DNS?", max_length=4), str)


# --- the pre-flight and the rtx3060-lora profile ---------------------------------------------------------------

def _qwen15_shape():
    """Qwen2.5-1.5B-Instruct's published sizes as a config object: no weights, nothing downloaded."""
    from transformers import Qwen2Config

    from src.training.preflight import ModelShape

    return ModelShape.from_config(Qwen2Config(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                              tie_word_embeddings=True))


def test_preflight_memory_per_peft_mode_names_the_mode_that_fits_12_gb():
    from src.training import preflight as pf

    shape = _qwen15_shape()
    assert pf.lora_parameters(shape, 16) == 28 * 16 * sum(a + b for a, b in pf.decoder_linear_shapes(shape))
    full, lora, qlora = (pf.adapter_weight_memory(shape, m, 16).bytes() for m in ("none", "lora", "qlora"))
    assert full == 16 * shape.parameters()  # AdamW full fine-tuning: 16 B a parameter (23 GB here)
    assert qlora < lora < full and qlora < 1.5 * pf.GB
    args = te.parse_args(["--profile", "rtx3060-lora", "--output_dir", "/tmp/x"])
    assert (args.peft, args.batch_size, args.max_length) == ("qlora", 4, 512)
    check = pf.check_peft_modes(shape, args, 12 * pf.GB, args.max_length, "a simulated 12 GB GPU")
    assert check.level == "ok" and "none 0" in check.message, check.message  # full fine-tuning does not fit
    probe = pf.SimulatedProbe(12 * pf.GB, shape, pf.adapter_weight_memory(shape, "qlora", 16), head_trainable=False)
    assert probe(args.batch_size, args.max_length) < 12 * pf.GB
    args.peft = "none"  # asked for full fine-tuning: the check names the adapter mode that fits instead
    assert pf.check_peft_modes(shape, args, 12 * pf.GB, 512, "x").fix == "--peft lora"


def test_rtx3060_lora_profile_stops_at_the_download_offline(monkeypatch, capsys, tmp_path):
    from src.training import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = preflight.main(["--profile", "rtx3060-lora", "--no_data", "--run_dir", str(tmp_path),
                           "--simulate_gpu_memory_gb", "12"])
    out = capsys.readouterr().out
    assert code == 2 and "Qwen/Qwen2.5-1.5B-Instruct" in out and "HF_HUB_OFFLINE is set" in out


@pytest.mark.slow
def test_ddp_with_adapters_keeps_ranks_identical_and_matches_one_process(tmp_path, tiny_model_no_dropout,
                                                                          prepared_data, tiny_datasets_dir):
    """torchrun with 2 processes (gloo) at per-rank batch 2 against one process at batch 4: the same adapters up to
    float summation order, and one replica hash for both ranks."""
    import os
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    def flags(out, batch):
        return [*_argv(tiny_model_no_dropout, prepared_data, tiny_datasets_dir, out, "--peft", "lora",
                       "--lora_dropout", "0", "--max_steps", "3"), "--batch_size", str(batch)]

    single = te.train(te.parse_args(flags(tmp_path / "single", 4)))
    assert single["exit_code"] == 0
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "src.training.train_enhanced", *flags(tmp_path / "ddp", 2)], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "training_config.json").read_text())["summary"]
    assert len(summary["replica_sha256"]) == 2 and len(set(summary["replica_sha256"])) == 1
    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_on_other_families_resumes_and_merges(family, family_dirs, prepared_data, tiny_datasets_dir, tmp_path):
    """--peft lora on a tiny Llama (untied head, BOS-adding tokenizer) and Qwen2 (tied head, ChatML) with LLRD and
    R-Drop on the adapters (their dropout): a run stopped after step 2 and resumed ends with the same adapter as an
    uninterrupted one; the merged theta_final is the family's own class and peft's loading of the adapter on the
    base gives its logits within 1e-4."""
    from peft import PeftModel

    base_dir = family_dirs[family]
    flags = ("--peft", "lora", "--lora_dropout", "0.1", "--use_llrd", "--use_rdrop", "--max_steps", "4")

    def run(name, *extra):
        return te.train(te.parse_args(_argv(base_dir, prepared_data, tiny_datasets_dir, tmp_path / name, *flags,
                                            *extra)))

    whole = run("whole")
    assert whole["exit_code"] == 0 and whole["global_step"] == 4 and "rdrop" not in whole["techniques_left_out"]
    assert run("resumed", "--stop_after_step", "2")["exit_code"] == te.EXIT_INTERRUPTED
    assert run("resumed")["exit_code"] == 0
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # The adapters' dropout gives R-Drop something to act on, from step 2: at step 1 every B factor is still zero,
    # so both passes are the base model's and the KL term is exactly 0.
    assert metrics[0]["kl"] == 0 and all(m["kl"] > 0 for m in metrics[1:])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "theta_final").eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert type(merged) is type(base) and merged.config.model_type == family
    if merged.get_input_embeddings().weight.shape[0] > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(merged.get_input_embeddings().weight.shape[0], mean_resizing=False)
    loaded = PeftModel.from_pretrained(base, tmp_path / "whole" / "adapter").eval()
    x = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - merged(input_ids=x).logits).abs().max() < 1e-4
