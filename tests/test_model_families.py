"""Every supported family through ThetaModel and the trainer (src/model/families.py, src/model/theta_model.py).

The tiny random models of tests/model_families.py (the ``family_dirs`` session fixture) go through each step:
loading with the family's own class, the pad and stop ids, the answer-only chunked head against full logits and
against Hugging Face's own loss (tied and untied heads), packed against unpacked, batched against one-by-one
greedy generation, save and load through the Auto classes, the LLRD groups, the accumulation split, one
quick-profile run with every technique on that is stopped mid-epoch and resumed bit-identically; and every
start-up refusal with its message.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_model_families.py -q
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_records
from full_logits import full_logits_token_losses
from model_families import FAMILIES, build_unsupported
from recipe_harness.common import one_torch_thread
import src.training.train_enhanced as te
from src.model.families import UnsupportedModel, check_support
from src.model.theta_model import ThetaModel, ThetaModelError
from src.training.lm_data import TokenizedDataset, collate
from src.training.lm_loss import step_losses
from src.training.packing import pack_batch

CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM"}
# pad: Llama-3's reserved token and Phi-3's placeholder are reused, Qwen keeps its own, GPT-2 and Mistral get one
PADS = {"gpt2": "<|pad|>", "llama": "<|reserved_special_token_0|>", "qwen2": "<|endoftext|>",
        "qwen3": "<|endoftext|>", "mistral": "<|pad|>", "phi3": "<|placeholder1|>"}
STOPS = {"gpt2": ["<|endoftext|>"], "llama": ["<|end_of_text|>", "<|eot_id|>"], "qwen2": ["<|im_end|>"],
         "qwen3": ["<|im_end|>"], "mistral": ["</s>"], "phi3": ["<|endoftext|>", "<|end|>"]}
TIED = {"gpt2": True, "qwen2": True}
QUESTIONS = ["What is a firewall?", "Why does DNS matter?", "What is a loop?"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy matrices: a second thread only adds overhead (recipe_harness.common.one_torch_thread measured it)."""
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def models(family_dirs):
    return {f: ThetaModel.load(family_dirs[f], device="cpu") for f in FAMILIES}


@pytest.fixture(scope="module")
def records():
    recs = make_records()
    return [recs[0], recs[1], recs[17], recs[30]]  # different lengths, one with code


def _batch(tm, recs, max_length=128):
    ds = TokenizedDataset(recs, tm.tokenizer, max_length)
    return ds, collate(ds.examples, tm.tokenizer.pad_token_id)


# --- loading, tokens ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_its_own_class_pad_and_stop_ids(family, models):
    tm = models[family]
    tok, model = tm.tokenizer, tm.model
    assert type(model).__name__ == CLASSES[family] and tm.family.model_type == family
    assert tm.context_length == 512
    # the prompt format's trained end first (the chat template's end of turn where there is one), then every EOS
    assert tm.stop_ids[0] == tm.prompt_format.end_id
    assert sorted(tm.stop_ids) == sorted(tok.convert_tokens_to_ids(STOPS[family]))
    assert tok.pad_token == PADS[family] and tok.pad_token_id not in tm.stop_ids
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tok.pad_token_id
    gen_eos = model.generation_config.eos_token_id
    assert sorted(gen_eos if isinstance(gen_eos, list) else [gen_eos]) == sorted(tm.stop_ids)  # the list is kept
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (out is inp) == TIED.get(family, False)
    assert inp.shape[0] == out.shape[0] == len(tok)
    if PADS[family] == "<|pad|>":  # added: a new row at the mean, in the input and in an untied output embedding
        for w in (inp, out):
            torch.testing.assert_close(w[-1], w[:-1].mean(0), rtol=0, atol=1e-6)


