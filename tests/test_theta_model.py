"""The model layer: sources, special tokens, prompt format, generation, save/load, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from conftest import TINY_TEST_CONFIG, run_script
from src.model.theta_model import (EOS_TOKEN, PAD_TOKEN, ThetaModel, ThetaModelError, build_tiny_model,
                                   format_prompt, split_prompt)


def test_prompt_format_is_the_design_one():
    assert format_prompt("What is DNS?") == "Question: What is DNS?\nAnswer:"
    assert format_prompt("What is DNS?", "It maps names to addresses.") == \
        "Question: What is DNS?\nAnswer: It maps names to addresses.<|endoftext|>"
    assert format_prompt(" Q? ", "A.", context="Some text.") == "Context: Some text.\nQuestion: Q?\nAnswer: A.<|endoftext|>"
    prompt, completion = split_prompt("Q?", "A.")
    assert prompt + completion == format_prompt("Q?", "A.")
    assert completion.startswith(" ") and completion.endswith(EOS_TOKEN)


def test_tiny_model_tokens(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    tok = tm.tokenizer
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert tm.model.config.pad_token_id == tok.pad_token_id
    assert tm.model.config.eos_token_id == tok.eos_token_id
    assert tm.model.get_input_embeddings().weight.shape[0] == len(tok)
    assert len(tok) <= TINY_TEST_CONFIG["vocab_size"]
    # the EOS text in a formatted example becomes the single EOS id
    ids = tok(format_prompt("What is DNS?", "Names to addresses."))["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_tiny_model_is_byte_identical_when_rebuilt(tmp_path, tiny_datasets_dir):
    a = build_tiny_model(tmp_path / "a", tiny_datasets_dir, **TINY_TEST_CONFIG)
    b = build_tiny_model(tmp_path / "b", tiny_datasets_dir, **TINY_TEST_CONFIG)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "theta_tiny.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_building_theta_tiny_leaves_the_global_generator_alone(tmp_path, tiny_datasets_dir):
    """Regression (issue 21.7): the first run on a fresh clone built theta-tiny after the trainer had seeded, and
    the build's own torch.manual_seed changed every number that run drew next (its weights differed from the
    same command run again)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = build_tiny_model(tmp_path / "a", tiny_datasets_dir, **TINY_TEST_CONFIG)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # another global state: the weights do not depend on it either
    b = build_tiny_model(tmp_path / "b", tiny_datasets_dir, **TINY_TEST_CONFIG)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_theta_tiny_is_rebuilt_once_when_its_data_changed(tmp_path, tiny_records, caplog):
    import logging

    from src.model.theta_model import corpus_digest, iter_corpus_texts, tiny_model_dir

    d = tmp_path / "Datasets"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(tiny_records[:20]), encoding="utf-8")
    base = tmp_path / "base"
    with caplog.at_level(logging.INFO, logger="src.model.theta_model"):
        path = tiny_model_dir(d, base)
        assert [r.message for r in caplog.records if "theta-tiny: built" in r.message]
        caplog.clear()
        assert tiny_model_dir(d, base) == path and caplog.records == []  # same data: silent, no rebuild
        (d / "b.json").write_text(json.dumps(tiny_records[20:]), encoding="utf-8")
        tiny_model_dir(d, base)
        tiny_model_dir(d, base)  # a second caller (the trainer after the pre-flight) finds it rebuilt
    (line,) = [r.message for r in caplog.records]
    assert "changed since it was built (40 texts then, 96 now): rebuilt" in line
    meta = json.loads((path / "theta_tiny.json").read_text(encoding="utf-8"))
    assert meta["corpus_sha256"] == corpus_digest(list(iter_corpus_texts(d)))


def test_new_pad_token_row_is_the_mean_of_existing_rows(tiny_records):
    # a tokenizer whose vocabulary lacks the pad token, as GPT-2's own does
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([r["answer"] for r in tiny_records], trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bare = GPT2TokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    assert bare.pad_token is None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(bare)))
    old = model.get_input_embeddings().weight.detach().clone()
    tm = ThetaModel.from_parts(model, bare, device="cpu")
    new = tm.model.get_input_embeddings().weight.detach()
    assert tm.tokenizer.pad_token == PAD_TOKEN and tm.tokenizer.pad_token_id == old.shape[0]
    assert torch.equal(new[:old.shape[0]], old)
    assert torch.allclose(new[old.shape[0]], old.mean(0))
    assert tm.model.lm_head.weight.data_ptr() == tm.model.get_input_embeddings().weight.data_ptr()  # still tied


