"""Domains people can trust (src/data_processing/domains.py): the user's own names, the precedence, a classifier
whose labels are the data's domains, and on the sample's domains the labelled check set and its traps.

The check set (tests/fixtures/data_processing/domain_check/*.tsv, 310 records written for this test in English,
Chinese, German and Spanish) holds technical questions of the sample's five technical domains and plainly general
ones, among them the traps that fooled the old one-keyword rule ("model" in a chat, "attack" in history, pandas
the animal, python the snake). The sample's lexicon speaks only for those of its domains a data set has.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_data_domains.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from src.data_processing import prepare_data_for_training as prep
from src.data_processing.domains import (GENERAL, SAMPLE_DOMAINS, DomainClassifier, DomainResolver,
                                         domain_from_name, name_as_domain)

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
    classify = DomainClassifier(SAMPLE_DOMAINS)
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
    domain, confidence = DomainClassifier(SAMPLE_DOMAINS).classify(question, answer)
    assert domain == GENERAL and 0 < confidence <= 1


def test_confident_technical_label_and_clear_lead_needed():
    classify = DomainClassifier(SAMPLE_DOMAINS)
    domain, confidence = classify.classify("How do I read a CSV file into a pandas DataFrame?",
                                           "Call pandas.read_csv with the path; it returns a DataFrame.")
    assert domain == "data_science" and confidence > 0.5
    # as much networking as security, neither 1.5 x the other: no clear lead, so general
    q = "Is a VPN enough to keep me safe on public Wi-Fi?"
    a = "A VPN encrypts your traffic on the hotspot, but you still need updates, MFA and care with phishing."
    points, _ = classify.scores(q, a)
    assert points["cybersecurity"] >= 4 and points["networking"] >= 4
    assert classify(q, a) == GENERAL


def test_a_lexicon_domain_the_data_does_not_have_is_never_a_label():
    """The sample's lexicon knows data_science; a data set without that domain never gets it."""
    q, a = "How do I read a CSV file into a pandas DataFrame?", "Call pandas.read_csv with the path."
    assert DomainClassifier(SAMPLE_DOMAINS)(q, a) == "data_science"
    assert DomainClassifier({"helpdesk", "sql"})(q, a) == GENERAL
    assert DomainClassifier()(q, a) == GENERAL  # no labels at all: everything is general


def test_names_of_files_and_folders_are_the_users_domains():
    assert [domain_from_name(n) for n in ("helpdesk.jsonl", "sql/joins.json", "company_faq.csv",
                                          "helpdesk_export_2024.json", "2024/helpdesk.json", "my_data/sql.json",
                                          "Company FAQ.json", "general.json")] == [
        "helpdesk", "sql", "company_faq", "helpdesk", "helpdesk", "sql", "company_faq", "general"]
    # formats, splits, generic words, numbers and single letters name nothing: the classifier decides
    for name in ("alpaca_en.json", "sharegpt.json", "train.jsonl", "data.json", "part_a.json", "export-2.json",
                 "test_set.json", "misc.json"):
        assert domain_from_name(name) is None, name
    assert name_as_domain("security") == "security"  # no aliases: the user's word stays


def test_precedence_record_then_map_or_name_then_classifier():
    resolver = DomainResolver(domain_map={"vendor_*/*.json": "cloud", "faq.jsonl": "networking"})
    assert resolver.resolve("Security", "vendor_x/part1.json") == ("security", "record")
    assert resolver.resolve(None, "vendor_x/part1.json") == ("cloud", "domain_map")
    assert resolver.resolve(None, "sub/faq.jsonl") == ("networking", "domain_map")
    assert resolver.resolve("", "networking/extra.json") == ("networking", "file_name")
    assert resolver.resolve(None, "sample/programming.json") == ("programming", "file_name")
    assert resolver.resolve(None, "misc.json") == (None, None)  # left to the classifier


