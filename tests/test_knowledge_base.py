"""knowledge_base_enhancer_main.py: passages, TF-IDF retrieval, contexts fed to preparation, domain vectors and
the consistency check.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/test_knowledge_base.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, run_script
from src.data_processing import knowledge_base_enhancer_main as kb
from src.data_processing.prepare_data_for_training import main as prepare_main


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "Datasets"
    (d / "knowledge").mkdir(parents=True)
    (d / "knowledge" / "dns.md").write_text(
        "# DNS\n\n## Caching\nResolvers cache each DNS answer until its TTL expires.\n\n"
        "## Records\nAn MX record names the mail servers of a domain.\n", encoding="utf-8")
    (d / "knowledge" / "kubernetes.txt").write_text(
        "Kubernetes pods\n\nA pod groups containers that share one network address and volumes.\n", encoding="utf-8")
    (d / "knowledge" / "extra.json").write_text(json.dumps(["Firewalls filter traffic by ordered rules."]),
                                                encoding="utf-8")
    records = [
        {"id": "n1", "domain": "networking", "question": "How long do resolvers cache a DNS answer?",
         "answer": "Until the TTL of the DNS record expires, resolvers reuse the cached DNS answer."},
        {"id": "n2", "domain": "networking", "question": "How long do resolvers cache a DNS answer?",
         "answer": "Forever, caches never expire on any platform whatsoever."},
        {"id": "c1", "domain": "cloud_computing", "question": "What is a Kubernetes pod?",
         "answer": "A pod is the smallest Kubernetes unit: containers sharing a network address and volumes. "
                   "Kubernetes schedules pods onto nodes."},
        {"id": "x1", "domain": "cloud_computing", "question": "Describe Kubernetes nodes",
         "answer": "Kubernetes nodes run pods. Kubernetes nodes are machines."},
    ]
    (d / "records.json").write_text(json.dumps(records), encoding="utf-8")
    return d


def test_passages_from_markdown_text_and_json(tmp_path):
    passages = kb.load_knowledge_passages(_folder(tmp_path) / "knowledge")
    assert [(p["file"], p["title"]) for p in passages] == [("dns.md", "Caching"), ("dns.md", "Records"),
                                                          ("extra.json", "extra"),
                                                          ("kubernetes.txt", "Kubernetes pods")]


def test_tfidf_values_and_ranking(tmp_path):
    idf = kb.compute_idf([["dns", "cache"], ["dns"], ["pod"]])
    assert idf["dns"] == pytest.approx(math.log(4 / 3) + 1) and idf["pod"] == pytest.approx(math.log(2) + 1)
    vec = kb.tfidf_vector(["dns", "dns", "pod"], idf)
    assert sum(v * v for v in vec.values()) == pytest.approx(1.0)
    index = kb.KnowledgeIndex(kb.load_knowledge_passages(_folder(tmp_path) / "knowledge"))
    best = index.search("when does a cached DNS answer expire", k=2)
    assert index.passages[best[0][0]]["title"] == "Caching"
    assert index.search("completely unrelated banana", k=2) == []


def test_with_context_feeds_preparation(tmp_path):
    d = _folder(tmp_path)
    assert kb.main(["--datasets_dir", str(d), "--with_context", "--top_k", "1", "--min_score", "0.1"]) == 0
    contexts = json.loads((d / "knowledge_base" / "contexts.json").read_text(encoding="utf-8"))["contexts"]
    assert contexts["n1"] == "Resolvers cache each DNS answer until its TTL expires."
    assert contexts["c1"].startswith("A pod groups containers")
    out = d / "enhanced_training_data.json"
    assert prepare_main(["--datasets_dir", str(d), "--no-create_test_set", "--min_domain_count", "0",
                         "--synthetic_ratio", "0", "--max_domain_fraction", "1", "--near_dup_threshold", "1"]) == 0
    by_id = {r["id"]: r for r in json.loads(out.read_text(encoding="utf-8"))["records"]}
    assert by_id["c1"]["context"] == contexts["c1"]
    # The knowledge folder and the knowledge step's outputs are never loaded as training data.
    assert all(not r["source"].startswith(("knowledge", "knowledge_base")) for r in by_id.values())
    # Without --with_context a stale contexts.json is removed.
    assert kb.main(["--datasets_dir", str(d)]) == 0
    assert not (d / "knowledge_base" / "contexts.json").exists()


def test_consistency_check_flags_disagreeing_answers(tmp_path):
    d = _folder(tmp_path)
    records, _ = kb.load_records(d, None, 20000)
    pairs = kb.consistency_check(records)
    assert [(p["a"], p["b"]) for p in pairs] == [("n1", "n2")]
    assert pairs[0]["question_similarity"] == 1.0 and pairs[0]["answer_similarity"] < 0.3


def test_domain_vectors_are_computed_from_the_data(tmp_path):
    d = _folder(tmp_path)
    records, _ = kb.load_records(d, None, 20000)
    vectors = kb.domain_vectors(records)
    assert vectors["cloud_computing"]["top_terms"][0] == "kubernetes"  # 5 uses, absent from networking
    assert vectors["networking"]["records"] == 2 and "dns" in vectors["networking"]["vector"]
    norm = sum(v * v for v in vectors["networking"]["vector"].values())
    assert norm == pytest.approx(1.0, abs=1e-3)
    # Preparation's classifier labels a record without a domain with the same vectors.
    from src.data_processing.domains import DomainClassifier

    classify = DomainClassifier(vectors, {k: v["vector"] for k, v in vectors.items()})
    assert classify("Where do Kubernetes pods run?", "On nodes.") == "cloud_computing"
    assert DomainClassifier.from_records(records)("Where do Kubernetes pods run?", "On nodes.") == "cloud_computing"


def test_shipped_knowledge_folder_and_cli():
    passages = kb.load_knowledge_passages(PROJECT_ROOT / "Datasets" / "sample" / "knowledge")
    assert len({p["file"] for p in passages}) >= 10
    index = kb.KnowledgeIndex(passages)
    top = index.search("What is the smallest unit Kubernetes schedules?", k=1)[0][0]
    assert passages[top]["file"] == "containers_and_kubernetes.md"
    res = run_script(["src/data_processing/knowledge_base_enhancer_main.py", "--query", "TTL of a DNS answer",
                      "--top_k", "1"])
    assert res.returncode == 0 and "dns.md" in res.stdout
    res = run_script(["-m", "src.data_processing.knowledge_base_enhancer_main", "--top_k", "0"])
    assert res.returncode == 2 and "--top_k must be at least 1" in res.stderr
