"""src/model/interop.py: every saved folder of every family carries the config and tokenizer fields that llama.cpp's
convert_hf_to_gguf.py and transformers-4 tools read, and transformers 5 reads the folder exactly as before.

The tables of what the converter reads come from reading its source (conversion/gpt2.py, phi.py, base.py of
llama.cpp, 2026-12); running the converter itself is not needed here (documentation/INTEROP.md has the command).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_interop.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model_families import FAMILIES
from src.model import interop

# What llama.cpp's converter indexes without a fallback (hparams["..."] or find_hparam of a list, one name of
# which must be present), per family. GPT-2's "n_ctx" is the one transformers 5 stopped writing.
CONVERTER_READS = {
    "gpt2": [["n_ctx"], ["n_embd"], ["n_head"], ["layer_norm_epsilon"], ["n_layer"], ["vocab_size"]],
    "llama": [["num_hidden_layers"], ["hidden_size"], ["num_attention_heads"], ["vocab_size"]],
    "phi3": [["hidden_size"], ["num_attention_heads"], ["num_key_value_heads"], ["rms_norm_eps"],
             ["n_positions", "max_position_embeddings"], ["intermediate_size"], ["num_hidden_layers"]],
}
CONVERTER_READS.update(qwen2=CONVERTER_READS["llama"], qwen3=CONVERTER_READS["llama"],
                       mistral=CONVERTER_READS["llama"])
# What a transformers-4 config reads for RoPE (it ignores transformers 5's "rope_parameters").
TRANSFORMERS4_ROPE = ["rope_theta"]


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _read(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_the_fields_other_tools_read_and_loads_the_same(family, family_dirs, tmp_path):
    before = family_dirs[family]
    after = tmp_path / family
    shutil.copytree(before, after)
    interop.finish_saved_folder(after)
    config, tok_config = _read(after, "config.json"), _read(after, "tokenizer_config.json")
    for names in CONVERTER_READS[family]:
        assert any(n in config for n in names), f"{family}: the converter reads one of {names}"
    if family == "gpt2":
        assert config["n_ctx"] == config["n_positions"] == 512
    else:
        assert all(k in config for k in TRANSFORMERS4_ROPE)
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
        assert "rope_scaling" not in config  # the default RoPE: transformers 4's default (None) is right
    # transformers 4's AutoTokenizer knows neither TokenizersBackend nor a list of extra_special_tokens
    assert tok_config.get("tokenizer_class") != "TokenizersBackend"
    assert not isinstance(tok_config.get("extra_special_tokens"), list)
    if family == "phi3":  # the converter reads a byte-level BPE phi3 vocabulary only under this class name
        assert tok_config["tokenizer_class"] == "GPT2Tokenizer"
    interop.finish_saved_folder(after)  # a second pass changes nothing
    assert _read(after, "config.json") == config and _read(after, "tokenizer_config.json") == tok_config

    # transformers 5 reads the folder exactly as before: same tokens, template, special tokens and logits
    (m0, t0), (m1, t1) = _load(before), _load(after)
    text = "What is a firewall? A firewall filters traffic."
    messages = [{"role": "user", "content": "What is DNS?"}, {"role": "assistant", "content": "It names hosts."}]
    assert t1(text)["input_ids"] == t0(text)["input_ids"]
    assert t1.all_special_tokens == t0.all_special_tokens and t1.get_vocab() == t0.get_vocab()
    assert (t1.chat_template, t1.eos_token, t1.pad_token, t1.bos_token) == \
        (t0.chat_template, t0.eos_token, t0.pad_token, t0.bos_token)
    if t0.chat_template:
        assert t1.apply_chat_template(messages, tokenize=False) == t0.apply_chat_template(messages, tokenize=False)
    ids = torch.tensor([t0(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m0(ids).logits)


def test_rope_scaling_is_mirrored_under_the_names_transformers_4_reads(family_dirs, tmp_path):
    """A Llama-3-style RoPE (base 500000, "llama3" scaling): transformers 4 would build the default base 10000
    and no scaling from transformers 5's rope_parameters alone. The legacy fields, by hand; transformers 5 still
    builds the same rotary frequencies from the folder."""
    rope = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    out = interop.export_compat_fields({"model_type": "llama", "rope_parameters": rope}, "llama")
    assert out["rope_theta"] == 500000.0
    assert out["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    assert interop.export_compat_fields(out, "llama") == out
    back = interop.export_compat_fields({**out, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
                                        "llama")
    assert back["rope_theta"] == 1e6 and "rope_scaling" not in back  # no stale scaling left behind
    partial = interop.export_compat_fields({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
                                           "phi3")
    assert partial["partial_rotary_factor"] == 0.5 and "rope_scaling" not in partial
    assert interop.export_compat_fields({"rope_parameters": rope}, "gemma2") == {"rope_parameters": rope}

    from transformers import AutoModelForCausalLM

    plain, mirrored = tmp_path / "plain", tmp_path / "mirrored"
    for folder in (plain, mirrored):
        shutil.copytree(family_dirs["llama"], folder)
        config = _read(folder, "config.json")
        config["rope_parameters"] = rope
        (folder / "config.json").write_text(json.dumps(config))
    interop.finish_saved_folder(mirrored)
    assert _read(mirrored, "config.json")["rope_scaling"]["rope_type"] == "llama3"
    freq = [AutoModelForCausalLM.from_pretrained(f).model.rotary_emb.inv_freq for f in (plain, mirrored)]
    assert torch.equal(freq[0], freq[1])


def test_theta_save_writes_the_fields_and_keeps_the_sentencepiece_model(tiny_model_dir, tmp_path):
    """ThetaModel.save (theta_best/, theta_final/): GPT-2's n_ctx for the converter, and the source folder's
    tokenizer.model (a transformers-5 tokenizer save drops it; llama.cpp reads Phi-3-mini's vocabulary from it)."""
    from src.model.theta_model import ThetaModel

    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    (source / "tokenizer.model").write_bytes(b"\x0a\x07sentencepiece model bytes")
    tm = ThetaModel.load(source, device="cpu")
    out = tm.save(tmp_path / "theta_final")
    config = _read(out, "config.json")
    assert config["n_ctx"] == config["n_positions"] == tm.model.config.n_positions
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    assert ThetaModel.load(out, device="cpu").model.config.n_positions == config["n_positions"]


def test_a_hub_source_gives_its_cached_tokenizer_model_and_never_downloads(tmp_path):
    """The trainer's ThetaModel comes from a hub id: its tokenizer.model comes from the local cache, and a name
    that is not cached gives nothing (no network)."""
    snapshot = tmp_path / "models--org--model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.model").write_bytes(b"sp")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("a" * 40)
    assert interop._source_file("org/model", "tokenizer.model", cache_dir=tmp_path) == snapshot / "tokenizer.model"
    assert interop._source_file("org/other", "tokenizer.model", cache_dir=tmp_path) is None
    assert interop._source_file(None, "tokenizer.model") is None


