"""The user's first night (issue 21, its Tests section): a realistic folder of one's own
(tests/fixtures/user_data/: several formats, the user's own domain names, a broken export, a column-renamed
file, an OpenAI file with weights, a prompt-only file) run through train_overnight_enhanced.sh's quick profile.

One real run (pre-flight, preparation, training for one short epoch, evaluation; the optimisation step stubbed)
checks that the domains are the user's, that nothing of the sample is indexed, tokenised or trained on, that the
pre-flight warns about the broken file (in its output, the banner and preflight.json), and that the report opens
with the verdict and the data summary. Cheap stubbed runs check that ``--strict`` refuses the same folder in the
pre-flight, that an empty Datasets/ fails there, and that a typo'd flag is refused with the nearest flag named.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_first_night.py -q
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from src.data_processing.domains import SAMPLE_DOMAINS
from src.model.theta_model import corpus_digest, iter_corpus_texts
from src.training.report import fixed
from src.training.train_enhanced import GenerationCheck, bracketed_targets, build_parser, shown_text
from src.utils.common import FlagParser
from test_overnight_scripts import StubbedRun, copy_project, step_calls

USER_DATA = Path(__file__).parent / "fixtures" / "user_data"
SAMPLE_NAMES = set(SAMPLE_DOMAINS) | {"general_conversation"}
REAL_STEPS = ("src.training.preflight", "src.data_processing.knowledge_base_enhancer_main",
              "src.data_processing.prepare_data_for_training", "src.training.train_enhanced",
              "src.training.evaluate_model")
# One short epoch at a small length: the run exercises every step, not the model.
TRAINER_FLAGS = ["--epochs", "1", "--max_length", "96", "--num_samples", "1", "--domain_eval_per_domain", "1"]


def user_project(root: Path) -> Path:
    """A copy of the project whose Datasets/ holds the shipped README and sample/ plus the user's folder, and no
    knowledge/ notes of the user's (the sample's notes stay in Datasets/sample/knowledge/)."""
    empty = root / "no_records"
    empty.mkdir(parents=True)
    project = copy_project(root / "project", empty)
    shutil.rmtree(project / "Datasets" / "knowledge", ignore_errors=True)
    shutil.copytree(USER_DATA, project / "Datasets", dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
    return project


@pytest.fixture(scope="module")
def first_night(tmp_path_factory) -> tuple[Path, str, str]:
    """The overnight script's quick profile on the user's folder, for real but for the optimisation step."""
    project = user_project(tmp_path_factory.mktemp("first_night"))
    run = StubbedRun(project)
    proc = run.start("--profile", "quick", "--", *TRAINER_FLAGS, real=REAL_STEPS)
    out, _ = proc.communicate(timeout=900)  # about 45 s on an idle 2-core machine; far more when it is shared
    assert proc.returncode == 0, out[-4000:]
    (run_id,) = run.runs()
    return project, run_id, out


@pytest.mark.slow
def test_the_domains_are_the_users_and_nothing_of_the_sample_is_used(first_night):
    project, run_id, out = first_night
    data = project / "Datasets"
    stats = json.loads((data / "enhanced_data_stats.json").read_text(encoding="utf-8"))
    assert set(stats["per_domain"]) == {"company_faq", "general", "helpdesk", "onboarding", "sql"}
    assert not set(stats["per_domain"]) & SAMPLE_NAMES
    assert stats["data"]["read_sample"] is False
    # The knowledge step has no notes of the user's to index, so the sample's are not indexed either.
    assert "knowledge/ folder for this run's data" in out and not (data / "knowledge_base").exists()
    # theta-tiny's tokenizer was trained on the user's texts, not the sample's.
    meta = json.loads((project / "models" / "base" / "theta-tiny" / "theta_tiny.json").read_text(encoding="utf-8"))
    assert meta["corpus_sha256"] == corpus_digest(list(iter_corpus_texts(data)))
    assert meta["corpus_sha256"] != corpus_digest(list(iter_corpus_texts(data / "sample")))
    # No record of the sample was trained on; the domains of training, validation and the per-epoch check are
    # the user's.
    sample_questions = {r["question"] for f in (data / "sample").glob("*.json*") if f.name != "test_set.json"
                        for r in _records(f)}
    records = json.loads((data / "enhanced_training_data.json").read_text(encoding="utf-8"))["records"]
    assert records and not {r["question"] for r in records} & sample_questions
    history = json.loads((project / "models" / run_id / "loss_history.json").read_text(encoding="utf-8"))
    assert set(history[-1]["domain_eval"]) <= set(stats["per_domain"])
    assert all("reference_match" in v for v in history[-1]["domain_eval"].values())


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("question"), str)]


@pytest.mark.slow
def test_the_preflight_warns_about_the_broken_export(first_night):
    project, run_id, out = first_night
    preflight = json.loads((project / "models" / run_id / "preflight.json").read_text(encoding="utf-8"))
    (broken,) = [w for w in preflight["warnings"] if "helpdesk_export.json" in w]
    assert "breaks off" in broken and "export the file again" in broken
    assert any("company_faq_extra.json" in w and "--columns question=q,answer=a" in w for w in preflight["warnings"])
    assert any("prompts_only.jsonl" in w for w in preflight["warnings"])
    banner = out[out.index("Theta overnight run"):out.index("[1/5]")]
    assert re.search(r"WARNING +datasets: Datasets/helpdesk_export\.json: the JSON breaks off", banner)
    assert "pre-flight ok in" in out and "4 warnings" in out


@pytest.mark.slow
def test_the_report_opens_with_the_verdict_and_the_data_summary(first_night):
    project, run_id, out = first_night
    html = (project / "stats" / run_id / "report.html").read_text(encoding="utf-8")
    body = html[html.index("<body>"):]
    assert body.index("Verdict") < body.index("<h2>Data</h2>") < body.index("<h2>Settings</h2>") \
        < body.index("Test-set metrics")
    result = json.loads((project / "stats" / f"evaluation_{run_id}.json").read_text(encoding="utf-8"))
    verdict = " ".join(result["verdict"])
    assert verdict.startswith("theta-tiny was fine-tuned with the quick profile on ")
    assert "5 domains (company_faq, general, helpdesk, onboarding, sql)" in verdict
    assert f"against {fixed(result['base']['perplexity'], 2)} for the untrained theta-tiny" in verdict
    assert "demonstrates the pipeline" in verdict and "pre-flight estimated" in verdict
    assert result["base"]["same_tokenizer"] and result["base"]["perplexity"] > result["perplexity"]
    for text in ("records read", "dropped", "unsupported_shape", "weight_0_reply_as_context", "helpdesk"):
        assert text in body[body.index("<h2>Data</h2>"):body.index("<h2>Settings</h2>")], text
    generation = body[body.index("<h2>Generation</h2>"):]
    assert "greedy" in generation and "top_p" not in generation and "temperature" not in generation
    # The trainer's end: the measured time beside the estimate; CPU offload says it does nothing on a CPU.
    assert re.search(r"training took .+; the pre-flight estimated ", out)
    assert "CPU offload: inactive without a GPU" in out and "reference match" in out


def test_strict_refuses_the_broken_folder_in_the_preflight(tmp_path):
    run = StubbedRun(user_project(tmp_path))
    code, out, calls = run("--profile", "quick", "--strict", real=("src.training.preflight",))
    assert code == 2, out[-3000:]
    assert "FATAL datasets  Datasets/helpdesk_export.json: the JSON breaks off" in out
    assert "FAILED at step 'pre-flight'" in out and "Traceback" not in out
    assert [c[0] for c in step_calls(calls)].count("src.training.train_enhanced") == 0


def test_an_empty_datasets_folder_fails_in_the_preflight(tmp_path):
    project = user_project(tmp_path)
    for f in list((project / "Datasets").iterdir()):
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    code, out, _ = StubbedRun(project)("--profile", "quick", real=("src.training.preflight",))
    assert code == 2 and "FATAL datasets" in out and "holds no data file" in out and "[1/5]" not in out


def test_a_typod_flag_is_refused_naming_the_nearest_flag(tmp_path):
    run = StubbedRun(user_project(tmp_path))
    code, out, _ = run("--profil", "quick")
    assert code == 2 and "unknown option '--profil': did you mean --profile?" in out and "Traceback" not in out
    assert run.runs() == []
    code, out, _ = run("--profile", "quick", "--", "--epoch", "1", real=("src.training.preflight",))
    assert code == 2 and "unrecognized arguments: --epoch 1 (did you mean --epochs?)" in out
    assert "Traceback" not in out


# --- the pieces, by hand ------------------------------------------------------------------------------------------

def test_every_parser_is_exact():
    """allow_abbrev=False everywhere (issue 21.5): no ``argparse.ArgumentParser(`` under src/ or
    tests/benchmarks without it, and the trainer's parser takes no prefix."""
    root = Path(__file__).resolve().parents[1]
    for path in [*root.joinpath("src").rglob("*.py"), *root.joinpath("tests", "benchmarks").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"argparse\.ArgumentParser\(", text):
            call = text[m.end():text.find("\n\n", m.end())]
            assert "allow_abbrev=False" in call, path
    parser = build_parser()
    assert isinstance(parser, FlagParser) and parser.nearest_flag("--epoch") == "--epochs"
    with pytest.raises(SystemExit):
        parser.parse_args(["--epoch", "1"])


def test_help_shows_each_profiles_value():
    helps = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    assert helps["--use_ema"].endswith("(default off; on in quick, rtx3060, rtx3060-lora)")
    assert helps["--epochs"].endswith("(default 3; quick 5, rtx3060-lora 5, rtx3060 20)")
    assert helps["--use_gradient_noise"].endswith("(default off; on in quick)")
    assert helps["--no_ema"] == "turn --use_ema off"


def test_reference_match_gibberish_scores_zero_a_correct_answer_high():
    """The per-epoch score (issue 21.6): the quick model's gibberish earned 0.33 of the former score."""
    import random
    question = "What does a firewall filter?"
    reference = "A firewall filters network traffic using rules that allow or block packets."
    own = reference.lower().replace(".", "").split() + ["the", "of", "firewall", "network"]
    helpdesk = re.findall(r"\w+", (USER_DATA / "helpdesk.jsonl").read_text(encoding="utf-8").lower())
    rng = random.Random(0)
    score = lambda answer: GenerationCheck.score_answer(question, reference, answer)["reference_match"]  # noqa
    # random words of a domain's vocabulary (what an untrained model emits): nothing
    assert max(score(" ".join(rng.choice(helpdesk + own) for _ in range(30))) for _ in range(20)) == 0.0
    # a shuffle of the reference's own words, the worst case: little
    assert max(score(" ".join(rng.choice(own) for _ in range(30))) for _ in range(20)) <= 0.25
    assert score("firewall firewall firewall filter filter") == 0.0  # the question's words echoed
    assert score(reference) == pytest.approx(1.0)
    close = GenerationCheck.score_answer(question, reference,
                                         "A firewall filters network traffic with rules that block packets.")
    # by hand: recall of {firewall, filters, network, traffic, using, rules, that, allow, block, packets} is 8/10;
    # word pairs: 11 in the reference, 9 in the answer, 6 shared -> F1 12/20
    assert close["keyword_recall"] == pytest.approx(8 / 10) and close["pair_f1"] == pytest.approx(12 / 20)
    assert close["reference_match"] == pytest.approx(8 / 10 * 12 / 20)


def test_console_samples_are_cut_on_characters(tiny_model_dir):
    from src.model.theta_model import ThetaModel

    tok = ThetaModel.load(tiny_model_dir, device="cpu").tokenizer
    text = "Comment créer une règle ? Écrivez-la."
    ids = tok(text)["input_ids"]
    labels = [-100] * 5 + ids[5:]
    shown = bracketed_targets(tok, ids, labels)
    assert "\ufffd" not in shown and shown.replace("[", "").replace("]", "") == tok.decode(ids)
    assert shown_text("créer" + "\ufffd", 10) == "créer" and shown_text("Écrivez", 2) == "Éc"


def test_the_completion_email_puts_the_measured_time_beside_the_estimate(tmp_path):
    from src.training.run_emails import completion_email

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"perplexity": 9.5, "verdict": ["theta-tiny was fine-tuned on 3 records."]}))
    email = completion_email("run", {"status": "completed", "training_seconds": 335.0, "preflight_estimate_s": 355.0},
                             [], evaluation_file=evaluation)
    rows = dict(email.sections[1].rows)
    assert rows["training time"] == "5m 35s (pre-flight estimate 5m 55s)"
    assert email.sections[0].title == "Verdict" and "fine-tuned on 3 records" in email.sections[0].pre
