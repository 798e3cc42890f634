"""Data preparation: streaming loader, validation, dedup, scores, balancing, augmentation, split, CLI.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_prepare_data.py -q
"""

from __future__ import annotations

import io
import json
from collections import Counter
import shutil
import unicodedata
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, run_script
from src.data_processing import prepare_data_for_training as prep
from src.data_processing.augmentation import Augmenter, inversion, rephrasings
from src.data_processing.json_stream import iter_json_items, iter_jsonl_items
from src.data_processing.near_duplicates import MinHasher, choose_bands, find_near_duplicates
from src.data_processing.text_quality import difficulty, normalise_text, quality_components, quality_score

OFF = ["--max_domain_fraction", "1", "--min_domain_count", "0", "--synthetic_ratio", "0"]


def rec(i, domain="networking", q=None, a=None, **extra):
    return {"id": f"r{i}", "domain": domain, "question": q or f"What does protocol number {i} handle?",
            "answer": a or f"Protocol number {i} handles a distinct kind of traffic {i} on the network.", **extra}


def write(d: Path, name: str, data) -> Path:
    path = d / name
    if isinstance(data, (bytes, str)):
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(x) + "\n" for x in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def run_prepare(d: Path, *extra: str) -> tuple[dict, list[dict]]:
    out = d / "out" / "enhanced_training_data.json"
    assert prep.main(["--datasets_dir", str(d), "--output", str(out), "--no-create_test_set", *extra]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["format_version"] == prep.PREPARED_FORMAT_VERSION == 2
    return json.loads((d / "out" / "enhanced_data_stats.json").read_text(encoding="utf-8")), data["records"]


# ---------------------------------------------------------------------------------------------------------------
# Streaming JSON
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [3, 17, 1 << 20])
def test_stream_array_matches_json_loads_at_any_chunk_size(chunk):
    data = [{"question": f"q{i} \u00e9", "answer": "x" * (i % 40), "n": i * 1.5} for i in range(300)] + [7, "s"]
    text = json.dumps(data, indent=2, ensure_ascii=False)
    items = list(iter_json_items(io.BytesIO(text.encode("utf-8")), chunk))
    assert [it.value for it in items] == data
    assert [it.index for it in items] == list(range(len(data)))
    assert items[1].line == text.splitlines().index("  {", 2) + 1  # line of the second element's "{"


def test_stream_wrapper_object_and_concatenated_objects():
    wrapped = b'{"meta": {"v": 1}, "qa_pairs": [{"question": "a"}, {"question": "b"}]}'
    assert [it.value for it in iter_json_items(io.BytesIO(wrapped), 5)] == [{"question": "a"}, {"question": "b"}]
    assert [it.value for it in iter_json_items(io.BytesIO(b'{"a": 1}\n{"a": 2}'))] == [{"a": 1}, {"a": 2}]


def test_stream_reports_line_and_column_then_stops():
    text = b'[\n  {"question": "a", "answer": "b"},\n  {"question": "c" "answer": "d"}\n]'
    items = list(iter_json_items(io.BytesIO(text), 4))
    assert items[0].value == {"question": "a", "answer": "b"}
    assert items[1].error == "line 3, column 20: Expecting ',' delimiter" and items[1].fatal
    assert len(items) == 2


def test_jsonl_bad_line_reported_and_reading_goes_on():
    items = list(iter_jsonl_items(io.BytesIO(b'{"a": 1}\n\n{"a": \n{"a": 3}\n')))
    assert [(it.index, it.value, it.error) for it in items] == [
        (0, {"a": 1}, None), (2, None, "line 3, column 7: Expecting value"), (3, {"a": 3}, None)]


# ---------------------------------------------------------------------------------------------------------------
# Normalisation, quality, difficulty
# ---------------------------------------------------------------------------------------------------------------

def test_normalise_nfc_in_prose_code_byte_for_byte():
    decomposed = "Cafe\u0301"  # e + combining acute
    code = "```python\nx = 'Cafe\u0301'   \r\n\tprint(x)  \n```"
    text = f"  {decomposed} menu.   \r\n{code}\n  trailing  "
    out = normalise_text(text)
    assert out.startswith(unicodedata.normalize("NFC", decomposed) + " menu.\n")
    assert code in out  # untouched: decomposed accent, trailing spaces, CRLF, tab
    assert out.endswith("\n  trailing")


