"""Converters (src/data_processing/convert_*.py) on small hand-written fixtures, and their output through
preparation.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_converters.py -q
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_script
from src.data_processing.convert_alpaca import convert_alpaca
from src.data_processing.convert_chat import convert_chat
from src.data_processing.convert_faq import convert_faq
from src.data_processing.convert_oasst import convert_oasst
from src.data_processing.convert_stackexchange import convert_stackexchange, html_to_text
from src.utils.common import UserError

FIX = Path(__file__).parent / "fixtures" / "data_processing"


def test_alpaca():
    skipped = Counter()
    recs = convert_alpaca(FIX / "alpaca.json", domain="programming", skipped=skipped)
    assert [r["id"] for r in recs] == ["alpaca-000000", "alpaca-000001"]
    assert recs[0]["question"] == "Explain what a Python generator is." and recs[0]["domain"] == "programming"
    assert recs[1]["question"] == "Fix the bug in this code.\n\ndef add(a, b):\n    return a - b"
    assert recs[1]["answer"].endswith("```python\ndef add(a, b):\n    return a + b\n```")
    assert skipped == {"empty": 1, "not_alpaca": 1}


def test_sharegpt_turns_and_context():
    skipped = Counter()
    recs = convert_chat(FIX / "sharegpt.json", skipped=skipped)
    assert [(r["id"], r["turn"]) for r in recs] == [("sharegpt-c1-t0", 0), ("sharegpt-c1-t1", 1)]
    assert "context" not in recs[0]
    assert recs[1]["context"] == "User: What is a VLAN?\nAssistant: A VLAN splits one physical switch into " \
                                 "several logical networks."
    assert skipped["no_exchange"] == 1


def test_openai_messages_jsonl():
    skipped = Counter()
    recs = convert_chat(FIX / "openai_messages.jsonl", domain="cloud", skipped=skipped)
    assert len(recs) == 1
    assert recs[0]["answer"] == "Object storage keeps files as objects with metadata in flat buckets."
    assert recs[0]["context"] == "You are a concise cloud tutor."
    assert skipped["invalid_json"] == 1 and skipped["empty_message"] == 1
    # the system message is context whatever --max_history_turns says; earlier exchanges are not
    assert convert_chat(FIX / "openai_messages.jsonl", max_history_turns=0)[0]["context"] == \
        "You are a concise cloud tutor."


def test_oasst_best_ranked_path_nested_and_flat():
    recs = convert_oasst(FIX / "oasst_tree.json")
    assert [r["question"] for r in recs] == ["How do I reverse a list in Python?", "Which one is faster?"]
    assert recs[0]["answer"].startswith("Call `my_list.reverse()`")  # rank 0 beats rank 1
    assert recs[1]["turn"] == 1
    skipped = Counter()
    flat = convert_oasst(FIX / "oasst_flat.jsonl", lang="en", skipped=skipped)
    assert [r["answer"] for r in flat] == ["DHCP hands out IP addresses, gateways and DNS servers to devices that "
                                           "join a network."]
    assert skipped["other_language"] == 1


def test_stackexchange_json_accepted_first():
    skipped = Counter()
    recs = convert_stackexchange(FIX / "stackexchange.json", max_answers=2, skipped=skipped)
    assert [r["id"] for r in recs] == ["stackexchange-101-a0", "stackexchange-101-a1"]
    assert recs[0]["accepted"] is True and recs[0]["answer"] == "Run `git revert HEAD` to undo it with a new commit."
    assert recs[1]["answer"] == "Use reset:\n```\ngit reset --soft HEAD~1\n```"
    assert recs[0]["question"] == "How do I undo the last git commit?\n\nI committed too early."
    assert skipped["no_good_answer"] == 1


def test_stackexchange_posts_xml():
    recs = convert_stackexchange(FIX / "Posts.xml")
    assert len(recs) == 1 and recs[0]["accepted"] is True
    assert recs[0]["answer"] == "A mask of 255.255.255.0 means the first 24 bits name the network."


def test_html_to_text_keeps_code_verbatim():
    assert html_to_text("<p>a &amp; b</p><pre><code>x  =  1\n  y &lt; 2\n</code></pre>") == \
        "a & b\n```\nx  =  1\n  y < 2\n```"


def test_faq_markdown_and_qa_lines():
    recs = convert_faq(FIX / "faq.md", domain_from_sections=True)
    assert [(r["question"], r["domain"]) for r in recs] == [
        ("What is latency?", "Networking"), ("How do I test connectivity?", "Networking"),
        ("Should I reuse passwords?", "Security"), ("What is MFA?", "Security")]
    assert recs[0]["answer"] == "Latency is the time a packet takes to reach its destination.\n\n" \
                                "It is measured in milliseconds."
    assert "```bash\n# this hash is not a heading\nping -c 4 example.org\n```" in recs[1]["answer"]


@pytest.mark.parametrize("script,fixture", [("convert_alpaca", "alpaca.json"), ("convert_chat", "sharegpt.json"),
                                            ("convert_oasst", "oasst_tree.json"),
                                            ("convert_stackexchange", "Posts.xml"), ("convert_faq", "faq.md")])
def test_cli_both_launch_forms_and_output_prepares(tmp_path, script, fixture):
    out = tmp_path / "Datasets" / f"{script}.json"
    res = run_script([f"src/data_processing/{script}.py", str(FIX / fixture), "--output", str(out)])
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text(encoding="utf-8"))
    res = run_script(["-m", f"src.data_processing.{script}", "--help"])
    assert res.returncode == 0 and "--output" in res.stdout
    res = run_script(["-m", f"src.data_processing.{script}", str(tmp_path / "missing.json"), "--output", str(out)])
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    from src.data_processing.prepare_data_for_training import main as prepare_main

    assert prepare_main(["--datasets_dir", str(out.parent), "--no-create_test_set", "--min_domain_count", "0",
                         "--synthetic_ratio", "0", "--max_domain_fraction", "1"]) == 0


def test_faq_keeps_sub_headings_tables_and_code_inside_an_answer():
    recs = convert_faq(FIX / "faq_subheadings.md", domain_from_sections=True)
    assert [(r["question"], r["domain"]) for r in recs] == [
        ("How should I back up my photos?", "Backups"), ("How often should I test a restore?", "Backups"),
        ("How long should a password be?", "Passwords")]
    answer = recs[0]["answer"]
    assert answer.startswith("Keep three copies") and "### On a laptop" in answer
    assert "| 3 | cloud folder |" in answer
    assert answer.endswith("```bash\n# a comment, not a heading\nrsync -a ~/Pictures /media/backup/\n```")


def test_oasst_keeps_only_usable_messages_and_ready_trees():
    skipped = Counter()
    recs = convert_oasst(FIX / "oasst_flags.jsonl", lang="en", skipped=skipped)
    # rank 0 is deleted, rank 1 failed review, rank 2 is unreviewed: the rank 3 reply is the best usable one
    assert [(r["question"], r["answer"]) for r in recs] == [
        ("How do I clean a cast iron pan?", "Rinse it with hot water, scrub gently, dry it on the stove and rub in a "
                                            "thin layer of oil.")]
    assert skipped["tree_not_ready"] == 1 and skipped["other_language"] == 1
    assert [r["question"] for r in convert_oasst(FIX / "oasst_flags.jsonl", lang="es")] == [
        "¿Cómo limpio una sartén de hierro?"]


@pytest.mark.parametrize("module,fixture,message", [
    ("convert_faq", "alpaca.json", "looks like JSON (Alpaca records), not a Markdown / plain-text FAQ; "
                                   "convert_alpaca reads it"),
    ("convert_alpaca", "faq.md", "looks like Markdown or plain text, not an Alpaca JSON / JSON Lines file; "
                                 "convert_faq reads it"),
    ("convert_chat", "Posts.xml", "looks like XML, not a ShareGPT / OpenAI messages chat file; "
                                  "convert_stackexchange"),
    ("convert_oasst", "sharegpt.json", "looks like JSON (ShareGPT chats), not an OASST JSON / JSON Lines export; "
                                       "convert_chat reads it"),
    ("convert_stackexchange", "faq.md", "looks like Markdown or plain text"),
])
def test_wrong_format_names_the_format_and_the_converter(tmp_path, module, fixture, message):
    import importlib

    main = importlib.import_module(f"src.data_processing.{module}").main
    with pytest.raises(UserError) as err:
        main([str(FIX / fixture), "--output", str(tmp_path / "out.json")])
    assert message in str(err.value)
    with pytest.raises(UserError, match="is a folder; give a file name"):
        main([str(FIX / fixture), "--output", str(tmp_path)])
    with pytest.raises(UserError, match="input file not found"):
        main([str(tmp_path / "missing.json"), "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_converter_output_gets_the_umask_mode(tmp_path):
    from src.data_processing.convert_alpaca import main

    old = os.umask(0o022)
    try:
        assert main([str(FIX / "alpaca.json"), "--output", str(tmp_path / "a.json")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
