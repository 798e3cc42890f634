"""Prompt formats (src/model/prompt_format.py): how a record becomes prompt and completion ids, for every family.

The oracles are the tokenizer's own renderings: ``apply_chat_template`` of the whole conversation for the chat
format, the tokenised Q&A text for the Q&A format, and character offsets for the assistant span.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_prompt_format.py -q
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer, GenerationConfig

from src.model.prompt_format import (FORMAT_FILE, QA_CHAT_TEMPLATE, ChatFormat, PromptFormatError, QAFormat,
                                     resolve_format, write_prompt_format)
from src.model.theta_model import Conversation, ThetaModel, format_prompt, split_prompt
from src.training.lm_data import IGNORE_INDEX, TokenizedDataset

CHAT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
END_OF_TURN = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
               "phi3": "<|end|>"}
ADDS_BOS = {"llama", "mistral"}
RECORD = {"question": "What is a firewall?", "answer": "A firewall filters network traffic by rules.",
          "system": "Answer briefly.", "history": [("What is DNS?", "It maps names to addresses.")]}


@pytest.fixture(scope="module")
def tokenizers(family_dirs) -> dict:
    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in family_dirs.items()}


def whole_conversation(tok, rec: dict) -> list[int]:
    messages = ChatFormat.messages(rec["question"], rec["answer"], rec.get("context"), rec.get("system"),
                                   rec.get("history", ()))
    return tok.apply_chat_template(messages, tokenize=True)["input_ids"]


def assistant_span(tok, text: str, reply: str, end: str) -> list[int]:
    """The token positions of the last reply and its end-of-turn token in ``text``, found by character offsets
    (what a template's {% generation %} block marks)."""
    start = text.rindex(reply)
    stop = text.index(end, start + len(reply)) + len(end)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= start and b <= stop and b > a]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_prompt_plus_completion_is_the_whole_conversation(family, tokenizers):
    tok = tokenizers[family]
    fmt = resolve_format("auto", tok)
    assert isinstance(fmt, ChatFormat) and fmt.end_text == END_OF_TURN[family]
    for rec in (RECORD, {"question": "How do I reset my password?", "answer": "Open the account page.",
                         "context": "The helpdesk answers tickets."}):
        (prompt, completion), = fmt.encode([rec])
        whole = whole_conversation(tok, rec)
        # prompt + completion are the conversation's ids; after them only what the template writes past the
        # end-of-turn token (ChatML's and Phi-3's newline), never trained and never generated
        assert whole[:len(prompt) + len(completion)] == prompt + completion
        assert tok.decode(whole[len(prompt) + len(completion):]).strip() == ""
        gen_prompt = ChatFormat.messages(rec["question"], None, rec.get("context"), rec.get("system"),
                                         rec.get("history", ()))
        assert prompt == tok.apply_chat_template(gen_prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert completion[-1] == fmt.end_id == tok.convert_tokens_to_ids(END_OF_TURN[family])
        # BOS exactly once, at the start, for the tokenizers that add it; never inside the completion
        bos = tok.bos_token_id
        assert (prompt + completion).count(bos) == (1 if family in ADDS_BOS else 0)
        if family in ADDS_BOS:
            assert prompt[0] == bos


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_labels_are_the_assistant_span(family, tokenizers):
    tok = tokenizers[family]
    fmt = resolve_format("chat", tok)
    rec = {"question": RECORD["question"], "answer": RECORD["answer"], "context": "Firewalls sit at the edge.",
           "domain": "general"}
    ds = TokenizedDataset([rec], tok, 512, prompt_format=fmt)
    ex = ds[0]
    text = tok.apply_chat_template(ChatFormat.messages(rec["question"], rec["answer"], rec["context"]),
                                   tokenize=False)
    targets = [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]
    assert targets == assistant_span(tok, text, rec["answer"], END_OF_TURN[family])
    assert [ex["input_ids"][i] for i in targets] == [ex["labels"][i] for i in targets]
    assert ex["labels"][-1] == fmt.end_id and ds.prompt_format == "chat"


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_stop_ids_are_the_end_of_turn_then_the_eos_ids(family, tokenizers, family_dirs):
    tok = tokenizers[family]
    fmt = resolve_format("chat", tok)
    gen = GenerationConfig.from_pretrained(family_dirs[family])
    stops = fmt.stop_ids(gen)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert stops[0] == fmt.end_id and set(eos) <= set(stops) and tok.eos_token_id in stops
    assert len(stops) == len(set(stops))


def test_qa_format_on_a_bos_tokenizer_has_bos_once_and_ends_with_eos(tokenizers):
    tok = tokenizers["llama"]
    fmt = resolve_format("qa", tok)
    rec = {"question": "What is a firewall?", "answer": "It filters traffic.", "context": "Networks."}
    (prompt, completion), = fmt.encode([rec])
    # the whole Q&A text tokenised at once (the post-processor adds BOS once) is the oracle
    assert prompt + completion == tok(format_prompt(rec["question"], rec["answer"], rec["context"]).replace(
        "<|endoftext|>", tok.eos_token))["input_ids"]
    assert prompt[0] == tok.bos_token_id and (prompt + completion).count(tok.bos_token_id) == 1
    assert completion[-1] == tok.eos_token_id == fmt.end_id


def legacy_ids(tok, rec: dict) -> list[int]:
    """How Theta tokenised a record before the prompt formats existed (the code this module replaced)."""
    prompt = tok(split_prompt(rec["question"], None, rec.get("context"))[0])["input_ids"]
    return prompt + tok(" " + rec["answer"].strip())["input_ids"] + [tok.eos_token_id]


def test_qa_on_gpt2_and_theta_tiny_is_bit_identical_to_before(tokenizers, tiny_model_dir, tiny_records):
    records = tiny_records + [dict(tiny_records[0], context="A firewall sits between networks.")]
    for tok in (tokenizers["gpt2"], AutoTokenizer.from_pretrained(tiny_model_dir)):
        assert isinstance(resolve_format("auto", tok), QAFormat)
        ds = TokenizedDataset(records, tok, 10 ** 6)
        for rec, ex in zip(records, ds.examples):
            assert ex["input_ids"] == legacy_ids(tok, rec)
            assert ex["input_ids"] == tok(format_prompt(rec["question"], rec["answer"], rec.get("context")))["input_ids"]
            n_prompt = len(tok(split_prompt(rec["question"], None, rec.get("context"))[0])["input_ids"])
            assert ex["labels"] == [IGNORE_INDEX] * n_prompt + ex["input_ids"][n_prompt:]


def test_auto_resolution_and_the_chat_refusal(tokenizers, family_dirs, tmp_path):
    assert resolve_format("auto", tokenizers["gpt2"]).name == "qa"
    assert resolve_format("auto", tokenizers["qwen2"]).name == "chat"
    assert resolve_format("qa", tokenizers["qwen2"]).name == "qa"
    with pytest.raises(PromptFormatError) as err:
        resolve_format("chat", tokenizers["gpt2"], model_name="my-gpt2")
    assert "my-gpt2" in str(err.value) and "--prompt_format qa" in str(err.value)
    # a folder records the format it was trained in: auto reads it
    folder = tmp_path / "qwen2-qa"
    shutil.copytree(family_dirs["qwen2"], folder)
    write_prompt_format(folder, resolve_format("qa", tokenizers["qwen2"]))
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == QA_CHAT_TEMPLATE and json.loads((folder / FORMAT_FILE).read_text())[
        "prompt_format"] == "qa"
    assert resolve_format("auto", tok, folder).name == "qa"
    assert resolve_format("auto", tok).name == "qa"  # the Q&A template is no chat template, even without the file
    with pytest.raises(PromptFormatError, match="trained in Theta's Q&A format"):
        resolve_format("chat", tok)


def test_a_chat_folder_keeps_its_template_and_stops_at_the_end_of_turn(tokenizers, family_dirs, tmp_path):
    folder = tmp_path / "llama-chat"
    shutil.copytree(family_dirs["llama"], folder)
    fmt = resolve_format("chat", tokenizers["llama"])
    write_prompt_format(folder, fmt)
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizers["llama"].chat_template
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    assert fmt.end_id in eos and json.loads((folder / FORMAT_FILE).read_text())["end_token"] == "<|eot_id|>"


def test_qa_template_renders_thetas_format(tiny_model_dir, tokenizers):
    """The template written into Q&A folders renders exactly what QAFormat trains on and prompts with."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template == QA_CHAT_TEMPLATE
    fmt = QAFormat(tok)
    q, a = "What is DNS?", "It maps names to addresses."
    user = [{"role": "user", "content": q}]
    assert tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == format_prompt(q)
    assert tok.apply_chat_template(user + [{"role": "assistant", "content": a}], tokenize=False) == \
        format_prompt(q, a)
    messages = ChatFormat.messages(RECORD["question"], None, None, RECORD["system"], RECORD["history"])
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        fmt.render(RECORD["question"], None, None, RECORD["system"], RECORD["history"])[0]


def test_pipeline_with_messages_answers_in_the_trained_format(tiny_model_dir):
    """Regression: chat-style input to a saved theta-tiny folder raised "tokenizer.chat_template is not set"."""
    from transformers import pipeline

    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    assert tm.prompt_format.name == "qa"
    assert json.loads((tiny_model_dir / FORMAT_FILE).read_text())["prompt_format"] == "qa"
    question = "What is a firewall?"
    pipe = pipeline("text-generation", model=str(tiny_model_dir), device="cpu")
    out = pipe([{"role": "user", "content": question}], max_new_tokens=6, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    expected = tm.generate(question, max_length=6, temperature=0.0, repetition_penalty=1.0)
    assert reply["content"].strip() == expected


def test_generate_batch_stops_at_the_formats_stop_ids(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    free = tm.generate_batch(["What is DNS?"], max_length=8, temperature=0.0, repetition_penalty=1.0)[0]
    ids = tm.tokenizer(" " + free["text"], add_special_tokens=False)["input_ids"] if free["text"] else []
    if len(ids) < 3:
        pytest.skip("the tiny model stopped at once; nothing to cut")
    stop = ids[2]

    class StopAt(QAFormat):
        def stop_ids(self, generation_config=None):
            return [stop] + super().stop_ids(generation_config)

    tm.prompt_format = StopAt(tm.tokenizer)
    cut = tm.generate_batch(["What is DNS?"], max_length=8, temperature=0.0, repetition_penalty=1.0)[0]
    assert cut["new_tokens"] <= 3 and free["text"].startswith(cut["text"])


def test_conversation_earlier_turns_become_chat_messages(tokenizers):
    tok = tokenizers["qwen2"]
    fmt = resolve_format("chat", tok)
    tm = SimpleNamespace(prompt_format=fmt, context_length=512)
    memory = Conversation(tm, reserve=64)
    memory.add("What is DNS?", "It maps names to addresses.")
    memory.add("And TCP?", "A reliable byte stream.")
    history = memory.history_for("What is UDP?")
    assert history == [("What is DNS?", "It maps names to addresses."), ("And TCP?", "A reliable byte stream.")]
    messages = [{"role": "user", "content": "What is DNS?"}, {"role": "assistant", "content": "It maps names to addresses."},
                {"role": "user", "content": "And TCP?"}, {"role": "assistant", "content": "A reliable byte stream."},
                {"role": "user", "content": "What is UDP?"}]
    assert fmt.encode_prompts([{"question": "What is UDP?", "history": history}])[0] == \
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    # bounded by the context: with room for one turn only, the oldest goes first
    one = memory.prompt_tokens("What is UDP?", history[1:])
    memory.limit = one
    assert memory.history_for("What is UDP?") == history[1:] and memory.turns == history[1:]


def test_the_trainer_refuses_chat_without_a_template_at_start_up(tiny_model_dir, prepared_data, tmp_path):
    import src.training.train_enhanced as te

    assert te.parse_args([]).prompt_format == "auto"
    args = te.parse_args(["--model_name", str(tiny_model_dir), "--data_path", str(prepared_data), "--output_dir",
                          str(tmp_path / "run"), "--epochs", "1", "--no_progress_bar", "--prompt_format", "chat"])
    with pytest.raises(PromptFormatError, match="--prompt_format qa"):
        te.train(args)
    assert not (tmp_path / "run" / "theta_final").exists()


def test_generate_batch_prompts_with_the_chat_template_and_its_stop_ids(family_dirs, tokenizers):
    """A GPT-2 given a ChatML template (the loader for other families is tested elsewhere): what generate receives
    is the template's generation prompt, left-padded, and it stops at the end-of-turn token too."""
    from transformers import GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(family_dirs["gpt2"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = tokenizers["qwen2"].chat_template
    tm = ThetaModel.from_parts(GPT2LMHeadModel.from_pretrained(family_dirs["gpt2"]), tok, device="cpu",
                               prompt_format="chat")
    seen = {}
    real = tm.model.generate

    def recording(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    tm.model.generate = recording
    questions = ["What is DNS?", "How do I reset my password today?"]
    tm.generate_batch(questions, max_length=2, temperature=0.0)
    expected = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"] for q in questions]
    width = max(map(len, expected))
    for row, mask, ids in zip(seen["input_ids"].tolist(), seen["attention_mask"].tolist(), expected):
        assert row[width - len(ids):] == ids and sum(mask) == len(ids) and mask[-1] == 1
    assert seen["generation_config"].eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_chat_run_trains_and_saves_in_its_template(family_dirs, prepared_data, tmp_path):
    """A quick run of a ChatML family with --prompt_format auto: trained in chat, and theta_final/ says so and
    keeps the template and the end-of-turn stop. Runs once ThetaModel loads every family (the model-family work)."""
    import src.training.train_enhanced as te

    try:
        loaded = type(ThetaModel.load(family_dirs["qwen2"], device="cpu").model).__name__
    except Exception as err:  # noqa: BLE001 - whatever the GPT-2-only loader makes of it
        pytest.skip(f"ThetaModel does not load a qwen2 folder yet ({type(err).__name__})")
    if loaded != "Qwen2ForCausalLM":
        pytest.skip(f"ThetaModel loads a qwen2 folder as {loaded}: needs the model-family loader")
    out = tmp_path / "run"
    summary = te.train(te.parse_args(["--model_name", str(family_dirs["qwen2"]), "--data_path", str(prepared_data),
                                      "--output_dir", str(out), "--epochs", "1", "--max_steps", "1",
                                      "--batch_size", "4", "--max_length", "96", "--num_samples", "0",
                                      "--domain_eval_frequency", "0", "--no_progress_bar"]))
    assert summary is not None
    final = out / "theta_final"
    info = json.loads((final / FORMAT_FILE).read_text())
    assert info["prompt_format"] == "chat" and info["end_token"] == "<|im_end|>"
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template == AutoTokenizer.from_pretrained(family_dirs["qwen2"]).chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") in _ids(GenerationConfig.from_pretrained(final).eos_token_id)
    assert ThetaModel.load(final, device="cpu").prompt_format.name == "chat"


def _ids(value) -> list[int]:
    return value if isinstance(value, list) else [value]


def test_a_records_own_system_or_history_keys_do_not_change_its_training_ids(tokenizers):
    """Records of a user's file pass through preparation with every key they had; only question, answer and
    context reach the format (preparation folds conversations into context), so stray keys change nothing."""
    tok = tokenizers["gpt2"]
    plain = {"question": "What is DNS?", "answer": "It maps names.", "domain": "general"}
    stray = dict(plain, system="You are a pirate.", history=[["hi", "hello"], "not a pair"])
    a, b = TokenizedDataset([plain], tok, 256), TokenizedDataset([stray], tok, 256)
    assert a[0]["input_ids"] == b[0]["input_ids"] and a[0]["labels"] == b[0]["labels"]