def _support_records() -> list[dict]:
    """Labelled records of two domains of a user's own: a help desk and SQL."""
    helpdesk = [("How do I reset my password?", "Open the self-service portal, choose reset password and follow "
                 "the link in the email."),
                ("My laptop cannot join the office wifi.", "Forget the office wifi network, reconnect and sign in "
                 "with your staff account."),
                ("The printer on floor two shows offline.", "Restart the printer, then remove and add it again "
                 "from the printers page of the portal."),
                ("How do I request a new laptop?", "Open a ticket in the portal under hardware and your manager "
                 "approves the laptop."),
                ("I locked my account after three tries.", "Wait fifteen minutes or call the help desk to unlock "
                 "the account."),
                ("Where do I report a broken monitor?", "Open a hardware ticket in the portal; the help desk "
                 "swaps the monitor.")]
    sql = [("How do I join two tables in SQL?", "Use JOIN with ON: SELECT * FROM orders JOIN customers ON "
            "orders.customer_id = customers.id."),
           ("What does GROUP BY do?", "GROUP BY collects the rows that share a value so that COUNT or SUM run "
            "per group of rows."),
           ("How do I filter rows in a SELECT?", "Add a WHERE clause: SELECT name FROM customers WHERE city = "
            "'Oslo'."),
           ("Why is my query slow?", "Look at the query plan; an index on the columns of the WHERE clause and of "
            "the JOIN often helps the query."),
           ("How do I count rows in a table?", "SELECT COUNT(*) FROM orders counts every row of the table."),
           ("What is a primary key?", "A column whose value is unique for every row of the table, used by JOIN "
            "and by the index.")]
    return [{"id": f"h{i}", "domain": "helpdesk", "question": q, "answer": a} for i, (q, a) in enumerate(helpdesk)] \
        + [{"id": f"s{i}", "domain": "sql", "question": q, "answer": a} for i, (q, a) in enumerate(sql)]


def test_the_classifier_labels_are_the_domains_of_the_data(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    (d / "support.json").write_text(json.dumps(_support_records()), encoding="utf-8")
    unlabelled = [{"id": "u1", "question": "I forgot my password, how do I reset it?",
                   "answer": "Use the portal: reset password, then follow the email link."},
                  {"id": "u2", "question": "How do I join the orders table with customers?",
                   "answer": "SELECT with a JOIN on customer_id; add a WHERE clause to filter the rows."},
                  {"id": "u3", "question": "How long should I bake a sponge cake?",
                   "answer": "About twenty-five minutes at 180 degrees, until a skewer comes out clean."}]
    (d / "misc.json").write_text(json.dumps(unlabelled), encoding="utf-8")
    out = tmp_path / "out" / "p.json"
    assert prep.main(["--datasets_dir", str(d), "--output", str(out), "--no-create_test_set",
                      "--near_dup_threshold", "1", "--synthetic_ratio", "0", "--min_domain_count", "0"]) == 0
    records = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))["records"]}
    # the records' own fields win over the file's name (it would give "support")
    assert {records[f"h{i}"]["domain"] for i in range(6)} == {"helpdesk"}
    assert [records[u]["domain"] for u in ("u1", "u2", "u3")] == ["helpdesk", "sql", GENERAL]
    assert all(records[u]["domain_inferred"] and records[u]["domain_source"] == "classifier" for u in ("u1", "u2"))
    assert {r["domain"] for r in records.values()} == {"helpdesk", "sql", GENERAL}


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
    assert records["cloud/a.json"]["domain"] == "cloud"  # the folder's name, as the user wrote it
    assert records["cloud/a.json"]["domain_source"] == "file_name"
    assert records["garden_tips.json"]["domain"] == GENERAL
    assert records["garden_tips.json"]["domain_source"] == "domain_map"
    assert records["other.json"]["domain"] == "programming" and "domain_source" not in records["other.json"]
    bad = tmp_path / "bad_map.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(prep.UserError, match="--domain_map .*pattern -> domain"):
        prep.main(["--datasets_dir", str(d), "--output", str(out), "--domain_map", str(bad)])
