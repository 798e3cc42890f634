"""Every accepted input shape read the right way (src/data_processing/record_shapes.py and loading.py), on small
hand-written fixtures in tests/fixtures/data_processing/shapes/.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_data_shapes.py -q
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from src.data_processing import prepare_data_for_training as prep
from src.data_processing.convert_chat import convert_chat
from src.data_processing.record_shapes import shape_item

SHAPES = Path(__file__).parent / "fixtures" / "data_processing" / "shapes"
OFF = ["--max_domain_fraction", "1", "--min_domain_count", "0", "--synthetic_ratio", "0", "--near_dup_threshold", "1",
       "--no-create_test_set"]


def _raw_items(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """One preparation of the whole shapes folder (plus a Parquet file written by ``datasets``)."""
    import datasets

    d = tmp_path_factory.mktemp("shapes") / "Datasets"
    shutil.copytree(SHAPES, d)
    datasets.Dataset.from_dict({"question": ["How many strings does a violin have?"],
                                "answer": ["A violin has four strings."]}).to_parquet(str(d / "table.parquet"))
    with gzip.open(d / "packed.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"question": "What do pandas eat?", "answer": "Mostly bamboo."}) + "\n")
    (d / "archive.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    out = d.parent / "out" / "enhanced_training_data.json"
    assert prep.main(["--datasets_dir", str(d), "--output", str(out), *OFF]) == 0
    stats = json.loads((out.parent / "enhanced_data_stats.json").read_text(encoding="utf-8"))
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    return stats, {r["id"]: r for r in records}


def test_dolly_alpaca_system_history_prompt_completion(shapes_run):
    _, by_id = shapes_run
    dolly = by_id["dolly.jsonl#0"]
    assert (dolly["question"], dolly["answer"], dolly["category"]) == (
        "When did the library open?", "It opened in 1902.", "closed_qa")
    assert dolly["context"] == "The town library opened in 1902 and moved to the market square in 1968."
    assert "context" not in by_id["dolly.jsonl#1"]  # an empty context is no context
    alpaca = by_id["alpaca_history.json#0"]
    assert alpaca["context"] == ("You are a patient baking teacher.\n\n"
                                 "User: How much yeast does one loaf need?\n"
                                 "Assistant: About seven grams of dried yeast for 500 grams of flour.\n\n"
                                 "User: Should the water be warm?\n"
                                 "Assistant: Yes, lukewarm water helps the yeast start.")
    assert by_id["alpaca_history.json#1"]["question"] == "Translate to German.\n\nGood morning"
    assert by_id["prompt_completion.jsonl#0-t0"]["answer"].startswith("Start with one ball")
    assert by_id["prompt_completion.jsonl#1-t0"]["answer"] == "Try knitting; the repetition is relaxing."


def test_tables_and_conversation_lists(shapes_run):
    _, by_id = shapes_run
    assert by_id["table.csv#1"]["answer"] == "Mars is called the red planet, because of iron oxide on its surface."
    assert by_id["table.tsv#0"]["question"] == "What is the boiling point of water at sea level?"
    assert by_id["table.parquet#0"]["answer"] == "A violin has four strings."
    assert by_id["tc1-t1"]["context"] == ("User: What is a haiku?\nAssistant: A haiku is a short poem of three lines "
                                          "with five, seven and five syllables.")
    assert by_id["tc2-t0"]["answer"] == "A spider has eight legs."
    assert by_id["bare_messages.jsonl#0-t0"]["answer"] == "Mixing blue and yellow gives green."
    assert by_id["packed.jsonl.gz#0"]["answer"] == "Mostly bamboo."


def test_preference_and_kto_never_train_a_rejected_or_false_answer(shapes_run):
    stats, by_id = shapes_run
    bad = set()  # independent oracle: every rejected reply and label-false completion, read from the raw files
    for item in _raw_items(SHAPES / "kto.jsonl"):
        if item["label"] is False:
            bad.add(item["completion"])
    for item in _raw_items(SHAPES / "dpo.jsonl"):
        rej = item["rejected"]
        bad.add(rej if isinstance(rej, str) else rej[-1]["content"])
    for item in _raw_items(SHAPES / "sharegpt_preference.json"):
        bad.add(item["rejected"]["value"])
    answers = {r["answer"] for r in by_id.values()}
    assert len(bad) == 5 and not answers & bad
    assert by_id["dpo.jsonl#1-t0"]["answer"] == "Yes, a light meal before swimming is fine for most people."
    assert by_id["sharegpt_preference.json#0-t0"]["answer"].startswith("Bring a blanket")
    assert by_id["sharegpt_preference.json#0-t0"]["context"] == "Answer kindly."
    assert stats["dropped"]["undesirable_example"]["count"] == 2
    assert stats["set_aside"]["rejected_reply_not_trained"] == 3


def test_tool_calls_are_context_of_the_answer_never_repaired(shapes_run):
    _, by_id = shapes_run
    weather = by_id["w1-t0"]
    assert weather["question"] == "Do I need an umbrella in Lisbon today?"
    assert weather["context"] == ('You can look up the weather.\nTools: get_weather\n\n'
                                  'Tool call: {"name": "get_weather", "arguments": {"city": "Lisbon"}}\n\n'
                                  'Tool result: {"rain_probability": 0.8}')
    money = by_id["openai_tools.jsonl#0-t0"]
    assert money["question"] == "How much is 20 euros in yen?"  # content-part list read as text
    assert money["context"].endswith("Tool call: convert({\"amount\": 20, \"from\": \"EUR\", \"to\": \"JPY\"})"
                                     "\n\nTool result: 3240")
    # the assistant turn that only calls the tool is no record
    assert [i for i in by_id if i.startswith("openai_tools.jsonl#0")] == ["openai_tools.jsonl#0-t0"]
    dropped = shape_item(_raw_items(SHAPES / "sharegpt_tools.json")[0], tool_calls="drop")
    assert dropped.records == [] and dropped.reason == "tool_call_conversation"


def test_text_only_refused_and_other_files_listed_with_their_converter(shapes_run):
    stats, _ = shapes_run
    assert stats["dropped"]["pretraining_text"]["examples"][0]["source"] == "pretraining.jsonl"
    assert "pre-training text" in stats["dropped"]["pretraining_text"]["examples"][0]["detail"]
    skipped = {s["file"]: s for s in stats["skipped_files"]}
    assert skipped["Posts.xml"]["converter"] == "convert_stackexchange" and skipped["notes.md"]["converter"] == \
        "convert_faq" and skipped["archive.zip"]["converter"] is None
    assert "python -m src.data_processing.convert_faq" in skipped["notes.md"]["hint"]
    assert skipped["archive.zip"]["hint"].startswith("a packed file: unpack it")
    # each is a problem the user sees, named with what to do (never "read it with none")
    not_read = {p["file"]: p for p in stats["problems"] if p["kind"] == "not_read"}
    assert set(not_read) == {"Posts.xml", "notes.md", "archive.zip"}
    assert all(" none" not in p["fix"] for p in not_read.values())
    # every item is accounted for: records out + drops = items in
    assert stats["loaded_records"] == stats["output_records"]


def test_multi_turn_context_is_the_same_in_prepare_and_the_converter(tmp_path):
    conv = {"id": "m", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "An apple."},
        {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "A pear."},
        {"from": "human", "value": "And a third?"}, {"from": "gpt", "value": "A plum."}]}
    (tmp_path / "chat.json").write_text(json.dumps([conv]), encoding="utf-8")
    for turns in (1, 3):
        converted = convert_chat(tmp_path / "chat.json", max_history_turns=turns)
        shaped = shape_item(conv, max_history_turns=turns).records
        assert [(r["question"], r["answer"], r.get("context")) for r in converted] == \
            [(r["question"], r["answer"], r.get("context")) for r in shaped]
    last = shape_item(conv, max_history_turns=1).records[-1]
    assert last["context"] == "Be brief.\n\nUser: Another one?\nAssistant: A pear."  # bounded to one exchange
    unanswered = shape_item({"conversations": conv["conversations"] + [{"from": "human", "value": "Bye?"}]})
    assert unanswered.notes["unanswered_last_turn"] == 1 and len(unanswered.records) == 3


def test_hf_dataset_from_a_saved_folder_and_a_clear_error_offline(tmp_path, monkeypatch):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({
        "instruction": ["Name a primary colour."], "output": ["Red is a primary colour."]}),
        "test": datasets.Dataset.from_dict({"question": ["q?"], "answer": ["a."]})}).save_to_disk(str(saved))
    d = tmp_path / "Datasets"
    d.mkdir()
    out = tmp_path / "out" / "prepared.json"
    assert prep.main(["--datasets_dir", str(d), "--hf_dataset", f"{saved}:train", "--output", str(out), *OFF]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert [(r["question"], r["answer"], r["source"]) for r in records] == [
        ("Name a primary colour.", "Red is a primary colour.", f"hf:{saved}:train")]
    local = tmp_path / "local_ds"  # a plain folder of data files, read by datasets.load_dataset
    local.mkdir()
    (local / "train.jsonl").write_text(json.dumps({"prompt": "Name a planet.", "completion": "Venus."}) + "\n",
                                       encoding="utf-8")
    assert prep.main(["--datasets_dir", str(d), "--hf_dataset", str(local), "--output", str(out), *OFF]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert [(r["question"], r["answer"]) for r in records] == [("Name a planet.", "Venus.")]
    with pytest.raises(prep.UserError, match="no split 'validation'"):
        prep.main(["--datasets_dir", str(d), "--hf_dataset", f"{saved}:validation", "--output", str(out), *OFF])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(prep.UserError, match="cannot be reached offline"):
        prep.main(["--datasets_dir", str(d), "--hf_dataset", "someone/not-cached-anywhere", "--output", str(out),
                   *OFF])
