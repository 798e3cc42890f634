"""Data preparation end to end: the overnight profiles on general data, the held-out set, repeatable runs, the
question key, language-fair scores, flags, near-duplicates, the process pool, output checks.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_data_pipeline.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections import Counter
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, run_script
from src.data_processing import prepare_data_for_training as prep
from src.data_processing.near_duplicates import find_near_duplicates
from src.data_processing.text_quality import content_flags, quality_score
from src.utils.data_contract import has_code, question_key

CHECK = Path(__file__).parent / "fixtures" / "data_processing" / "domain_check"
LANG = Path(__file__).parent / "fixtures" / "data_processing" / "language_pairs.tsv"


def _rows() -> list[tuple[str, str, str]]:
    rows = []
    for name in ("general.tsv", "technical.tsv"):
        for line in (CHECK / name).read_text(encoding="utf-8").splitlines():
            label, q, a = line.split("\t")
            rows.append((label, q, a.replace("\\n", "\n")))
    return rows


def general_mix(d: Path) -> int:
    """A folder as a new user brings it: Alpaca files (English; Chinese, German, Spanish as JSON Lines) and
    ShareGPT two-turn chats, no domain fields. Returns the number of distinct (question, answer) pairs."""
    d.mkdir(parents=True)
    rows = _rows()
    english = [r for r in rows if r[1].isascii()]
    other = [r for r in rows if not r[1].isascii()]
    alpaca = english[:150]
    chats = english[150:]
    (d / "alpaca_en.json").write_text(json.dumps([{"instruction": q, "input": "", "output": a}
                                                  for _, q, a in alpaca], ensure_ascii=False), encoding="utf-8")
    (d / "alpaca_intl.jsonl").write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False)
                                                 + "\n" for _, q, a in other), encoding="utf-8")
    convs = []
    for k in range(0, len(chats) - 1, 2):
        (_, q1, a1), (_, q2, a2) = chats[k], chats[k + 1]
        convs.append({"id": f"c{k}", "conversations": [{"from": "human", "value": q1}, {"from": "gpt", "value": a1},
                                                       {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]})
    if len(chats) % 2:
        _, q, a = chats[-1]
        convs.append({"id": "last", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    (d / "sharegpt.json").write_text(json.dumps(convs, ensure_ascii=False), encoding="utf-8")
    return len({(q, a) for _, q, a in rows})


@pytest.mark.parametrize("profile", ["quick", "rtx3060", None])
def test_overnight_profiles_keep_general_data(tmp_path, profile):
    d = tmp_path / "Datasets"
    distinct = general_mix(d)
    # as the overnight scripts call it (None: the plain defaults)
    assert prep.main(["--datasets_dir", str(d), *(["--profile", profile] if profile else [])]) == 0
    stats = json.loads((d / "enhanced_data_stats.json").read_text(encoding="utf-8"))
    records = json.loads((d / "enhanced_training_data.json").read_text(encoding="utf-8"))["records"]
    test = json.loads((d / "enhanced_test_set.json").read_text(encoding="utf-8"))
    settings = vars(prep.parse_args(["--profile", profile] if profile else []))
    real = [r for r in records if not r.get("synthetic")]
    kept = {(r["question"], r["answer"]) for r in real} | {(t["question"], t["answer"]) for t in test}
    assert len(kept) >= 0.95 * distinct, (len(kept), distinct)
    added = len(records) - len(real)
    assert added <= settings["synthetic_ratio"] * len(records)
    domains = {r["domain"] for r in records}
    validation = sum(r["split"] == "validation" for r in records)
    assert validation >= 0.1 * len(records) - len(domains)
    weights = {r["domain"]: r["sample_weight"] for r in records if r["split"] == "train"}
    assert max(weights.values()) <= settings["max_repeats"]
    # the realised training mix honours the cap (raised to 1/#domains when lower is impossible)
    train = [r for r in records if r["split"] == "train"]
    drawn = Counter()
    for r in train:
        drawn[r["domain"]] += r["sample_weight"]
    cap = max(settings["max_domain_fraction"], 1 / len(drawn))
    assert max(drawn.values()) / sum(drawn.values()) <= cap + 1e-3
    assert stats["balancing"]["method"] == "weights" and stats["real_kept_share"] >= 0.95


def test_quick_profile_on_the_sample_data_gives_a_few_hundred_records(tmp_path):
    d = tmp_path / "Datasets"  # the shipped files only: a run elsewhere may have left outputs in Datasets/
    shutil.copytree(PROJECT_ROOT / "Datasets", d, ignore=shutil.ignore_patterns("enhanced_*", "knowledge_base"))
    out = tmp_path / "prepared.json"
    assert prep.main(["--profile", "quick", "--datasets_dir", str(d), "--output", str(out)]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    train = sum(r["split"] == "train" for r in records)
    assert 300 <= train <= 600 and len({r["domain"] for r in records}) == 6


def test_profile_flags_and_explicit_flags_win():
    args = prep.parse_args(["--profile", "rtx3060"])
    assert (args.max_domain_fraction, args.min_domain_count, args.synthetic_ratio) == (0.2, 300, 0.1)
    args = prep.parse_args(["--profile", "rtx3060", "--min_domain_count", "0"])
    assert args.min_domain_count == 0 and args.max_domain_fraction == 0.2


# ---------------------------------------------------------------------------------------------------------------
# Held-out set, repeatable runs, question key
# ---------------------------------------------------------------------------------------------------------------

def test_question_key_collisions_are_distinct_keys():
    pairs = [("What is C#?", "What is C++?"), ("What does != mean", "What does == mean"),
             ("什么是机器学习？", "什么是深度学习？"), ("Is a < b?", "Is a > b?")]
    for a, b in pairs:
        assert question_key(a) != question_key(b), (a, b)
    assert question_key("什么是机器学习？") == "什么是机器学习"
    assert question_key("  What IS   DNS?? ") == question_key("what is dns") == "what is dns"
    assert question_key("Ｗｈａｔ ｉｓ ＤＮＳ？") == "what is dns"  # NFKC: full-width letters
    assert question_key("Hello!") == "hello" and question_key("a != b") == "a != b"
    assert has_code("Use:\n```python\nx = 1\n```") and not has_code("Use `x` inline.")


def test_first_run_keeps_test_questions_out_and_second_run_is_byte_identical(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    records = []
    for i in range(120):  # every question asked twice with different answers, in two files
        q = f"What does setting number {i} of the router control?"
        records.append({"id": f"a{i}", "question": q, "answer": f"Setting {i} controls feature {i} of the device."})
        records.append({"id": f"b{i}", "question": q.upper(), "answer": f"It switches feature {i} on or off, "
                                                                        f"as the manual for model {i} says."})
    (d / "one.json").write_text(json.dumps(records[::2]), encoding="utf-8")
    (d / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1::2]), encoding="utf-8")
    args = ["--datasets_dir", str(d), "--seed", "3"]
    assert prep.main(args) == 0
    first = (d / "enhanced_training_data.json").read_bytes()
    test = json.loads((d / "enhanced_test_set.json").read_text(encoding="utf-8"))
    test_keys = {question_key(t["question"]) for t in test}
    train = json.loads(first)["records"]
    assert test and not {question_key(r["question"]) for r in train} & test_keys
    # both copies of a held-out question went to the test set: none lost
    assert sum(not r.get("synthetic") for r in train) + len(test) == 240
    assert prep.main(args) == 0  # the drawn test set is drawn again: the same one
    assert (d / "enhanced_training_data.json").read_bytes() == first


def test_output_folder_is_an_error_before_anything_is_written(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([{"question": "Q?", "answer": "A."}]), encoding="utf-8")
    (tmp_path / "folder").mkdir()
    res = run_script(["-m", "src.data_processing.prepare_data_for_training", "--datasets_dir", str(d),
                      "--output", str(tmp_path / "folder")])
    assert res.returncode == 2 and "is a folder" in res.stderr and "Traceback" not in res.stderr
    assert not (d / "enhanced_test_set.json").exists()
    with pytest.raises(prep.UserError, match="does not exist"):
        prep.main(["--datasets_dir", str(tmp_path / "missing")])


def test_outputs_get_the_umask_mode(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([{"question": f"Question {i}?", "answer": f"Answer {i}."}
                                          for i in range(20)]), encoding="utf-8")
    old = os.umask(0o022)
    try:
        assert prep.main(["--datasets_dir", str(d), "--near_dup_threshold", "1"]) == 0
    finally:
        os.umask(old)
    for name in ("enhanced_training_data.json", "enhanced_data_stats.json", "enhanced_test_set.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o644, name


def test_two_workers_give_the_same_output_as_one(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    rows = _rows()
    (d / "a.json").write_text(json.dumps([{"question": q, "answer": a} for _, q, a in rows] +
                                         [{"question": "", "answer": "x"}, {"question": "dup", "answer": "same"},
                                          {"question": "dup", "answer": "same"}], ensure_ascii=False),
                              encoding="utf-8")
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}" / "p.json"
        assert prep.main(["--datasets_dir", str(d), "--output", str(out), "--no-create_test_set", "--workers",
                          workers]) == 0
        stats = json.loads((out.parent / "enhanced_data_stats.json").read_text(encoding="utf-8"))
        outs.append((out.read_bytes(), stats["dropped"]))
    assert outs[0] == outs[1]
    assert outs[0][1]["empty_question"]["count"] == 1 and outs[0][1]["exact_duplicate"]["count"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Scores, flags, near-duplicates
# ---------------------------------------------------------------------------------------------------------------

def test_quality_fair_across_languages():
    """The same Q&A written in English and in Chinese (and German) score alike on average."""
    by_lang: dict[str, list[float]] = {"en": [], "zh": [], "de": []}
    for line in LANG.read_text(encoding="utf-8").splitlines():
        en_q, en_a, zh_q, zh_a, de_q, de_a = line.split("\t")
        by_lang["en"].append(quality_score(en_q, en_a))
        by_lang["zh"].append(quality_score(zh_q, zh_a))
        by_lang["de"].append(quality_score(de_q, de_a))
    mean = {k: sum(v) / len(v) for k, v in by_lang.items()}
    assert len(by_lang["en"]) >= 10
    assert abs(mean["en"] - mean["zh"]) <= 0.05, mean
    assert abs(mean["en"] - mean["de"]) <= 0.05, mean


def test_placeholders_and_orphan_media_tokens_flagged_and_counted(tmp_path):
    assert content_flags("Write to {{customer_name}} about the delay.", "Dear customer...") == ["placeholder"]
    assert content_flags("Explain it.", "It covers [SPECIFIC CONCEPTS] in depth.") == ["placeholder"]
    assert content_flags("<image>\nWhat is in this picture?", "A cat on a sofa.") == ["missing_media"]
    assert content_flags("What does {x: 1} mean in Python?", "A dict literal [1, 2].") == []
    d = tmp_path / "Datasets"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([
        {"question": "Write to {{customer_name}} about the delay.", "answer": "Dear {{customer_name}}, sorry."},
        {"question": "<image>\nWhat is in this picture?", "answer": "A cat on a sofa."},
        {"question": "What is a good name for a cat?", "answer": "Try Mittens or Pepper."}]), encoding="utf-8")
    stats, records = _run(d)
    assert [r["question"] for r in records] == ["What is a good name for a cat?"]
    assert stats["dropped"]["placeholder_text"]["count"] == 1 and stats["dropped"]["missing_media"]["count"] == 1
    stats, records = _run(d, "--keep_flagged")
    assert len(records) == 3 and stats["flagged"] == {"missing_media": 1, "placeholder": 1}


def test_near_duplicates_need_question_and_answer_close():
    preamble = ("You are given a customer review from an online shop. Read it carefully, think about the tone "
                "and the details the customer mentions, and then answer the task below in one sentence. ")
    q1, a1 = preamble + "Task: summarise the review about the blue kettle.", "The kettle boils fast but leaks."
    q2, a2 = preamble + "Task: summarise the review about the garden chair.", "The chair is sturdy and comfortable."
    pairs = [(q1, a1), (q2, a2)]
    texts = [f"{q} {a}" for q, a in pairs]
    # combined text alone would call them duplicates...
    assert find_near_duplicates(texts, [0.5, 0.5], 0.6) != []
    # ...question and answer both close is required
    assert find_near_duplicates(texts, [0.5, 0.5], 0.6, pairs=lambda i: pairs[i]) == []
    long_a = "Subnetting splits one address block into smaller networks so routing tables stay small and tidy"
    pairs = [("What is subnetting used for?", long_a), ("What is subnetting mostly used for?", long_a + " today")]
    found = find_near_duplicates([f"{q} {a}" for q, a in pairs], [0.9, 0.5], 0.8, pairs=lambda i: pairs[i])
    assert [(i, j) for i, j, _ in found] == [(1, 0)]
    # question words 5/6, answer 3-grams 14/15: the similarity is the smaller one
    assert found[0][2] == pytest.approx(round(5 / 6, 4))


def _run(d: Path, *extra: str):
    out = d.parent / "out" / "p.json"
    assert prep.main(["--datasets_dir", str(d), "--output", str(out), "--no-create_test_set", "--near_dup_threshold",
                      "1", "--synthetic_ratio", "0", "--min_domain_count", "0", *extra]) == 0
    stats = json.loads((out.parent / "enhanced_data_stats.json").read_text(encoding="utf-8"))
    return stats, json.loads(out.read_text(encoding="utf-8"))["records"]
