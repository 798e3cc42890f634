"""The shipped sample data (Datasets/sample/): valid, broad enough, in the canonical format, its test set held
out, and its file names giving its domains."""

from __future__ import annotations

import json
import re
from collections import Counter

from conftest import PROJECT_ROOT

DATASETS = PROJECT_ROOT / "Datasets" / "sample"
FIELDS = {"id", "question", "answer", "domain", "source"}


def _load(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["qa_pairs"] if isinstance(data, dict) else data


def _training_files():
    return sorted(p for p in DATASETS.glob("*.json*") if p.name not in
                  {"test_set.json", "enhanced_training_data.json", "enhanced_data_stats.json"})


def _norm(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


def test_sample_data_is_broad_and_canonical():
    files = _training_files()
    assert len(files) >= 4
    records = [r for f in files for r in _load(f)]
    assert len(records) >= 400
    domains = Counter(r["domain"] for r in records)
    assert len(domains) >= 6 and min(domains.values()) >= 50, domains
    for r in records:
        assert FIELDS <= set(r), r.get("id")
        assert r["question"].strip() and r["answer"].strip(), r["id"]
        assert r["answer"].count("```") % 2 == 0, r["id"]
    assert len({r["id"] for r in records}) == len(records)
    assert len({_norm(r["question"]) for r in records}) == len(records)
    programming = [r for r in records if r["domain"] == "programming"]
    assert sum("```" in r["answer"] for r in programming) >= 30  # real code blocks


def test_python_code_blocks_compile():
    records = [r for f in _training_files() for r in _load(f)] + _load(DATASETS / "test_set.json")
    blocks = [m for r in records for m in re.findall(r"```python\n(.*?)```", r["answer"], flags=re.S)]
    assert len(blocks) >= 30
    for code in blocks:
        compile(code, "<answer>", "exec")


def test_test_set_is_held_out():
    test = _load(DATASETS / "test_set.json")
    assert len(test) >= 60
    assert len({t["domain"] for t in test}) >= 6
    train_questions = {_norm(r["question"]) for f in _training_files() for r in _load(f)}
    assert not train_questions & {_norm(t["question"]) for t in test}


def test_sample_data_prepares_without_losing_a_record(tmp_path):
    import shutil

    from src.data_processing.prepare_data_for_training import main

    d = tmp_path / "Datasets"  # the shipped files only, as a folder of one's own
    shutil.copytree(DATASETS, d, ignore=shutil.ignore_patterns("enhanced_*", "knowledge_base", "knowledge"))
    out = tmp_path / "enhanced_training_data.json"
    assert main(["--datasets_dir", str(d), "--output", str(out), "--test_set", str(d / "test_set.json")]) == 0
    stats = json.loads((tmp_path / "enhanced_data_stats.json").read_text())
    assert stats["dropped_total"] == 0, stats["dropped"]
    records = json.loads(out.read_text())["records"]
    source_ids = {r["id"] for f in _training_files() for r in _load(f)}
    assert source_ids <= {r["id"] for r in records}  # every shipped record reaches the prepared file
    assert {r["split"] for r in records} == {"train", "validation"}


def test_sample_file_names_give_the_sample_domains():
    from src.data_processing.domains import DomainResolver

    resolver = DomainResolver()
    for f in _training_files():
        records = _load(f)
        assert {r["domain"] for r in records} == {resolver.resolve(None, f"sample/{f.name}")[0]}, f.name
