"""evaluate_model.py: hand-worked metric values, perplexity by hand, what was scored (evaluated, truncated,
skipped, answer tokens) counted by hand, leakage refusal through the one question key, the full CLI run with
report, and metrics that survive a failing report.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_evaluate_model.py -q
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from src.model.theta_model import ThetaModel, split_prompt
from src.training.evaluate_model import (bleu_scores, check_no_overlap, exact_match, lcs_length, main,
                                         normalize_answer, rouge_l, teacher_forced_metrics, text_metrics, token_f1)
from src.utils.common import UserError, run_entry_point

RUN = "theta_enhanced_20260101_000000"


# ---------------------------------------------------------------------------------------------------------------
# Text metrics on examples worked by hand
# ---------------------------------------------------------------------------------------------------------------

def test_squad_normalisation_and_exact_match():
    assert normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("The cat sat.", "cat   sat") == 1.0
    assert exact_match("The cat sat.", "the cat sits") == 0.0


def test_token_f1_by_hand():
    # normalised: "cat sat on mat" (4) vs "cat on mat" (3); 3 shared -> P 3/4, R 1, F1 = 1.5 / 1.75
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # multiset overlap: "on on" shares one "on" with "on" -> P 1/2, R 1, F1 2/3
    assert token_f1("on on", "on") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("cat", "") == 0.0 and token_f1("dog", "cat") == 0.0


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (e.g. BCBA)
    assert lcs_length([], ["a"]) == 0
    # [the cat sat on the mat] vs [a cat on a mat]: LCS "cat on mat" = 3 -> P 3/6, R 3/5, F1 = 0.6 / 1.1
    assert rouge_l("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 11)
    assert rouge_l("Hello, world", "hello , world") == 1.0  # case and tokenised punctuation


def test_bleu_by_hand():
    # same length (BP 1); clipped n-gram precisions 5/6, 3/5, 2/4, 1/3
    b = bleu_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert b["bleu_1"] == pytest.approx(5 / 6)
    assert b["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4) ** (1 / 3))
    assert b["bleu_4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4))
    # brevity penalty: 1 token against 3 -> exp(1 - 3)
    assert bleu_scores(["cat"], ["the cat sat"])["bleu_1"] == pytest.approx(math.exp(-2))
    # no shared 4-gram: smoothing method 1 counts 0.1 instead of 0 matches (of 3 4-grams)
    b = bleu_scores(["the dog sat on a mat"], ["the cat sat on a rug"])
    assert b["bleu_4"] == pytest.approx((4 / 6 * 2 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    assert bleu_scores([""], ["anything"]) == {k: 0.0 for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4")}


def test_text_metrics_are_means_over_answers():
    m = text_metrics(["the cat sat", "dog"], ["cat sat", "a bird"])
    assert m["exact_match"] == 0.5 and m["f1"] == 0.5 and m["records"] == 2
    assert m["rouge_l"] == pytest.approx((2 * (2 / 3) * 1 / (2 / 3 + 1) + 0) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Perplexity equals a hand computation
# ---------------------------------------------------------------------------------------------------------------

def test_perplexity_matches_hand_computation(tiny_model_dir):
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    records = [{"question": "What is DNS?", "answer": "It maps names to addresses.", "domain": "networking"},
               {"question": "Why do we write unit tests in programming?",
                "answer": "They check one small piece of code against an expected result, every time.",
                "domain": "programming"}]
    tok, model = tm.tokenizer, tm.model.eval()
    nll, hits, count = {}, {}, {}
    for rec in records:  # one record at a time, no padding: the plain definition
        prompt, _ = split_prompt(rec["question"])
        p_ids = tok(prompt)["input_ids"]
        ids = p_ids + tok(" " + rec["answer"])["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
        targets = range(len(p_ids), len(ids))  # every answer token and the end-of-text token
        nll[rec["domain"]] = -sum(logp[t - 1, ids[t]].item() for t in targets)
        hits[rec["domain"]] = sum(int(logp[t - 1].argmax() == ids[t]) for t in targets)
        count[rec["domain"]] = len(targets)
    # batch of 2: the shorter record is padded, and the padding must not count
    m = teacher_forced_metrics(tm, records, batch_size=2, max_length=256)
    total = sum(count.values())
    assert m["tokens"] == total
    assert m["perplexity"] == pytest.approx(math.exp(sum(nll.values()) / total), rel=1e-4)
    assert m["token_accuracy"] == pytest.approx(sum(hits.values()) / total)
    for d in count:
        assert m["domains"][d]["perplexity"] == pytest.approx(math.exp(nll[d] / count[d]), rel=1e-4)


def test_evaluation_imports_nothing_from_the_trainer():
    """evaluate_model.py batches its records itself: importing it loads no part of train_enhanced.py."""
    import subprocess
    import sys

    code = "import sys, src.training.evaluate_model; print('src.training.train_enhanced' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_truncated_and_skipped_records_are_counted_by_hand(tiny_model_dir):
    """13 records at a short max_length: which are cut, which leave no answer token, and how many answer tokens
    perplexity covers, all counted here straight from the tokenizer."""
    tm = ThetaModel.load(tiny_model_dir, device="cpu")
    tok = tm.tokenizer
    records = [{"question": f"What is item {i}?", "answer": "It is a thing " * (i + 1), "domain": "networking"}
               for i in range(12)]
    records.append({"question": "Why " * 80 + "?", "answer": "Because.", "domain": "programming"})
    max_length = 40
    evaluated = truncated = skipped = covered = full = 0
    for r in records:
        p = len(tok(split_prompt(r["question"])[0])["input_ids"])
        a = len(tok(" " + r["answer"].strip())["input_ids"]) + 1  # + end-of-text
        full += a
        if p >= max_length:
            skipped += 1
            continue
        evaluated += 1
        truncated += p + a > max_length
        covered += min(p + a, max_length) - p
    assert skipped == 1 and 0 < truncated < evaluated  # the fixture exercises all three cases
    m = teacher_forced_metrics(tm, records, batch_size=4, max_length=max_length)
    assert (m["evaluated_records"], m["truncated"], m["skipped"]) == (evaluated, truncated, skipped)
    assert m["tokens"] == covered and m["answer_tokens_full"] == full and m["max_length"] == max_length


# ---------------------------------------------------------------------------------------------------------------
# The command line: a run folder, leakage refusal, the report
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path, tiny_model_dir, prepared_data):
    """models/<run>/ with theta_final, training_config.json naming the prepared file, history and step metrics."""
    run = tmp_path / "models" / RUN
    shutil.copytree(tiny_model_dir, run / "theta_final")
    (run / "training_config.json").write_text(json.dumps({"args": {"data_path": str(prepared_data)}}))
    history = [{"epoch": e, "step": 4 * e, "train_loss": 5.0 - e, "val_loss": 5.2 - 0.8 * e,
                "val_perplexity": math.exp(5.2 - 0.8 * e), "val_token_accuracy": 0.1 * e,
                "domains": {"networking": {"loss": 4.0, "perplexity": 54.6, "token_accuracy": 0.2}},
                "learning_rate": 1e-3, "seconds": 1.0} for e in (1, 2, 3)]
    (run / "loss_history.json").write_text(json.dumps(history))
    lines = [json.dumps({"step": s, "epoch": 1 + s // 4, "loss": 5.0, "lr": 1e-3 * min(1, s / 3), "grad_norm": 1.0,
                         "tokens_per_sec": 100.0, "ms": 10.0, "skipped": False}) for s in range(1, 13)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 13, "lr"')  # killed mid-line
    return run


def test_overlapping_test_set_is_refused(tmp_path, run_dir, prepared_data, capsys):
    trained = json.loads(prepared_data.read_text())["records"]
    # same questions after normalisation (case, punctuation, spacing), answers reworded
    leaked = [{"id": f"t{i}", "question": "  " + r["question"].upper().replace("?", " ?!"), "answer": "x",
               "domain": r["domain"]} for i, r in enumerate(trained[:2])]
    test = tmp_path / "leaky_test.json"
    test.write_text(json.dumps(leaked + json.loads((prepared_data.parent / "enhanced_test_set.json").read_text())))
    out = tmp_path / "stats" / "evaluation.json"
    code = run_entry_point(main, ["--model_path", str(run_dir / "theta_final"), "--test_data", str(test),
                                  "--output_file", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "overlaps the training data" in err
    assert "2 of" in err and "Traceback" not in err
    assert not out.exists() and not (out.parent / RUN).exists()


def test_clean_test_set_is_not_refused_under_the_one_question_key(tmp_path):
    """Regression (issue 14): evaluation must compare questions with the key data preparation used to keep the
    test set apart (src.utils.data_contract.question_key): "C#" and "C++" are different questions."""
    run = tmp_path / "models" / RUN
    run.mkdir(parents=True)
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"records": [{"id": "1", "question": "What is C++?", "answer": "A language."}]}))
    (run / "training_config.json").write_text(json.dumps({"args": {"data_path": str(train)}}))
    clean = [{"id": "t1", "question": "What is C#?", "answer": "Another language.", "domain": "programming"}]
    assert check_no_overlap(clean, run / "theta_final", tmp_path / "test.json")["checked"]
    with pytest.raises(UserError, match="1 of 1 test questions"):
        check_no_overlap([{**clean[0], "question": "what is  C++ ?"}], run / "theta_final", tmp_path / "test.json")


PARAPHRASES = ["What's a firewall?", "What is a firewal?", "What is the firewall?", "A firewall is what?"]


def test_near_duplicates_of_training_questions_are_flagged_and_refused_above_the_share(tmp_path, caplog):
    """Regression (issue 21.8): exact, case and punctuation variants were refused but these four paraphrases
    passed silently (0 of 4 flagged)."""
    run = tmp_path / "models" / RUN
    run.mkdir(parents=True)
    answer = "A firewall filters network traffic by ordered rules that allow or deny each connection."
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"records": [{"id": "fw", "question": "What is a firewall?", "answer": answer}]}))
    (run / "training_config.json").write_text(json.dumps({"args": {"data_path": str(train)}}))
    clean = [{"id": f"c{i}", "question": f"What does port {i} carry?", "answer": f"Port {i} carries service {i}."}
             for i in range(40)]
    leaked = [{"id": f"p{i}", "question": q, "answer": answer} for i, q in enumerate(PARAPHRASES)]
    with pytest.raises(UserError, match="4 of 44 test questions .*more than 5%"):
        check_no_overlap(leaked + clean, run / "theta_final", tmp_path / "test.json")
    # one of 41 (2.4%): evaluated, but counted and shown
    with caplog.at_level("WARNING"):
        checked = check_no_overlap(leaked[:1] + clean, run / "theta_final", tmp_path / "test.json")
    assert checked["near_duplicates"] == 1 and checked["near_duplicate_share"] == round(1 / 41, 4)
    assert checked["near_duplicate_examples"] == [{"test_id": "p0", "test_question": PARAPHRASES[0],
                                                   "train_id": "fw", "train_question": "What is a firewall?",
                                                   "similarity": 1.0}]
    assert "1 of 41 test questions (2.4%) are near-duplicates" in caplog.text


def test_metrics_survive_a_failing_report(tmp_path, run_dir, prepared_data, monkeypatch, capsys):
    """Regression (issue 14): the report step crashed before the metrics file was written, losing the night's
    figures. Now the metrics are written first and a report error is logged with the command to rebuild it."""
    from src.training import report

    def broken(*args, **kwargs):
        raise RuntimeError("the plotting library fell over")

    monkeypatch.setattr(report, "write_report", broken)
    out = tmp_path / "stats" / f"evaluation_{RUN}.json"
    assert main(["--model_path", str(run_dir / "theta_final"), "--test_data", str(prepared_data.parent /
                 "enhanced_test_set.json"), "--output_file", str(out), "--max_new_tokens", "2", "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    assert r["perplexity"] > 1 and "fell over" in r["report_error"] and "report" not in r
    logged = "".join(capsys.readouterr())
    assert "report not written" in logged and "python -m src.training.report --results" in logged


def test_user_errors_exit_2_without_traceback(tmp_path, run_dir, capsys):
    assert run_entry_point(main, ["--model_path", str(tmp_path / "nope"), "--test_data",
                                  str(tmp_path / "missing.json")]) == 2
    assert "error: test set (--test_data) not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "Q?"}]')
    assert run_entry_point(main, ["--model_path", str(run_dir / "theta_final"), "--test_data", str(bad)]) == 2
    assert "record 0 needs non-empty 'question' and 'answer'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model_path", str(run_dir / "theta_final"), "--batch_size", "0"])
    assert exc.value.code == 2 and "--batch_size must be at least 1" in capsys.readouterr().err


def test_full_run_writes_metrics_report_and_plots(tmp_path, run_dir, prepared_data, capsys):
    held_out = json.loads((prepared_data.parent / "enhanced_test_set.json").read_text())
    nasty = {"id": "html-1", "domain": "networking", "question": "What does <script>alert('x')</script> do?",
             "answer": "It is <b>escaped</b> & shown as text."}
    test = tmp_path / "test_set.json"
    fresh = [{"id": f"new-{i}", "domain": d, "question": q, "answer": a} for i, (d, q, a) in enumerate([
        ("networking", "How does a switch learn addresses?", "It records the source MAC address of each frame."),
        ("programming", "When should a function return early?", "When the remaining work would be pointless."),
        ("cybersecurity", "Who should hold admin rights?", "Only the people whose job needs them.")])]
    held_out += fresh
    # A domain name matplotlib would read as maths: it crashed the report step (issue 14).
    held_out.append({"id": "math-1", "domain": "cost $\\frac$", "question": "What does a $5 fee buy?",
                     "answer": "About $5 of compute."})
    test.write_text(json.dumps([nasty] + held_out))
    out = tmp_path / "stats" / f"evaluation_{RUN}.json"
    umask = os.umask(0o022)
    try:
        assert main(["--model_path", str(run_dir / "theta_final"), "--test_data", str(test), "--output_file",
                     str(out), "--max_new_tokens", "6", "--num_samples", "3", "--seed", "7", "--batch_size", "8",
                     "--baseline_model", str(run_dir / "theta_final")]) == 0
    finally:
        os.umask(umask)
    r = json.loads(out.read_text())
    assert out.stat().st_mode & 0o777 == 0o644  # the user's umask, not mkstemp's 0600
    assert (r["evaluated_records"], r["truncated"], r["skipped"]) == (len(held_out) + 1, 0, 0)
    assert r["answer_tokens"] == r["answer_tokens_full"] > 0 and r["generated_answers"] == len(held_out) + 1
    logged = "".join(capsys.readouterr())
    assert f"on {r['answer_tokens']} answer tokens of {r['answer_tokens_full']} (100%)" in logged
    assert f"{len(held_out) + 1} of {len(held_out) + 1} records" in logged
    assert r["run"] == RUN and r["test_records"] == len(held_out) + 1
    assert r["leakage_check"]["checked"] and r["leakage_check"]["overlapping_questions"] == 0
    assert r["perplexity"] > 1 and 0 <= r["token_accuracy"] <= 1
    for key in ("exact_match", "f1", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert 0 <= r[key] <= 1, key
    assert set(r["per_domain"]) == {rec["domain"] for rec in held_out} | {"networking"}
    for m in r["per_domain"].values():
        assert {"perplexity", "token_accuracy", "exact_match", "f1", "bleu_4", "rouge_l", "records"} <= set(m)
    assert r["generation"] == {"decoding": "greedy", "max_new_tokens": 6, "temperature": 0.0, "top_p": 0.9,
                               "top_k": 50, "repetition_penalty": 1.2, "seed": 7, "batch_size": 8}
    assert len(r["samples"]) == 3 and r["samples"][0]["reference"] == nasty["answer"]
    assert all(isinstance(s["generated"], str) for s in r["samples"])
    # the baseline is the same model with the same greedy settings: every delta is zero
    assert all(abs(v) < 1e-9 for v in r["deltas"].values()), r["deltas"]
    assert r["samples"][0]["baseline_generated"] == r["samples"][0]["generated"]

    report_dir = out.parent / RUN
    for name in ("report.html", "loss_curve.png", "learning_rate.png", "token_accuracy.png", "domains.png",
                 "baseline_deltas.png"):
        assert (report_dir / name).is_file(), name
    assert (report_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report_dir / "report.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;escaped&lt;/b&gt; &amp; shown" in page
    assert page.count('src="data:image/png;base64,') == 5
    assert "cost $\\frac$" in page and (report_dir / "report.html").stat().st_mode & 0o777 == 0o644