def test_an_inference_copy_keeps_the_source_tokenizer_files(family_dirs, tmp_path):
    """keep_source_tokenizer: the same tokenizer gets the source's files byte for byte (chat template included,
    files the source lacks removed); one the loader changed (a token added) keeps what was saved."""
    from transformers import AutoTokenizer

    source = tmp_path / "llama"
    shutil.copytree(family_dirs["llama"], source)
    interop.finish_saved_folder(source)  # as Theta writes it
    tok = AutoTokenizer.from_pretrained(source)
    copy = tmp_path / "copy"
    tok.save_pretrained(copy)
    (copy / "special_tokens_map.json").write_text("{}")  # a file the source does not have
    assert interop.keep_source_tokenizer(source, copy, tok)
    names = [n for n in interop.TOKENIZER_FILES if (source / n).is_file()]
    assert "chat_template.jinja" in names or "chat_template" in _read(source, "tokenizer_config.json")
    for name in interop.TOKENIZER_FILES:
        assert (copy / name).is_file() == (source / name).is_file(), name
        if (source / name).is_file():
            assert (copy / name).read_bytes() == (source / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(copy).chat_template == tok.chat_template

    tok.add_special_tokens({"pad_token": "<|pad|>"})
    changed = tmp_path / "changed"
    tok.save_pretrained(changed)
    assert not interop.keep_source_tokenizer(source, changed, tok)
    assert AutoTokenizer.from_pretrained(changed).pad_token == "<|pad|>"