def test_quality_score_hand_computed_good_example():
    q, a = "What is DNS caching?", "DNS caching stores answers to recent lookups so repeated queries are faster."
    parts = quality_components(q, a)
    # 12 words -> length (12 - 3) / 17; "caching" shared -> relevance 1; ends with "."; no fences; no repeats.
    assert parts == pytest.approx({"length": 9 / 17, "relevance": 1.0, "formatting": 1.0, "code": 1.0,
                                   "repetition": 1.0, "boilerplate": 1.0})
    assert quality_score(q, a) == 0.8824  # 0.25 * 9/17 + 0.20 + 0.10 + 0.15 * 3


def test_quality_score_hand_computed_bad_example():
    q, a = "Explain the firewall rules?", "todo todo todo todo"
    parts = quality_components(q, a)
    # 4 words -> 1/17; no shared word; no final punctuation -> 0.5; 1 of 2 trigrams distinct; "todo" boilerplate.
    assert parts == pytest.approx({"length": 1 / 17, "relevance": 0.0, "formatting": 0.5, "code": 1.0,
                                   "repetition": 0.5, "boilerplate": 0.5})
    assert quality_score(q, a) == 0.3647  # 0.25/17 + 0.05 + 0.15 + 0.075 + 0.075


def test_quality_code_part():
    good = "Use this:\n```python\nprint(1)\n```"
    assert quality_components("Print?", good)["code"] == 1.0
    assert quality_components("Print?", "Use:\n```python\n```")["code"] == 0.5
    assert quality_components("Print?", "Use:\n```python\nprint(1)")["code"] == 0.0


def test_difficulty_hand_computed():
    answer = "First, install the package.\nThen run it:\n```bash\npip install x\n```"
    assert difficulty("How do I install it?", answer, True) == 3  # 1 + code + two step markers
    assert difficulty("What is DNS?", "DNS maps names to addresses.", False) == 2  # 1 + DNS is 1 of 5 words
    long_q = " ".join(["word"] * 25) + "?"
    assert difficulty(long_q, "plain words only here", False) == 2


# ---------------------------------------------------------------------------------------------------------------
# Loading a broken folder
# ---------------------------------------------------------------------------------------------------------------

