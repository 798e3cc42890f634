"""Domains people can trust (src/data_processing/domains.py): the labelled check set, the traps, the precedence.

The check set (tests/fixtures/data_processing/domain_check/*.tsv, 310 records written for this test in English,
Chinese, German and Spanish) holds technical questions of the five technical domains and plainly general ones,
among them the traps that fooled the old one-keyword rule ("model" in a chat, "attack" in history, pandas the
animal, python the snake).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_data_domains.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from src.data_processing import prepare_data_for_training as prep
from src.data_processing.domains import GENERAL, DomainClassifier, DomainResolver, domain_from_name

CHECK = Path(__file__).parent / "fixtures" / "data_processing" / "domain_check"


def check_set() -> list[tuple[str, str, str]]:
    rows = []
    for name in ("technical.tsv", "general.tsv"):
        for line in (CHECK / name).read_text(encoding="utf-8").splitlines():
            label, question, answer = line.split("\t")
            rows.append((label, question, answer.replace("\\n", "\n")))
    return rows


def test_labelled_check_set_accuracy_and_general_kept_general():
    rows = check_set()
    classify = DomainClassifier()
    predicted = [classify(q, a) for _, q, a in rows]
    labels = [label for label, _, _ in rows]
    accuracy = sum(p == t for p, t in zip(predicted, labels)) / len(rows)
    general = [p for p, t in zip(predicted, labels) if t == GENERAL]
    general_to_technical = sum(p != GENERAL for p in general) / len(general)
    assert len(rows) >= 300 and Counter(labels)[GENERAL] >= 100 and len(set(labels)) == 6
    assert accuracy >= 0.90, accuracy
    assert general_to_technical <= 0.05, general_to_technical


@pytest.mark.parametrize("question,answer", [
    ("Which model should I buy if I want a quiet dishwasher?", "Look for a model rated under 44 decibels."),
    ("Why did Napoleon attack Russia in 1812?", "He wanted to force the Tsar back into the Continental System."),
    ("Why do giant pandas eat bamboo?", "Giant pandas evolved to live on bamboo."),
    ("Is a python snake dangerous to people?", "Large pythons can be dangerous, but attacks are rare."),
])
def test_one_keyword_does_not_make_a_technical_domain(question, answer):
    domain, confidence = DomainClassifier().classify(question, answer)
    assert domain == GENERAL and 0 < confidence <= 1


def test_confident_technical_label_and_clear_lead_needed():
    classify = DomainClassifier()
    domain, confidence = classify.classify("How do I read a CSV file into a pandas DataFrame?",
                                           "Call pandas.read_csv with the path; it returns a DataFrame.")
    assert domain == "data_science" and confidence > 0.5
    # as much networking as security, neither 1.5 x the other: no clear lead, so general
    q = "Is a VPN enough to keep me safe on public Wi-Fi?"
    a = "A VPN encrypts your traffic on the hotspot, but you still need updates, MFA and care with phishing."
    points, _ = classify.scores(q, a)
    assert points["cybersecurity"] >= 4 and points["networking"] >= 4
    assert classify(q, a) == GENERAL


def test_precedence_record_then_map_or_file_name_then_classifier(tmp_path):
    resolver = DomainResolver(domain_map={"vendor_*/*.json": "cloud", "faq.jsonl": "networking"})
    q, a = "How do I write a for loop in Python?", "Use for item in items: followed by an indented block."
    assert resolver.resolve("Security", "vendor_x/part1.json", q, a)[:2] == ("cybersecurity", "record")
    assert resolver.resolve(None, "vendor_x/part1.json", q, a)[:2] == ("cloud_computing", "domain_map")
    assert resolver.resolve(None, "sub/faq.jsonl", q, a)[:2] == ("networking", "domain_map")
    assert resolver.resolve("", "networking/extra.json", q, a)[:2] == ("networking", "file_name")
    assert resolver.resolve(None, "misc.json", q, a)[:2] == ("programming", "classifier")
    assert domain_from_name("security/part1.json") == "cybersecurity"
    assert domain_from_name("dev.json") is None and domain_from_name("chat/code.json") is None


def test_precedence_through_prepare_with_domain_map(tmp_path):
    d = tmp_path / "Datasets"
    (d / "cloud").mkdir(parents=True)
    item = {"instruction": "Explain how I should water a cactus.", "output": "Water it deeply once a month and "
                                                                              "let the soil dry completely."}
    (d / "cloud" / "a.json").write_text(json.dumps([item]), encoding="utf-8")
    (d / "garden_tips.json").write_text(json.dumps([{**item, "output": item["output"] + " Less in winter."}]),
                                        encoding="utf-8")
    (d / "other.json").write_text(json.dumps([{**item, "output": "Rarely.", "domain": "programming"}]),
                                  encoding="utf-8")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"garden_*.json": "general"}), encoding="utf-8")
    out = tmp_path / "out" / "p.json"
    assert prep.main(["--datasets_dir", str(d), "--output", str(out), "--no-create_test_set", "--domain_map",
                      str(mapping), "--near_dup_threshold", "1", "--synthetic_ratio", "0"]) == 0
    records = {r["source"]: r for r in json.loads(out.read_text(encoding="utf-8"))["records"]}
    assert records["cloud/a.json"]["domain"] == "cloud_computing"
    assert records["cloud/a.json"]["domain_source"] == "file_name"
    assert records["garden_tips.json"]["domain"] == GENERAL
    assert records["garden_tips.json"]["domain_source"] == "domain_map"
    assert records["other.json"]["domain"] == "programming" and "domain_source" not in records["other.json"]
    bad = tmp_path / "bad_map.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(prep.UserError, match="--domain_map .*pattern -> domain"):
        prep.main(["--datasets_dir", str(d), "--output", str(out), "--domain_map", str(bad)])