def _teach(tm: ThetaModel, question: str, answer: str, steps: int = 80) -> None:
    """Overfit one example so the model reliably answers it and then emits EOS."""
    ids = tm.tokenizer(format_prompt(question, answer), return_tensors="pt")["input_ids"]
    opt = torch.optim.AdamW(tm.model.parameters(), lr=1e-2)
    tm.model.train()
    for _ in range(steps):
        loss = tm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_generate_returns_only_the_answer_and_stops_at_eos(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    _teach(tm, "What is DNS?", "It maps names.")
    out = tm.generate_with_stats("What is DNS?", max_length=40, temperature=0.0, repetition_penalty=1.0)
    assert out["text"] == "It maps names."
    answer_tokens = len(tm.tokenizer(" It maps names.")["input_ids"])
    assert out["new_tokens"] == answer_tokens + 1  # the answer, then EOS, then nothing
    assert "Question:" not in tm.generate("What is DNS?", max_length=40, temperature=0.0)


def test_generate_batch_equals_one_by_one_greedy(tiny_model_dir):
    """Oracle: the same questions answered one at a time. Left padding must change neither the answers nor
    where they stop (the taught question ends at EOS early; the others run to max_length)."""
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    _teach(tm, "What is DNS?", "It maps names.")
    questions = ["What is DNS?", "How would you explain a three-way TCP handshake to a new network engineer?",
                 "Wie funktioniert ein Router?", "What is DNS?"]
    single = [tm.generate_with_stats(q, max_length=24, temperature=0.0) for q in questions]
    batch = tm.generate_batch(questions, max_length=24, temperature=0.0)
    assert [b["text"] for b in batch] == [s["text"] for s in single]
    assert [b["new_tokens"] for b in batch] == [s["new_tokens"] for s in single]
    assert batch[0]["text"] == "It maps names." and batch[0]["new_tokens"] < 24 == batch[1]["new_tokens"]
    assert tm.tokenizer.padding_side == "right"  # restored
    assert tm.generate_batch([], max_length=4) == []


def test_generate_greedy_is_deterministic_and_sampling_is_seedable(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    assert tm.generate("What is TCP?", max_length=12, temperature=0) == \
        tm.generate("What is TCP?", max_length=12, temperature=0)
    a = tm.generate("What is TCP?", max_length=12, temperature=1.0, seed=7)
    b = tm.generate("What is TCP?", max_length=12, temperature=1.0, seed=7)
    assert a == b


def test_save_load_round_trip_and_plain_transformers(tiny_model_dir, tmp_path):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    saved = tm.save(tmp_path / "theta_final")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= \
        {p.name for p in saved.iterdir()}
    back = ThetaModel.load(saved, device="cpu")
    ids = tm.tokenizer("Question: What is UDP?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(tm.model(ids).logits, back.model(ids).logits)
    hf_model = AutoModelForCausalLM.from_pretrained(saved)
    hf_tok = AutoTokenizer.from_pretrained(saved)
    assert hf_tok.pad_token == PAD_TOKEN and hf_tok("a b")["input_ids"] == tm.tokenizer("a b")["input_ids"]
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, tm.model(ids).logits)


def test_save_is_atomic_and_replaces(tiny_model_dir, tmp_path):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    target = tmp_path / "m"
    tm.save(target, extra_files={"note.json": {"v": 1}})
    tm.save(target, extra_files={"note.json": {"v": 2}})
    assert json.loads((target / "note.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_hub_model_offline_names_theta_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ThetaModelError) as err:
        ThetaModel("gpt2", device="cpu")
    msg = str(err.value)
    assert "gpt2" in msg and "theta-tiny" in msg and "download" in msg


def test_not_a_model_folder_names_path_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ThetaModelError) as err:
        ThetaModel.load(tmp_path)
    assert str(tmp_path) in str(err.value) and "model.safetensors" in str(err.value) \
        and "tokenizer.json" in str(err.value)
    with pytest.raises(ThetaModelError, match="not found"):
        ThetaModel.load(tmp_path / "nope")


def test_cli_generate_and_errors(tiny_model_dir, tmp_path):
    ok = run_script(["-m", "src.model.theta_model", "generate", "--model_path", str(tiny_model_dir),
                     "--prompt", "What is a firewall?", "--max_length", "8", "--seed", "1"])
    assert ok.returncode == 0, ok.stderr
    assert "tokens/s" in ok.stdout
    bad = run_script(["src/model/theta_model.py", "generate", "--model_path", str(tmp_path / "missing"),
                      "--prompt", "hi"])
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    flag = run_script(["-m", "src.model.theta_model", "generate", "--model_path", str(tiny_model_dir),
                       "--prompt", "hi", "--temperature", "-1"])
    assert flag.returncode == 2 and "--temperature" in flag.stderr


@pytest.mark.parametrize("stdin", ["What is DNS?\nexit\n", "What is DNS?\n", ""])
def test_cli_chat_leaves_cleanly_on_exit_and_eof(tiny_model_dir, stdin):
    out = run_script(["-m", "src.model.theta_model", "chat", "--model_path", str(tiny_model_dir),
                      "--max_length", "6"], input=stdin)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    if stdin:
        assert "theta>" in out.stdout


def test_fused_gelu_swap_keeps_the_outputs():
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=300)
    assert cfg.activation_function == "gelu_new"  # what pretrained GPT-2 checkpoints say
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
    from tokenizers import Tokenizer, models
    tok = GPT2TokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token=EOS_TOKEN)
    tm = ThetaModel.from_parts(model, tok, device="cpu")
    assert tm.model.config.activation_function == "gelu_pytorch_tanh"
    assert all(isinstance(b.mlp.act, type(ACT2FN["gelu_pytorch_tanh"])) for b in tm.model.transformer.h)
    with torch.no_grad():
        after = tm.model(ids).logits[..., :300]
    assert torch.allclose(before, after, atol=1e-5)
