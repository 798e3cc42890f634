"""Shared fixtures: a tiny dataset, a tiny GPT-2 model built from it, and a prepared data file.

Everything is built once per test session in a temporary folder, offline, in a few seconds. The model is a
2-layer, 64-wide GPT-2 with a few-hundred-token vocabulary: at GPT-2's 50257 tokens the output layer would
dominate every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEST_CONFIG = dict(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=384)

_TOPICS = {
    "cybersecurity": [("a firewall", "filters network traffic by rules so only allowed connections pass"),
                      ("phishing", "tricks people into revealing passwords through fake messages"),
                      ("encryption", "turns readable data into ciphertext that needs a key to read"),
                      ("a hash function", "maps data to a fixed-size digest that is hard to reverse"),
                      ("multi-factor authentication", "asks for two or more kinds of proof before login"),
                      ("least privilege", "gives each account only the access its job needs"),
                      ("malware", "is software written to damage systems or steal data"),
                      ("a VPN", "carries traffic through an encrypted tunnel to a trusted network")],
    "programming": [("a list comprehension", "builds a list from an iterable in one expression"),
                    ("recursion", "solves a problem by calling the same function on a smaller input"),
                    ("a unit test", "checks one small piece of code against an expected result"),
                    ("a variable", "names a value so the program can use it later"),
                    ("a loop", "repeats a block of code while a condition holds"),
                    ("version control", "records changes to files so you can review and undo them"),
                    ("a function", "groups statements under a name so they can be reused"),
                    ("an exception", "signals an error that interrupts the normal flow of a program")],
    "networking": [("DNS", "translates domain names into IP addresses"),
                   ("TCP", "delivers a reliable ordered byte stream between two hosts"),
                   ("UDP", "sends datagrams without setting up a connection first"),
                   ("a subnet", "splits an IP network into smaller address ranges"),
                   ("DHCP", "hands out IP addresses to devices joining a network"),
                   ("a router", "forwards packets between different networks"),
                   ("latency", "is the time a packet takes to travel from sender to receiver"),
                   ("a VLAN", "separates one physical switch into several logical networks")],
}


def make_records() -> list[dict]:
    """48 short records over three domains, two phrasings per topic; the second one has a code block."""
    records = []
    for domain, topics in _TOPICS.items():
        for i, (name, fact) in enumerate(topics):
            records.append({"id": f"{domain[:4]}-{i:02d}a", "domain": domain, "question": f"What is {name}?",
                            "answer": f"{name[0].upper() + name[1:]} {fact}. It is a core idea in {domain}."})
            records.append({"id": f"{domain[:4]}-{i:02d}b", "domain": domain,
                            "question": f"Why does {name} matter in {domain}?",
                            "answer": f"Because {name} {fact}.\n```python\nprint('{domain}')\n```"})
    return records


@pytest.fixture(scope="session")
def tiny_records() -> list[dict]:
    return make_records()


@pytest.fixture(scope="session")
def tiny_datasets_dir(tmp_path_factory, tiny_records) -> Path:
    """A Datasets/ folder in two shapes: a JSON list and JSON Lines."""
    d = tmp_path_factory.mktemp("Datasets")
    (d / "part_a.json").write_text(json.dumps(tiny_records[:30], indent=2), encoding="utf-8")
    (d / "part_b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tiny_records[30:]), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_datasets_dir) -> Path:
    from src.model.theta_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "theta-tiny-test", tiny_datasets_dir,
                            **TINY_TEST_CONFIG)


@pytest.fixture(scope="session")
def tiny_model_no_dropout(tmp_path_factory, tiny_datasets_dir) -> Path:
    """The same tiny model with every dropout off: for tests that compare runs whose batches are split differently."""
    from src.model.theta_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "theta-tiny-nodrop", tiny_datasets_dir,
                            **TINY_TEST_CONFIG, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, tiny_datasets_dir) -> Path:
    """``enhanced_training_data.json`` from the tiny dataset (with a created test set), in its own folder."""
    import shutil

    from src.data_processing.prepare_data_for_training import main as prepare_main

    d = tmp_path_factory.mktemp("prepared")
    shutil.copytree(tiny_datasets_dir, d / "Datasets")
    # balancing and augmentation off: the fixture stays at the tiny dataset's 48 records
    assert prepare_main(["--datasets_dir", str(d / "Datasets"), "--validation_fraction", "0.2",
                         "--min_domain_count", "0", "--synthetic_ratio", "0"]) == 0
    return d / "Datasets" / "enhanced_training_data.json"


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}``: the tiny random model of every supported family (tests/model_families.py), built once
    per session; tests that change one copy it first."""
    from model_families import FAMILIES, build_family

    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


def run_script(args: list[str], cwd: Path = PROJECT_ROOT, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python <args>`` with this interpreter; returns the completed process (text output)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, **kwargs)
