"""The user's own data (issue 21): a realistic folder of one's own (tests/fixtures/user_data/, see its README.md)
next to the shipped sample, prepared with the overnight scripts' flags (``--profile quick``): the domains are the
user's, nothing of the sample is read, indexed or tokenised, the survey and the stats name the broken and the
empty-result files, ``--strict`` makes them fatal, ``--columns`` reads renamed fields, and an assistant reply
of weight 0 is never a target.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_user_data.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from src.data_processing import knowledge_base_enhancer_main as kb
from src.data_processing import prepare_data_for_training as prep
from src.data_processing.domains import SAMPLE_DOMAINS
from src.data_processing.loading import ColumnMap, survey_datasets
from src.utils.common import UserError, run_entry_point
from src.utils.data_layout import resolve_sources, resolve_test_set

USER_DATA = Path(__file__).parent / "fixtures" / "user_data"
SAMPLE_NAMES = set(SAMPLE_DOMAINS) | {"general_conversation"}
# What is wrong with the fixture on purpose, file by file (its README.md says why).
EXPECTED_PROBLEMS = {("helpdesk_export.json", "unreadable_file"), ("company_faq_extra.json", "nothing_kept"),
                     ("prompts_only.jsonl", "nothing_kept"), ("notes.yaml", "not_read")}


def user_folder(root: Path) -> Path:
    """``root/Datasets``: the project's Datasets/ as shipped (README, sample/) plus the user's files."""
    d = root / "Datasets"
    shutil.copytree(PROJECT_ROOT / "Datasets", d, ignore=shutil.ignore_patterns("enhanced_*", "knowledge_base"))
    shutil.copytree(USER_DATA, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))
    return d


def _stats_and_records(d: Path) -> tuple[dict, list[dict]]:
    stats = json.loads((d / "enhanced_data_stats.json").read_text(encoding="utf-8"))
    return stats, json.loads((d / "enhanced_training_data.json").read_text(encoding="utf-8"))["records"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict, list[dict], list[dict]]:
    """One preparation as the overnight scripts run it: ``--profile quick`` and nothing else."""
    d = user_folder(tmp_path_factory.mktemp("user"))
    assert prep.main(["--datasets_dir", str(d), "--profile", "quick"]) == 0
    stats, records = _stats_and_records(d)
    test = json.loads((d / "enhanced_test_set.json").read_text(encoding="utf-8"))
    return d, stats, records, test


def test_the_domains_are_the_users_and_nothing_of_the_sample_is_read(quick_run):
    d, stats, records, test = quick_run
    domains = {r["domain"] for r in records} | {r["domain"] for r in test}
    # helpdesk.jsonl, the sql/ folder, company_faq.csv, onboarding.jsonl; export_2024.jsonl names nothing, so its
    # records went to the classifier, whose labels are these domains plus general
    assert {"helpdesk", "sql", "company_faq", "onboarding"} <= domains <= {"helpdesk", "sql", "company_faq",
                                                                           "onboarding", "general"}
    assert not domains & SAMPLE_NAMES
    assert not [r for r in records + test if r["source"].startswith("sample/")]
    by_source = {r["source"]: r["domain"] for r in records if r.get("domain_source") == "file_name"}
    assert by_source["sql/joins.json"] == by_source["sql/performance.json"] == "sql"
    assert {r["domain_source"] for r in records if r["source"] == "export_2024.jsonl"} == {"classifier"}
    assert stats["data"]["read_sample"] is False and stats["data"]["test_set_kind"] == "generated"
    # the held-out set is drawn into a file Theta names as its own; nothing is written as if it were input
    assert stats["test_records"] == len(test) > 0 and not (d / "test_set.json").exists()
    # the project's own README is not "skipped" on every run; the YAML file is, with what to do about it
    assert [s["file"] for s in stats["skipped_files"]] == ["notes.yaml"]
    assert "save it as JSON" in stats["skipped_files"][0]["hint"]
    assert "read it with none" not in prep.summary_table(stats)


def test_the_broken_and_the_empty_result_files_are_named_by_the_survey_and_the_stats(quick_run, tmp_path):
    d, stats, _, _ = quick_run
    assert {(p["file"], p["kind"]) for p in stats["problems"]} == EXPECTED_PROBLEMS
    survey = survey_datasets(user_folder(tmp_path))
    assert {(p.file, p.kind) for p in survey} == EXPECTED_PROBLEMS  # the same readers, the same verdict
    by_file = {p.file: p for p in survey}
    assert "line 44" in by_file["helpdesk_export.json"].message  # where the export breaks off
    assert by_file["company_faq_extra.json"].fix.endswith("--columns question=q,answer=a")
    assert "without answers" in by_file["prompts_only.jsonl"].fix
    assert not any(p.fatal for p in survey)
    # the unknown fields' drop line names the flag too
    assert "--columns question=q,answer=a" in stats["dropped"]["unsupported_shape"]["examples"][0]["detail"]


def test_a_file_read_in_part_is_still_checked_at_its_end(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    shutil.copy(USER_DATA / "helpdesk_export.json", d)
    problems = survey_datasets(d, max_records=3)  # stops reading after 3 records: the break is at the end
    assert [(p.file, p.kind) for p in problems] == [("helpdesk_export.json", "unreadable_file")]


def test_an_empty_folder_is_fatal_and_the_sample_alone_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    (problem,) = survey_datasets(tmp_path / "empty")
    assert problem.kind == "empty_datasets" and problem.fatal
    with pytest.raises(UserError, match="holds no data file"):
        prep.main(["--datasets_dir", str(tmp_path / "empty"), "--profile", "quick"])
    assert survey_datasets(PROJECT_ROOT / "Datasets") == []  # the shipped sample has nothing to report


def test_more_than_five_percent_of_a_file_dropped_is_a_problem(tmp_path):
    d = tmp_path / "Datasets"
    d.mkdir()
    good = [{"question": f"What does switch {i} do?", "answer": f"Switch {i} turns light {i} on."} for i in range(100)]
    for bad, expected in ((5, []), (6, [("lights.json", "many_dropped")])):  # 5 of 100 is 5%, not more
        records = [{**r, "answer": ""} if i < bad else r for i, r in enumerate(good)]
        (d / "lights.json").write_text(json.dumps(records), encoding="utf-8")
        problems = survey_datasets(d)
        assert [(p.file, p.kind) for p in problems] == expected, bad
    assert problems[0].message.startswith("6 of 100 records (6%) dropped") and "empty_answer 6" in problems[0].message


def test_strict_makes_the_problems_fatal(tmp_path, capsys):
    d = user_folder(tmp_path)
    assert run_entry_point(prep.main, ["--datasets_dir", str(d), "--profile", "quick", "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strict: ") and "company_faq_extra.json" in err
    assert not (d / "enhanced_training_data.json").exists()


def test_columns_reads_renamed_fields_inline_and_from_a_file(tmp_path):
    d = user_folder(tmp_path)
    mapping = tmp_path / "columns.json"
    mapping.write_text(json.dumps({"company_faq_extra.json": {"question": "q", "answer": "a"}}), encoding="utf-8")
    for spec in ("question=q,answer=a", str(mapping)):
        assert prep.main(["--datasets_dir", str(d), "--profile", "quick", "--columns", spec]) == 0
        stats, records = _stats_and_records(d)
        assert stats["per_file"]["company_faq_extra.json"]["valid"] == 12
        extra = [r for r in records if r["source"] == "company_faq_extra.json"]
        assert extra and {r["domain"] for r in extra} == {"company_faq"}  # company_faq + a trailing "extra"
        assert ("company_faq_extra.json", "nothing_kept") not in {(p["file"], p["kind"]) for p in stats["problems"]}
    with pytest.raises(UserError, match="--columns .*'prompt' is not a field Theta reads"):
        ColumnMap.parse("prompt=q")


def test_a_reply_of_weight_0_is_context_never_a_target(quick_run):
    _, stats, records, test = quick_run
    weight0, weight1 = set(), set()
    for line in (USER_DATA / "onboarding.jsonl").read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            if m["role"] == "assistant":
                (weight0 if m["weight"] == 0 else weight1).add(m["content"])
    answers = {r["answer"] for r in records + test}
    assert not answers & weight0
    onboarding = [r for r in records if r["source"] == "onboarding.jsonl"]
    kept = {r["answer"] for r in onboarding} | {r["answer"] for r in test if r["source"] == "onboarding.jsonl"}
    assert kept == weight1
    # the weight-0 reply is what the trained turn sees before its own question
    assert all("Assistant: " in r["context"] for r in onboarding)
    assert stats["set_aside"]["weight_0_reply_as_context"] == len(weight0) == 15


def test_nothing_of_the_sample_is_indexed_or_tokenised(tmp_path):
    from src.model.theta_model import iter_corpus_texts

    d = user_folder(tmp_path)
    sources = resolve_sources(d)
    assert sources.knowledge_dirs == () and not sources.read_sample
    with pytest.raises(UserError, match="no knowledge notes"):
        kb.main(["--datasets_dir", str(d)])
    (d / "knowledge").mkdir()
    (d / "knowledge" / "vpn.md").write_text("# VPN\n\nThe VPN needs a certificate renewed every year.\n",
                                            encoding="utf-8")
    assert kb.main(["--datasets_dir", str(d)]) == 0
    index = json.loads((d / "knowledge_base" / "index.json").read_text(encoding="utf-8"))
    assert [p["file"] for p in index["passages"]] == ["vpn.md"]  # not the sample's 34 passages
    sample_texts = {r["question"] for f in (d / "sample").glob("*.json*") for r in _records_of(f)}
    corpus = list(iter_corpus_texts(d))
    assert corpus and not set(corpus) & sample_texts
    # asked for, the sample comes in, its notes too
    both = resolve_sources(d, include_sample=True)
    assert both.read_sample and both.read_user and d / "sample" / "knowledge" in both.knowledge_dirs
    assert both.test_set_kind == "generated"  # the sample's held-out set says nothing about the user's domains


def _records_of(path: Path) -> list[dict]:
    if path.name == "test_set.json":
        return []
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["qa_pairs"] if isinstance(data, dict) else data


def test_one_function_names_the_held_out_set_for_preparation_and_evaluation(tmp_path):
    from src.training.evaluate_model import parse_args as evaluate_args

    d = user_folder(tmp_path)
    assert resolve_test_set(d) == d / "enhanced_test_set.json"
    (d / "test_set.json").write_text("[]", encoding="utf-8")
    assert resolve_test_set(d) == d / "test_set.json"  # the user's own wins
    shutil.rmtree(tmp_path / "Datasets")
    (tmp_path / "Datasets").mkdir()
    shutil.copytree(PROJECT_ROOT / "Datasets" / "sample", tmp_path / "Datasets" / "sample")
    assert resolve_test_set(tmp_path / "Datasets") == tmp_path / "Datasets" / "sample" / "test_set.json"
    # the evaluator's default is that same answer for the project's folder
    assert evaluate_args(["--model_path", "models/x/theta_final"]).test_data == resolve_test_set(
        PROJECT_ROOT / "Datasets")