# --- the answer-only head, packing, accumulation ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_answer_only_head_matches_full_logits_and_hf_loss(family, models, records):
    """Loss and gradients of the chunked target-position head against full logits (tests/full_logits.py) and
    against the model's own ``labels=`` loss; tied (GPT-2, Qwen2) and untied heads."""
    tm = models[family]
    model = tm.model.eval()  # dropout off: both sides see the same function
    _, batch = _batch(tm, records)
    params = [p for p in model.parameters() if p.requires_grad]
    out = step_losses(model, batch, torch.ones(len(records)))
    n = int((batch["labels"][:, 1:] != -100).sum())
    got = torch.autograd.grad(out["loss_sum"] / n, params)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token, mask = full_logits_token_losses(logits, batch["labels"])
    ref_loss = (token * mask).sum() / n
    ref = torch.autograd.grad(ref_loss, params)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(out["loss_sum"] / n, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_sum"] / n, hf, rtol=1e-5, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(got, ref)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_unpacked(family, models, records):
    """Packed rows (position_ids restart per record: RoPE and GPT-2's table alike) give the padded batch's loss
    and gradients."""
    tm = models[family]
    model = tm.model.eval()
    _, padded = _batch(tm, records)
    packed = pack_batch(padded, max_length=512, pad_id=tm.tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.tensor([1.0, 0.5, 2.0, 0.75])
    ref, got = step_losses(model, padded, w), step_losses(model, packed, w)
    torch.testing.assert_close(got["loss_sum"], ref["loss_sum"], rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got["loss_sum"], params), torch.autograd.grad(ref["loss_sum"], params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulation_split_gives_the_step_mean(family, models, records):
    """One micro-batch of 4 uneven records, 2 of 2 and 4 of 1 give the same gradient (the token mean of the step)."""
    tm = models[family]
    model = tm.model.eval()
    ds, _ = _batch(tm, records)
    pad, setup = tm.tokenizer.pad_token_id, te.LossSetup()

    def grads(window):
        model.zero_grad(set_to_none=True)
        te.accumulate_gradients(model, window, {"targets": setup.normaliser(window)}, setup, torch.device("cpu"),
                                nullcontext())
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = grads([collate(ds.examples, pad)])
    halves = grads([collate(ds.examples[:2], pad), collate(ds.examples[2:], pad)])
    singles = grads([collate([ex], pad) for ex in ds.examples])
    model.zero_grad(set_to_none=True)
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(singles[name], whole[name], rtol=1e-4, atol=1e-7)


# --- generation, save and load -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_one_by_one(family, models):
    tm = models[family]
    batched = tm.generate_batch(QUESTIONS, max_length=10, temperature=0)
    single = [tm.generate_with_stats(q, max_length=10, temperature=0) for q in QUESTIONS]
    assert [(b["text"], b["new_tokens"]) for b in batched] == [(s["text"], s["new_tokens"]) for s in single]


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_through_the_auto_classes(family, models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tm = models[family]
    tm.save(tmp_path / "saved")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(plain).__name__ == CLASSES[family] and tok.pad_token == PADS[family]
    ids = tm.tokenizer(QUESTIONS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, tm.model.eval()(ids).logits, rtol=0, atol=0)
    again = ThetaModel.load(tmp_path / "saved", device="cpu")  # nothing added twice
    assert len(again.tokenizer) == len(tm.tokenizer) and again.stop_ids == tm.stop_ids
    assert again.tokenizer.pad_token_id == tm.tokenizer.pad_token_id


# --- techniques ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_llrd_groups_cover_every_parameter_once_in_layer_order(family, models):
    from src.model.quantization import decoder_layers

    model = models[family].model
    factor = 0.5
    groups = te.get_llrd_optimizer_groups(model, factor, 0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    path, layers = decoder_layers(model)
    L = len(layers)
    for name in scale:
        if name.startswith(path + "."):
            assert scale[name] == factor ** (L - 1 - int(name[len(path) + 1:].split(".")[0])), name
    emb = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    assert scale[emb] == (1.0 if TIED.get(family) else factor ** L)
    if not TIED.get(family):
        head = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
        assert scale[head] == 1.0
    assert all(g["weight_decay"] == 0 for g in groups if g["params"][0].dim() < 2)


def _quick(family_dir, data, out, *extra):
    """--profile quick (every technique on) at toy sizes; --dropout 0.1 so R-Drop takes part on every family."""
    return te.parse_args(["--profile", "quick", "--model_name", str(family_dir), "--data_path", str(data),
                          "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--max_length", "96",
                          "--num_samples", "1", "--domain_eval_per_domain", "1", "--seed", "5", "--device", "cpu",
                          "--no_progress_bar", "--dropout", "0.1", *extra])


@pytest.mark.parametrize("family", FAMILIES)
def test_quick_profile_every_technique_then_resume_bit_identical(family, family_dirs, prepared_data, tmp_path):
    full = te.train(_quick(family_dirs[family], prepared_data, tmp_path / "full"))
    assert full["exit_code"] == 0 and full["techniques_left_out"] == {}, full
    config = json.loads((tmp_path / "full" / "training_config.json").read_text())["args"]
    assert all(config[f"use_{cls.name}"] for cls in te.TECHNIQUE_TYPES)  # every technique took part
    steps = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(s.get("kl", 0) > 0 for s in steps) and any(s.get("contrastive", 0) > 0 for s in steps)
    stop = full["global_step"] - 2  # inside the second epoch
    stopped = te.train(_quick(family_dirs[family], prepared_data, tmp_path / "resumed", "--stop_after_step", str(stop)))
    assert stopped["exit_code"] == te.EXIT_INTERRUPTED
    resumed = te.train(_quick(family_dirs[family], prepared_data, tmp_path / "resumed"))
    assert resumed["exit_code"] == 0 and resumed["global_step"] == full["global_step"]
    a, b = (load_file(str(tmp_path / r / "theta_final" / "model.safetensors")) for r in ("full", "resumed"))
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    saved = json.loads((tmp_path / "full" / "theta_final" / "config.json").read_text())
    assert saved["model_type"] == family and saved["architectures"] == [CLASSES[family]]


def test_rdrop_is_left_out_without_dropout_and_says_why(family_dirs, prepared_data, tmp_path):
    args = te.parse_args(["--model_name", str(family_dirs["llama"]), "--data_path", str(prepared_data),
                          "--output_dir", str(tmp_path), "--use_rdrop", "--max_steps", "1", "--max_length", "96",
                          "--num_samples", "0", "--domain_eval_frequency", "0", "--device", "cpu",
                          "--no_progress_bar"])
    summary = te.train(args)
    assert summary["techniques_left_out"] == {"rdrop": "R-Drop left out: llama has no dropout (use --dropout P)"}
    assert "kl" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])  # no second forward
    assert "R-Drop left out: llama has no dropout" in (tmp_path / "train.log").read_text()


# --- refusals ----------------------------------------------------------------------------------------------------

def _edited(src, dest, **fields):
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **fields}))
    return dest