def test_broken_folder_good_records_through_bad_ones_reported(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    good = [rec(i) for i in range(6)]
    write(d, "good.json", good[:3])
    write(d, "good.jsonl", good[3:])
    write(d, "broken.json", '[\n  {"question": "Q?", "answer": "A."},\n  {"question": oops}\n]')
    write(d, "shapes.json", [{"foo": 1}, 42, {"question": "", "answer": "x"}, {"question": "Q", "answer": 5},
                             {"question": "Bell\x07?", "answer": "ring"}, {"answer": "no question"}])
    write(d, "junk.json", bytes(range(256)) * 4)
    write(d, "bad_utf8.jsonl", b'{"question": "caf\xe9?", "answer": "broken byte"}\n'
                               + json.dumps(rec(99)).encode() + b"\n")
    (d / "notes.txt").write_text("ignored", encoding="utf-8")
    stats, records = run_prepare(d, *OFF)
    ids = {r["id"] for r in records}
    assert {f"r{i}" for i in range(6)} | {"r99", "broken.json#0"} == ids
    dropped = stats["dropped"]
    assert dropped["invalid_json"]["count"] == 2
    errors = {e["source"]: e["detail"] for e in dropped["invalid_json"]["examples"]}
    assert errors["broken.json"] == "line 3, column 16: Expecting value"
    assert errors["junk.json"].startswith("line 1, column 1")
    assert dropped["unsupported_shape"]["count"] == 2
    assert dropped["empty_question"]["count"] == 1
    assert dropped["wrong_type_answer"]["count"] == 1
    assert dropped["control_characters"]["count"] == 1
    assert dropped["missing_question"]["count"] == 1
    assert dropped["invalid_utf8"]["examples"][0] == {"source": "bad_utf8.jsonl", "index": 0, "line": 1,
                                                      "detail": "question holds bytes that are not UTF-8"}
    assert stats["per_file"]["broken.json"]["error"].startswith("line 3")
    assert stats["per_file"]["shapes.json"]["dropped"] == {"unsupported_shape": 2, "empty_question": 1,
                                                          "wrong_type_answer": 1, "control_characters": 1,
                                                          "missing_question": 1}


def test_strict_makes_a_problem_fatal_without_traceback(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    write(d, "good.json", [rec(1)])
    write(d, "broken.json", '[{"question": "Q?",\n "answer": }]')
    res = run_script(["-m", "src.data_processing.prepare_data_for_training", "--datasets_dir", str(d), "--strict",
                      "--no-create_test_set", *OFF])
    assert res.returncode == 2
    assert "error: --strict: invalid_json in broken.json" in res.stderr and "line 2, column 12" in res.stderr
    assert "Traceback" not in res.stderr


def test_no_usable_record_is_a_clear_error(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    write(d, "empty.json", [{"question": " ", "answer": "x"}])
    with pytest.raises(prep.UserError, match="no usable record"):
        prep.main(["--datasets_dir", str(d), "--no-create_test_set"])


def test_fifty_megabyte_file_streams(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    padding = "p" * 100_000  # an unused field: the file is big, the records few
    with (d / "big.json").open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(500):
            fh.write((",\n" if i else "") + json.dumps({**rec(i), "notes": padding}))
        fh.write("\n]")
    assert (d / "big.json").stat().st_size > 50_000_000
    stats, records = run_prepare(d, *OFF, "--near_dup_threshold", "1")
    assert len(records) == 500 and stats["dropped_total"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Domains, dedup, test set
# ---------------------------------------------------------------------------------------------------------------

def test_own_domain_names_are_kept_as_written_without_aliases(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    write(d, "a.json", [rec(1, domain="Cyber Security"), rec(2, domain="ML"), rec(3, domain="networking"),
                        rec(4, domain="", q="How do I stop phishing?", a="Train people and use MFA against attack.")])
    _, records = run_prepare(d, *OFF)
    by_id = {r["id"]: r for r in records}
    assert by_id["r1"]["domain"] == "cyber_security" and "domain_inferred" not in by_id["r1"]
    assert by_id["r2"]["domain"] == "ml"
    # no field and a file name that names nothing: the classifier, among this data's domains
    assert by_id["r4"]["domain_inferred"] is True and by_id["r4"]["domain_source"] == "classifier"
    assert by_id["r4"]["domain"] in {"cyber_security", "ml", "networking", "general"}


def test_exact_duplicate_keeps_the_better_copy(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    a = "TCP delivers a reliable ordered stream of bytes between two hosts on a network"
    write(d, "a.json", [rec(1, q="What does TCP do?", a=a.upper() + "."), rec(2, q="what does  TCP do?", a=a + ".")])
    stats, records = run_prepare(d, *OFF)
    # Same text up to case and spaces, but r1 shouts (formatting 0.5): the second copy is better and stays.
    assert [r["id"] for r in records] == ["r2"]
    assert stats["dropped"]["exact_duplicate"]["examples"][0]["detail"] == "same as r2"


def test_near_duplicates_found_and_better_copy_kept():
    base = "A firewall filters incoming and outgoing network traffic using ordered rules that allow or deny " \
           "each connection based on addresses ports and protocols"
    texts = [base, base + " carefully", "Completely different text about cooking pasta in salted water tonight",
             base.replace("ordered", "sorted")]
    found = find_near_duplicates(texts, [0.5, 0.9, 0.7, 0.6], threshold=0.8)
    # base: 23 words, 21 trigrams. Text 1 (best quality) adds one: J(0, 1) = 21/22. Text 3 changes one word,
    # so 3 trigrams: J(3, 1) = 18 / (22 + 21 - 18) = 0.72, under 0.8.
    assert found == [(0, 1, 0.9545)]
    assert find_near_duplicates(texts, [0.5, 0.9, 0.7, 0.6], threshold=0.6) == [(0, 1, 0.9545), (3, 1, 0.72)]
    assert choose_bands(32, 0.8) == (8, 4)


def test_minhash_deterministic_and_estimates_jaccard():
    texts = ["one two three four five six seven eight nine ten", "one two three four five six seven eight nine"]
    s1 = MinHasher(64, seed=3).signatures(texts)
    s2 = MinHasher(64, seed=3).signatures(texts)
    assert (s1 == s2).all() and s1.shape == (2, 64)
    assert 0.7 <= (s1[0] == s1[1]).mean() <= 1.0  # true Jaccard 7/8


def test_test_set_duplicates_and_near_duplicates_removed(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    long_a = "Subnetting splits one address block into smaller networks so that routing tables stay small and " \
             "broadcast domains stay contained within each department of the organisation"
    test = [rec(100, q="What is subnetting used for?", a=long_a), rec(101, q="Which port does SSH use?",
                                                                     a="SSH listens on port 22 by default.")]
    write(d, "test_set.json", test)
    write(d, "train.json", [rec(1), rec(2, q="Which port does SSH use?", a="Port 22."),
                            rec(3, q="What is subnetting mostly used for?", a=long_a + " today")])
    stats, records = run_prepare(d, *OFF)
    assert [r["id"] for r in records] == ["r1"]
    assert stats["dropped"]["test_set_duplicate"]["examples"][0]["detail"] == "r2"
    assert stats["dropped"]["test_set_near_duplicate"]["examples"][0]["detail"].startswith("r3 ~ test r100")
    assert stats["test_records"] == 2


def test_paraphrases_of_a_held_out_question_leave_the_training_data(tmp_path):
    """The evaluator's near-duplicate measure, applied by preparation: a paraphrase or a typo of a held-out
    question with its answer is dropped from training, so a held-out set preparation kept apart is never
    flagged by the evaluator."""
    d = tmp_path / "Datasets"
    d.mkdir()
    answer = "A firewall filters network traffic by ordered rules that allow or deny each connection."
    write(d, "test_set.json", [rec(100, q="What is a firewall?", a=answer)])
    paraphrases = ["What's a firewall?", "What is a firewal?", "What is the firewall?", "A firewall is what?"]
    write(d, "train.json", [rec(i, q=q, a=answer) for i, q in enumerate(paraphrases)] + [rec(9)])
    stats, records = run_prepare(d, *OFF)
    assert [r["id"] for r in records] == ["r9"]
    assert stats["dropped"]["test_set_near_duplicate"]["count"] == 4
    from src.data_processing.near_duplicates import pair_similarity

    assert all(pair_similarity((q, answer), ("What is a firewall?", answer)) == 1.0 for q in paraphrases)
    assert pair_similarity(("What is a router?", answer), ("What is a firewall?", answer)) == 0.5  # 2 of 4 words


# ---------------------------------------------------------------------------------------------------------------
# Split, balancing, augmentation
# ---------------------------------------------------------------------------------------------------------------

def test_split_stable_when_a_file_is_added_and_topped_up_to_the_fraction(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    write(d, "a.json", [rec(i) for i in range(60)] + [rec(i, domain="programming") for i in range(60, 120)])
    _, first = run_prepare(d, *OFF, "--validation_fraction", "0.2", "--near_dup_threshold", "1")
    write(d, "b.jsonl", [rec(i, domain=("networking", "programming")[i % 2]) for i in range(200, 260)])
    _, second = run_prepare(d, *OFF, "--validation_fraction", "0.2", "--near_dup_threshold", "1")
    below = {r["id"] for r in second if prep.stable_fraction(f"42:{r['id']}") < 0.2}
    for records in (first, second):
        # the hash draw decides first; the top-up only adds records to validation
        assert all(r["split"] == "validation" for r in records if r["id"] in below)
        for domain in ("networking", "programming"):
            recs = [r for r in records if r["domain"] == domain]
            assert sum(r["split"] == "validation" for r in recs) >= int(0.2 * len(recs))
    before = {r["id"]: r["split"] for r in first}
    moved = [i for i, s in before.items() if s != {r["id"]: r["split"] for r in second}[i]]
    assert len(moved) <= 4  # only top-up records near the threshold may move


def test_an_impossible_cap_is_raised_to_one_over_the_domain_count():
    cap, note = prep.effective_cap(0.2, 3)
    assert cap == pytest.approx(1 / 3) and "impossible with 3 domains" in note
    assert prep.effective_cap(0.2, 1) == (1.0, None)  # one domain: nothing to balance, no note


def _scored(records):
    out = []
    for r in records:
        clean = prep.validate_record({**r, "source": "s.json", "source_index": 0}, prep.DropLog(), 10_000)
        out.append(clean)
    prep.compute_quality_scores(out)
    prep.split_records(out, 0.0, 1)
    return out


def test_balance_by_weights_keeps_every_record_and_realises_the_mix():
    records = _scored([rec(i, domain="big") for i in range(40)] + [rec(i, domain="small") for i in range(40, 50)])
    out, report = prep.balance_domains(records, max_fraction=0.6, min_count=0, seed=1)
    assert out is records and len(out) == 50 and not any(r.get("synthetic") for r in out)
    # Water-filling by hand: big 0.8 > cap 0.6 -> 0.6, small gets the rest 0.4.
    # weight = share * 50 / n: big 0.6 * 50 / 40 = 0.75, small 0.4 * 50 / 10 = 2.
    assert report["weights"] == {"big": 0.75, "small": 2.0}
    assert {r["domain"]: r["sample_weight"] for r in out} == {"big": 0.75, "small": 2.0}
    assert report["share_before"] == {"big": 0.8, "small": 0.2} and report["share_after"] == {"big": 0.6, "small": 0.4}
    assert sum(r["sample_weight"] for r in out) == pytest.approx(50)  # mean weight 1


def test_balance_without_training_records_still_weighs_every_record_regression():
    """Bug: a folder whose only record drew validation reached the writer without a sample_weight (KeyError)."""
    records = _scored([rec(1)])
    records[0]["split"] = "validation"
    out, report = prep.balance_domains(records, 0.3, 100)
    assert out[0]["sample_weight"] == 1.0 and report["weights"] == {}


def test_balance_floor_bounded_by_max_repeats_and_target_mix():
    records = _scored([rec(i, domain="a") for i in range(60)] + [rec(i, domain="b") for i in range(60, 70)])
    _, report = prep.balance_domains(records, 1.0, 50, max_repeats=2.0)
    # b wants 50 draws, bounded to 2 x 10 = 20: shares 60/80 and 20/80; weights 0.75 * 70 / 60, 0.25 * 70 / 10
    assert report["weights"] == {"a": 0.875, "b": 1.75}
    assert any("bounded to 20" in n for n in report["notes"])
    records = _scored([rec(i, domain="a") for i in range(30)] + [rec(i, domain="b") for i in range(30, 40)])
    _, report = prep.balance_domains(records, 1.0, 0, target={"a": 1, "b": 1})
    assert report["weights"] == {"a": pytest.approx(0.666667), "b": 2.0}


def test_balance_materialised_cap_once_bounded_repeats_and_synthetic_budget():
    records = _scored([rec(i, domain="a") for i in range(30)] + [rec(i, domain="b") for i in range(30, 40)])
    drops = prep.DropLog()
    out, report = prep.balance_domains(records, 1.0, 0, target={"a": 1, "b": 1}, allow_synthetic=False,
                                       materialise=True, synthetic_ratio=0.5, drops=drops)
    assert report["after"] == {"a": 20, "b": 20} and drops.counts["domain_cap"] == 10
    assert report["repeated_added"] == {"b": 10} and not report["synthetic_added"]
    reps = [r for r in out if r.get("augmentation") == "repeat"]
    assert all(r["id"] == f"{r['origin']}~rep1" and r["answer"] for r in reps)
    # floor 300 on 10 records: at most 3 repeats each, and synthetic + repeats <= 10% of the output
    out, report = prep.balance_domains(records, 1.0, 300, allow_synthetic=False, materialise=True,
                                       synthetic_ratio=0.1)
    added = sum(1 for r in out if r.get("synthetic"))
    assert added == 4 and added <= 0.1 * len(out)  # floor((0.1 * 40) / 0.9) = 4
    assert max(Counter(r["origin"] for r in out if r.get("synthetic")).values()) <= 3
    assert any("--synthetic_ratio 0.1 allows 4" in n for n in report["notes"])


def test_synthetic_examples_keep_code_and_are_deterministic():
    code_answer = "Use a comprehension.\n```python\nsquares = [n * n for n in range(10)]\n```\nIt is short."
    base = [rec(1, "programming", "What is a list comprehension?", "A list comprehension is a compact way to "
                "build a list from an iterable.\nMore text."),
            rec(2, "programming", "How do I square numbers in a list?", code_answer),
            rec(3, "programming", "What is a list of numbers used for?", "Storing values in order.")]
    records = _scored(base)
    first = prep.generate_synthetic_examples(records, 1.0, seed=5)
    again = prep.generate_synthetic_examples(records, 1.0, seed=5)
    assert first == again and len(first) == 3
    for s in first:
        assert s["synthetic"] is True and s["origin"] in {"r1", "r2", "r3"}
        origin = next(r for r in records if r["id"] == s["origin"])
        if s["augmentation"] == "rephrase":
            assert s["answer"] == origin["answer"]  # byte for byte, code and newlines included
    assert rephrasings("What is a list comprehension?")[0] == "Can you explain what a list comprehension is?"
    assert inversion("What is a list comprehension?", base[0]["answer"]) == (
        "Which term describes a compact way to build a list from an iterable?",
        "A list comprehension is a compact way to build a list from an iterable.")
    combos = [s for s in Augmenter(records, 5).generate({"programming": 20}) if s["augmentation"] == "combine"]
    assert combos and all(code_answer in c["answer"] or "```" not in c["answer"] for c in combos)


# ---------------------------------------------------------------------------------------------------------------
# The shipped data and the command line
# ---------------------------------------------------------------------------------------------------------------

def test_shipped_datasets_prepare_with_zero_drops(tmp_path):
    d = tmp_path / "Datasets"
    shutil.copytree(PROJECT_ROOT / "Datasets", d, ignore=shutil.ignore_patterns("enhanced_*", "knowledge_base"))
    out = d / "enhanced_training_data.json"
    assert prep.main(["--datasets_dir", str(d), "--output", str(out), "--seed", "42",
                      "--validation_fraction", "0.1"]) == 0
    stats = json.loads((d / "enhanced_data_stats.json").read_text(encoding="utf-8"))
    assert stats["dropped_total"] == 0 and stats["real_records"] == 450 and stats["test_records"] == 72
    # no data of one's own: the sample, with its own held-out set, and nothing written next to it
    assert stats["data"]["read_sample"] and stats["data"]["test_set_kind"] == "sample" and stats["problems"] == []
    assert not (d / "enhanced_test_set.json").exists() and not (d / "sample" / "enhanced_test_set.json").exists()
    records = json.loads(out.read_text(encoding="utf-8"))["records"]
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert isinstance(r["quality_score"], float) and 0 <= r["quality_score"] <= 1
        assert r["difficulty"] in range(1, 6) and r["split"] in ("train", "validation")
        assert isinstance(r["has_code"], bool) and r["source"]
    assert all(not r.get("synthetic") for r in records if r["split"] == "validation")
    # six domains of 75 records: the floor of 300 is bounded to 3 x 75 for all, so the mix stays even
    assert {v["sample_weight"] for v in stats["per_domain"].values()} == {1.0}
    assert stats["synthetic_records"] <= 0.1 * stats["output_records"]


def test_trainer_reads_the_output(prepared_data):
    from src.training.lm_data import load_prepared_records

    records = load_prepared_records(prepared_data)
    assert records and {r["split"] for r in records} == {"train", "validation"}


@pytest.mark.parametrize("launch", [["src/data_processing/prepare_data_for_training.py"],
                                    ["-m", "src.data_processing.prepare_data_for_training"]])
def test_cli_help_and_flag_errors(launch):
    res = run_script([*launch, "--help"])
    assert res.returncode == 0 and "--near_dup_threshold" in res.stdout
    res = run_script([*launch, "--max_domain_fraction", "0"])
    assert res.returncode == 2 and "--max_domain_fraction must be in (0, 1]" in res.stderr