@pytest.mark.parametrize("make, words", [
    (lambda d, tmp: build_unsupported("gemma2", tmp / "gemma2"), ["'gemma2'", "final_logit_softcapping"]),
    (lambda d, tmp: build_unsupported("gpt_neox", tmp / "neox"), ["'gpt_neox'", "not supported", "llama"]),
    (lambda d, tmp: _edited(d["llama"], tmp / "remote", auto_map={"AutoModelForCausalLM": "x.Model"}),
     ["'llama'", "auto_map", "remote code"]),
    (lambda d, tmp: _edited(d["llama"], tmp / "scaled", logit_scale=0.5), ["'llama'", "logit_scale"]),
    (lambda d, tmp: _edited(d["phi3"], tmp / "softcap", attn_logit_softcapping=50.0),
     ["'phi3'", "attn_logit_softcapping"]),
], ids=["gemma2-softcap", "gpt_neox-type", "remote-code", "logit-scale", "attn-softcap"])
def test_unsupported_models_are_refused_before_loading(make, words, family_dirs, tmp_path):
    folder = make(family_dirs, tmp_path)
    with pytest.raises(UnsupportedModel) as err:
        ThetaModel(str(folder), device="cpu")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_biased_head_and_sliding_window_with_packing_are_refused(family_dirs, prepared_data, tmp_path):
    config = json.loads((family_dirs["mistral"] / "config.json").read_text())
    with pytest.raises(UnsupportedModel, match="'mistral' has a bias on its LM head"):
        check_support(config, lm_head_bias=True)
    check_support(config, packing=True, max_length=256)  # the window covers the row: fine
    args = te.parse_args(["--model_name", str(family_dirs["mistral"]), "--data_path", str(prepared_data),
                          "--output_dir", str(tmp_path), "--packing", "--max_length", "300", "--device", "cpu"])
    with pytest.raises(UnsupportedModel, match=r"'mistral' uses sliding-window attention of 256 tokens, shorter "
                                               r"than --max_length 300.*Drop --packing"):
        te.train(args)


def test_hub_name_offline_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ThetaModelError, match="not in the local Hugging Face cache.*theta-tiny"):
        ThetaModel("theta-test-org/not-a-cached-model", device="cpu")
