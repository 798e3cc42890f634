"""Prepare Datasets/ for training: load, validate, normalise, dedup, score, rate, balance, augment, order, split.

Every input record ends up either in the output or in the stats as dropped, with its reason and its place
(file, record index, line).

    python src/data_processing/prepare_data_for_training.py
    python -m src.data_processing.prepare_data_for_training --datasets_dir Datasets --seed 42
    python -m src.data_processing.prepare_data_for_training --max_domain_fraction 1 --min_domain_count 0 \\
        --synthetic_ratio 0 --near_dup_threshold 1      # every optional stage off

Stages, in order (documentation/DATA_PROCESSING.md has the details and the formulas):
 1. load every *.json / *.jsonl under --datasets_dir, streamed (not our outputs, the test set, knowledge/);
 2. validate and normalise (NFC, whitespace; code blocks byte for byte), domain aliases, inferred domains;
 3. quality score; exact dedup keeping the better copy; test-set overlap and near-duplicates removed;
    near-duplicates (MinHash/LSH over word 3-grams) keeping the better copy; --min_quality filter;
 4. split train/validation by a hash of the id, per domain (adding a file moves no existing record);
 5. synthetic examples from training records (--synthetic_ratio), then domain balancing (cap and floor);
 6. difficulty, curriculum order (easy to hard per domain, domains interleaved), atomic outputs.

Outputs (written atomically):
- ``Datasets/enhanced_training_data.json``: ``{"format_version": 1, "records": [...]}``, one record per line.
- ``Datasets/enhanced_data_stats.json``: counts per file, domain and drop reason (first examples of each), dedup
  and balancing figures, score histograms, stage timings.
- ``Datasets/test_set.json``: only when it does not exist yet and --create_test_set is on (the default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.augmentation import Augmenter
from src.data_processing.json_stream import iter_file_items
from src.data_processing.near_duplicates import find_near_duplicates
from src.data_processing.text_quality import CODE_FENCE, difficulty, normalise_text, quality_score
from src.utils.common import (PROJECT_ROOT, UserError, atomic_open, atomic_write_json, read_json, run_entry_point,
                              setup_logging, stable_hash)
from src.utils.data_contract import PREPARED_FORMAT_VERSION, question_key  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

FORMAT_VERSION = PREPARED_FORMAT_VERSION
OUTPUT_NAMES = {"enhanced_training_data.json", "enhanced_data_stats.json"}
SKIPPED_DIRS = {"knowledge", "knowledge_base"}  # the knowledge folder and the knowledge step's outputs
DROP_EXAMPLES = 3  # first examples kept per drop reason in the stats
# Problems with the input itself; --strict makes each of them fatal (dedup, balancing and --min_quality are not).
INPUT_PROBLEMS = {"invalid_json", "invalid_utf8", "empty_file", "unreadable_file", "unsupported_shape",
                  "missing_question", "missing_answer", "wrong_type_question", "wrong_type_answer",
                  "empty_question", "empty_answer", "control_characters", "too_long"}

DOMAIN_ALIASES = {
    "security": "cybersecurity", "cyber_security": "cybersecurity", "infosec": "cybersecurity",
    "information_security": "cybersecurity", "netsec": "cybersecurity",
    "coding": "programming", "software": "programming", "code": "programming", "software_engineering": "programming",
    "development": "programming", "dev": "programming",
    "network": "networking", "networks": "networking", "network_engineering": "networking",
    "datascience": "data_science", "ml": "data_science", "machine_learning": "data_science",
    "ai": "data_science", "analytics": "data_science", "statistics": "data_science",
    "cloud": "cloud_computing", "cloudcomputing": "cloud_computing", "devops": "cloud_computing",
    "general": "general_conversation", "chat": "general_conversation", "conversation": "general_conversation",
    "smalltalk": "general_conversation", "small_talk": "general_conversation",
}
# Keyword classifier for records without a domain: the domain whose keywords occur most often wins.
DOMAIN_KEYWORDS = {
    "cybersecurity": "attack malware phishing encryption firewall vulnerability exploit password authentication "
                     "tls certificate threat xss injection mfa ransomware breach",
    "programming": "function python code variable class loop compile javascript git api bug debug list string "
                   "method object recursion",
    "networking": "tcp udp ip dns dhcp router subnet packet ethernet port protocol vlan latency bgp switch",
    "data_science": "model data regression classification dataset feature statistics pandas training accuracy "
                    "mean variance cluster",
    "cloud_computing": "cloud aws azure gcp kubernetes container serverless instance region scaling storage "
                       "terraform docker",
}
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SURROGATES = re.compile(r"[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or broken \\u escapes
TOKEN_PIECE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+")  # GPT-2 pre-tokenizer
OUTPUT_KEYS = ("id", "question", "answer", "domain", "quality_score", "difficulty", "has_code", "source", "split")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

class DropLog:
    """Counts of dropped records per reason, with the first few examples of each, and per-file counts."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = defaultdict(list)
        self.per_file: dict[str, Counter] = defaultdict(Counter)
        self.strict = False

    def drop(self, reason: str, source: str, index: int | None, detail: str = "", line: int | None = None) -> None:
        if self.strict and reason in INPUT_PROBLEMS:
            where = f"{source}" + (f", record {index}" if index is not None else "") + \
                    (f", line {line}" if line is not None and "line " not in detail else "")
            raise UserError(f"--strict: {reason} in {where}: {detail}")
        self.counts[reason] += 1
        self.per_file[source][reason] += 1
        if len(self.examples[reason]) < DROP_EXAMPLES:
            ex = {"source": source, "index": index, "detail": detail[:200]}
            if line is not None:
                ex["line"] = line
            self.examples[reason].append(ex)

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples[reason]} for reason, n in self.counts.most_common()}


def _message_text(content: object) -> object:
    """OpenAI-style content may be a list of parts; their text parts are joined."""
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else content
    return content


def _records_from_item(item: object) -> Iterator[dict]:
    """Map one input item (any shape DESIGN.md accepts) to zero or more ``{question, answer, ...}`` dicts."""
    if not isinstance(item, dict):
        return
    if "question" in item or "answer" in item:
        yield item
    elif "instruction" in item and "output" in item:
        question = item["instruction"]
        if isinstance(question, str) and isinstance(item.get("input"), str) and item["input"].strip():
            question = f"{question}\n\n{item['input']}"
        yield {**item, "question": question, "answer": item["output"]}
    elif "prompt" in item and "chosen" in item:
        yield {**item, "question": item["prompt"], "answer": item["chosen"]}
    elif isinstance(item.get("conversations") or item.get("messages"), list):
        turns = item.get("conversations") or item.get("messages")
        pending, turn = None, 0
        for msg in turns:
            if not isinstance(msg, dict):
                continue
            role = str(msg.get("role", msg.get("from", ""))).lower()
            content = _message_text(msg.get("content", msg.get("value")))
            if role in ("user", "human", "prompter"):
                pending = content
            elif role in ("assistant", "gpt", "bot", "model") and pending is not None:
                rec = {"question": pending, "answer": content, "domain": item.get("domain"), "turn": turn}
                if item.get("id") not in (None, ""):
                    rec["id"] = f"{item['id']}-t{turn}"
                yield rec
                pending, turn = None, turn + 1


def dataset_files(datasets_dir: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Input files under ``datasets_dir``, sorted: ``*.json``/``*.jsonl``, not our outputs, not ``exclude``,
    nothing under ``knowledge/``, ``knowledge_base/`` or a hidden folder."""
    excluded = {Path(p).resolve() for p in exclude}
    files = []
    for path in Path(datasets_dir).rglob("*"):
        rel = path.relative_to(datasets_dir)
        if path.suffix not in (".json", ".jsonl") or not path.is_file() or path.name in OUTPUT_NAMES:
            continue
        if rel.parts[0] in SKIPPED_DIRS or any(part.startswith(".") for part in rel.parts):
            continue
        if path.resolve() in excluded:
            continue
        files.append(path)
    return sorted(files)


def iter_file_records(path: Path, rel: str, drops: DropLog, file_stats: dict | None = None) -> Iterator[dict]:
    """Records of one file, each with ``source``, ``source_index`` and ``source_line``; problems go to ``drops``."""
    stats = file_stats if file_stats is not None else {}
    stats.setdefault("items", 0)
    stats.setdefault("records", 0)
    for item in iter_file_items(path):
        if item.error is not None:
            drops.drop(item.reason, rel, item.index, item.error, item.line)
            if item.fatal:
                stats["error"] = item.error
            continue
        stats["items"] += 1
        produced = False
        for rec in _records_from_item(item.value):
            produced = True
            stats["records"] += 1
            rec = dict(rec)
            rec["source"], rec["source_index"], rec["source_line"] = rel, item.index, item.line
            yield rec
        if not produced:
            value = item.value
            detail = f"keys: {sorted(value)[:8]}" if isinstance(value, dict) else f"item is {type(value).__name__}"
            drops.drop("unsupported_shape", rel, item.index, detail, item.line)


def iter_all_datasets(datasets_dir: Path, exclude: Iterable[Path] = (), drops: DropLog | None = None,
                      per_file: dict | None = None, progress: bool = False) -> Iterator[dict]:
    """Stream every record of every input file (see ``dataset_files``), with a progress bar on a terminal."""
    drops = drops if drops is not None else DropLog()
    per_file = per_file if per_file is not None else {}
    files = dataset_files(Path(datasets_dir), exclude)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="loading", dynamic_ncols=True)
    n = 0
    try:
        for path in files:
            rel = path.relative_to(datasets_dir).as_posix()
            per_file[rel] = {}
            if bar is not None:
                bar.set_description(f"loading {rel[-30:]}")
            for rec in iter_file_records(path, rel, drops, per_file[rel]):
                n += 1
                if bar is not None and n % 5000 == 0:
                    bar.set_postfix(records=n, refresh=False)
                yield rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix(records=n)
    finally:
        if bar is not None:
            bar.close()


def load_all_datasets(datasets_dir: Path, exclude: Iterable[Path] = (), drops: DropLog | None = None,
                      per_file: dict | None = None) -> list[dict]:
    """Every record of every input file as a list (``iter_all_datasets`` streams the same)."""
    return list(iter_all_datasets(datasets_dir, exclude, drops, per_file))


# ---------------------------------------------------------------------------------------------------------------
# Validation and normalisation
# ---------------------------------------------------------------------------------------------------------------

def normalise_domain(domain: object) -> str | None:
    """Lower case, spaces and dashes to ``_``, aliases resolved; None when there is no usable name."""
    if not isinstance(domain, str) or not domain.strip():
        return None
    key = re.sub(r"[\s\-/]+", "_", domain.strip().lower())
    return sys.intern(DOMAIN_ALIASES.get(key, key))  # one string object per domain, not one per record


class DomainClassifier:
    """Infers a missing domain: cosine against the knowledge step's per-domain term vectors when they exist
    (``knowledge_base/domain_vectors.json``), else the keyword counts of ``DOMAIN_KEYWORDS``."""

    def __init__(self, vectors: dict[str, dict[str, float]] | None = None) -> None:
        self.vectors = vectors or {}

    def __call__(self, question: str, answer: str) -> str:
        words = Counter(re.findall(r"[a-z][a-z0-9_]+", f"{question} {answer}".lower()))
        if self.vectors:
            scores = {d: sum(w * words[t] for t, w in vec.items() if t in words) for d, vec in self.vectors.items()}
        else:
            scores = {d: sum(words[k] for k in kws.split()) for d, kws in DOMAIN_KEYWORDS.items()}
        best = max(sorted(scores), key=lambda d: scores[d])
        return best if scores[best] > 0 else "general_conversation"


def infer_domain(question: str, answer: str) -> str:
    return DomainClassifier()(question, answer)


def approx_tokens(text: str) -> int:
    """GPT-2 pre-tokenizer pieces: a lower bound of the BPE token count, computed without a tokenizer."""
    return len(TOKEN_PIECE.findall(text))


def validate_record(rec: dict, drops: DropLog, max_chars: int, max_tokens: int = 0,
                    classify=infer_domain) -> dict | None:
    """The normalised record, or None after logging the reason it is dropped."""
    source, index, line = rec.get("source", "?"), rec.get("source_index"), rec.get("source_line")
    for field in ("question", "answer"):
        value = rec.get(field)
        if value is None:
            drops.drop(f"missing_{field}", source, index, "", line)
            return None
        if not isinstance(value, str):
            drops.drop(f"wrong_type_{field}", source, index, type(value).__name__, line)
            return None
        if not value.isascii():
            if SURROGATES.search(value):
                drops.drop("invalid_utf8", source, index, f"{field} holds bytes that are not UTF-8", line)
                return None
        if CONTROL_CHARS.search(value):
            drops.drop("control_characters", source, index, field, line)
            return None
        if not value.strip():
            drops.drop(f"empty_{field}", source, index, "", line)
            return None
    question, answer = normalise_text(rec["question"]), normalise_text(rec["answer"])
    longest = max(len(question), len(answer))
    if longest > max_chars:
        drops.drop("too_long", source, index, f"{longest} characters > --max_answer_chars {max_chars}", line)
        return None
    if max_tokens and max(approx_tokens(question), approx_tokens(answer)) > max_tokens:
        drops.drop("too_long", source, index, f"over --max_answer_tokens {max_tokens}", line)
        return None
    domain = normalise_domain(rec.get("domain"))
    rid = rec.get("id")
    out = {"id": str(rid) if rid not in (None, "") and not isinstance(rid, (dict, list)) else f"{source}#{index}",
           "question": question, "answer": answer, "domain": domain or classify(question, answer),
           "source": source, "source_index": index, "has_code": CODE_FENCE in answer or CODE_FENCE in question}
    if domain is None:
        out["domain_inferred"] = True
    for key in ("context", "turn"):
        if rec.get(key) not in (None, ""):
            out[key] = rec[key]
    if rec.get("synthetic") is True:
        out["synthetic"] = True
        if rec.get("origin") is not None:
            out["origin"] = str(rec["origin"])
    return out


def dedup_key(rec: dict) -> bytes:
    """Exact-duplicate key: 16-byte BLAKE2b of question + answer, lower-cased, whitespace runs collapsed
    (bytes, not hex: a million keys fit in about 80 MB)."""
    text = " ".join(f"{rec['question']}\x00{rec['answer']}".lower().split())
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _PairTexts:
    """``question + " " + answer`` of test records then records, built on demand (no second copy of the data)."""

    def __init__(self, *parts: list[dict]) -> None:
        self.records = [r for part in parts for r in part]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> str:
        r = self.records[i]
        return f"{r['question']} {r['answer']}"

    def __iter__(self):
        return (f"{r['question']} {r['answer']}" for r in self.records)


# ---------------------------------------------------------------------------------------------------------------
# Scores, ordering, split
# ---------------------------------------------------------------------------------------------------------------

def compute_quality_scores(records: list[dict]) -> list[dict]:
    """Set ``quality_score`` on every record (formula: ``text_quality.quality_score``)."""
    for rec in records:
        rec["quality_score"] = quality_score(rec["question"], rec["answer"])
    return records


def compute_difficulty(records: list[dict]) -> list[dict]:
    """Set ``difficulty`` (1-5) on every record (formula: ``text_quality.difficulty``)."""
    for rec in records:
        rec["difficulty"] = difficulty(rec["question"], rec["answer"], rec["has_code"])
    return records


def apply_curriculum_ordering(records: list[dict]) -> list[dict]:
    """Easy to hard within each domain (difficulty, answer length, id), domains interleaved in proportion:
    the k-th of n records of a domain sits at position (k + 0.5) / n of the run, so every stretch of the output
    mixes all domains and moves from easy to hard."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_domain[rec["domain"]].append(rec)
    keyed = []
    for domain, recs in sorted(by_domain.items()):
        recs.sort(key=lambda r: (r["difficulty"], len(r["answer"]), r["id"]))
        n = len(recs)
        keyed.extend(((k + 0.5) / n, domain, rec) for k, rec in enumerate(recs))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [rec for _, _, rec in keyed]


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: adding records never moves the others across a split."""
    return stable_hash(key) / 16 ** 12


def split_records(records: list[dict], validation_fraction: float, seed: int) -> None:
    """Validation iff ``stable_fraction(f"{seed}:{id}") < validation_fraction``, applied per domain, so a
    record's split depends on its own id only: adding a file never moves an existing record. A domain of 10+
    records whose draw gives no validation record lends its lowest-hash record (stratification floor)."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        frac = stable_fraction(f"{seed}:{rec['id']}")
        rec["split"] = "validation" if frac < validation_fraction else "train"
        by_domain[rec["domain"]].append(rec)
    if validation_fraction <= 0:
        return
    for recs in by_domain.values():
        if len(recs) >= 10 and not any(r["split"] == "validation" for r in recs):
            min(recs, key=lambda r: stable_fraction(f"{seed}:{r['id']}"))["split"] = "validation"


# ---------------------------------------------------------------------------------------------------------------
# Synthetic examples and domain balancing
# ---------------------------------------------------------------------------------------------------------------

def _rank_for_keeping(rec: dict) -> tuple:
    """Records a cap keeps first: real before synthetic, higher quality, then id (deterministic)."""
    return (bool(rec.get("synthetic")), -rec.get("quality_score", 0.0), rec["id"])


def generate_synthetic_examples(records: list[dict], ratio: float, seed: int,
                                augmenter: Augmenter | None = None) -> list[dict]:
    """New synthetic records from the real training records: per domain at most ``floor(ratio * real train
    records)`` (fewer when the methods run out). See ``augmentation`` for the methods; deterministic for a seed."""
    if ratio <= 0:
        return []
    train = [r for r in records if r.get("split", "train") == "train" and not r.get("synthetic")]
    augmenter = augmenter or Augmenter(train, seed, {question_key(r["question"]) for r in records})
    counts = Counter(r["domain"] for r in train)
    return augmenter.generate({d: int(math.floor(ratio * n)) for d, n in counts.items()})


def _repeats(pool: list[dict], n: int, counter: Counter) -> list[dict]:
    """``n`` marked copies of ``pool`` records, best first, cycling."""
    pool = sorted(pool, key=_rank_for_keeping)
    out = []
    for k in range(n):
        origin = pool[k % len(pool)]
        counter[origin["id"]] += 1
        copy = {**origin, "id": f"{origin['id']}~rep{counter[origin['id']]}", "synthetic": True,
                "origin": origin["id"], "augmentation": "repeat"}
        copy.pop("origins", None)
        out.append(copy)
    return out


def domain_caps(counts: dict[str, int], max_fraction: float) -> dict[str, int]:
    """Largest counts with every domain <= max_fraction of the new total (iterated to a fixed point). When
    fewer than 1 / max_fraction domains exist the cap cannot hold; 1 / (number of domains) is used instead."""
    if max_fraction >= 1 or not counts:
        return dict(counts)
    frac = max(max_fraction, 1 / len(counts))
    caps = dict(counts)
    for _ in range(100):
        total = sum(caps.values())
        limit = max(1, math.floor(frac * total + 1e-9))
        new = {d: min(c, limit) for d, c in caps.items()}
        if new == caps:
            break
        caps = new
    return caps


def balance_domains(records: list[dict], max_fraction: float = 0.2, min_count: int = 300,
                    target: dict[str, float] | None = None, seed: int = 42, allow_synthetic: bool = True,
                    drops: DropLog | None = None, augmenter: Augmenter | None = None) -> tuple[list[dict], dict]:
    """Cap big domains and raise small ones; returns the records and a report of before/after counts.

    1. Cap: with ``target`` (domain -> weight), the listed domains are cut to weight / sum(weights) of their
       combined size; otherwise every domain to ``max_fraction`` of the total (``domain_caps``). A capped domain
       keeps real records before synthetic ones, then the best quality; the rest are dropped (``domain_cap``).
    2. Floor: a domain under ``min_count`` (or under its target) gets synthetic examples from its training
       records (when ``allow_synthetic``), then marked repetitions of them, up to that count. Additions go to the
       train split only, so the validation split stays real.
    """
    drops = drops if drops is not None else DropLog()
    before = Counter(r["domain"] for r in records)
    wanted = dict(before)
    if target:
        listed = {d: w for d, w in target.items() if w > 0}
        total_listed = sum(before.get(d, 0) for d in listed)
        weight_sum = sum(listed.values())
        for d, w in listed.items():
            wanted[d] = round(w / weight_sum * total_listed)
    caps = domain_caps(before, max_fraction) if not target else {d: min(c, wanted[d]) for d, c in before.items()}
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_domain[rec["domain"]].append(rec)
    kept: list[dict] = []
    capped = Counter()
    for domain, recs in sorted(by_domain.items()):
        if len(recs) > caps[domain]:
            recs = sorted(recs, key=_rank_for_keeping)
            for rec in recs[caps[domain]:]:
                drops.drop("domain_cap", rec["source"], rec.get("source_index"), rec["id"])
            capped[domain] = len(recs) - caps[domain]
            recs = recs[:caps[domain]]
        kept.extend(recs)
    # Floor: fill up to max(min_count, target) with synthetic examples, then repetitions.
    counts = Counter(r["domain"] for r in kept)
    goals = {d: max(min_count, wanted.get(d, 0) if target and d in target else 0) for d in counts}
    need = {d: goals[d] - counts[d] for d in counts if goals[d] > counts[d]}
    added_syn, added_rep = Counter(), Counter()
    if need:
        train = [r for r in kept if r.get("split", "train") == "train" and not r.get("synthetic")]
        if allow_synthetic:
            augmenter = augmenter or Augmenter(train, seed, {question_key(r["question"]) for r in kept})
            for rec in augmenter.generate(need):
                kept.append(rec)
                added_syn[rec["domain"]] += 1
        train_by_domain: dict[str, list[dict]] = defaultdict(list)
        for rec in train:
            train_by_domain[rec["domain"]].append(rec)
        rep_counter: Counter = Counter()
        for domain, n in sorted(need.items()):
            missing = n - added_syn[domain]
            pool = train_by_domain.get(domain)
            if missing > 0 and pool:
                copies = _repeats(pool, missing, rep_counter)
                kept.extend(copies)
                added_rep[domain] = len(copies)
    after = Counter(r["domain"] for r in kept)
    report = {"before": dict(sorted(before.items())), "after": dict(sorted(after.items())),
              "capped": dict(sorted(capped.items())), "synthetic_added": dict(sorted(added_syn.items())),
              "repeated_added": dict(sorted(added_rep.items())),
              "settings": {"max_domain_fraction": max_fraction, "min_domain_count": min_count, "target": target}}
    return kept, report


# ---------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------

def histogram(values: Iterable[float], bins: int = 10, low: float = 0.0, high: float = 1.0) -> list[int]:
    counts = [0] * bins
    for v in values:
        counts[max(0, min(bins - 1, int((v - low) / (high - low) * bins)))] += 1
    return counts


def write_prepared(path: Path, records: list[dict]) -> None:
    """``{"format_version": 1, "records": [...]}`` with one record per line, streamed through
    :func:`atomic_open` (no half-written file, no second copy of the data in memory)."""
    with atomic_open(path) as fh:
        fh.write(f'{{"format_version": {FORMAT_VERSION}, "records": [\n')
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        for i, rec in enumerate(records):
            out = {k: rec[k] for k in OUTPUT_KEYS}
            for k, v in rec.items():
                if k not in out and k != "source_line":
                    out[k] = v
            fh.write((",\n" if i else "") + dumps(out))
        fh.write("\n]}\n")


def load_test_set(path: Path, max_chars: int) -> list[dict]:
    """Validated records of the held-out test set (problems there are logged, never fatal)."""
    test_drops = DropLog()
    out = []
    for rec in iter_file_records(path, path.name, test_drops):
        clean = validate_record(rec, test_drops, max_chars)
        if clean is not None:
            out.append(clean)
    if test_drops.counts:
        logger.warning("test set %s: %d unusable records (%s)", path, sum(test_drops.counts.values()),
                       dict(test_drops.counts))
    return out


def load_knowledge(kb_dir: Path | None) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Contexts by record id and per-domain term vectors written by knowledge_base_enhancer_main.py, if any."""
    contexts, vectors = {}, {}
    if kb_dir is None:
        return contexts, vectors
    if (kb_dir / "contexts.json").is_file():
        contexts = read_json(kb_dir / "contexts.json", "knowledge contexts").get("contexts", {})
    if (kb_dir / "domain_vectors.json").is_file():
        data = read_json(kb_dir / "domain_vectors.json", "domain vectors")
        vectors = {d: v.get("vector", {}) for d, v in data.get("domains", {}).items()}
    return contexts, vectors


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(now - self._t, 3)
        self._t = now


def prepare(args: argparse.Namespace) -> dict:
    """Run every stage; write the prepared file and the stats; return the stats."""
    timer = _Timer()
    datasets_dir = Path(args.datasets_dir)
    if not datasets_dir.is_dir():
        raise UserError(f"--datasets_dir {datasets_dir} is not a folder")
    test_path = Path(args.test_set) if args.test_set else None
    kb_dir = Path(args.knowledge_base) if args.knowledge_base else None
    contexts, vectors = load_knowledge(kb_dir)
    classify = DomainClassifier(vectors)
    drops, per_file = DropLog(), {}
    drops.strict = args.strict

    # --- 1-3. load, validate, score, exact dedup (one streaming pass) ------------------------------------------
    records: list[dict] = []
    seen: dict[str, int] = {}  # dedup key -> position in records
    seen_ids: set[str] = set()
    loaded = 0
    for rec in iter_all_datasets(datasets_dir, [test_path] if test_path else [], drops, per_file, progress=True):
        loaded += 1
        clean = validate_record(rec, drops, args.max_answer_chars, args.max_answer_tokens, classify)
        if clean is None:
            continue
        clean["source_line"] = rec["source_line"]
        clean["quality_score"] = quality_score(clean["question"], clean["answer"])
        key = dedup_key(clean)
        pos = seen.get(key)
        if pos is not None:
            other = records[pos]
            if clean["quality_score"] > other["quality_score"]:  # keep the better copy in the first one's place
                records[pos], clean, other = clean, other, clean
            drops.drop("exact_duplicate", clean["source"], clean["source_index"], f"same as {other['id']}",
                       clean["source_line"])
            continue
        base_id, n = clean["id"], 1
        while clean["id"] in seen_ids:  # ids must be unique: the split and the samplers key on them
            n += 1
            clean["id"] = f"{base_id}~{n}"
        seen_ids.add(clean["id"])
        seen[key] = len(records)
        records.append(clean)
    del seen
    for rec in records:
        rec.pop("source_line", None)
        if rec["id"] in contexts and "context" not in rec:
            rec["context"] = contexts[rec["id"]]
    timer.lap("load_validate_dedup")

    # --- test set: keep it apart, remove its duplicates from training ------------------------------------------
    test_records: list[dict] = []
    if test_path is not None and test_path.exists():
        test_records = load_test_set(test_path, args.max_answer_chars)
        test_keys = {dedup_key(r) for r in test_records}
        test_questions = {question_key(r["question"]) for r in test_records}
        kept = []
        for rec in records:
            if dedup_key(rec) in test_keys or question_key(rec["question"]) in test_questions:
                drops.drop("test_set_duplicate", rec["source"], rec["source_index"], rec["id"])
            else:
                kept.append(rec)
        records = kept
    elif test_path is not None and args.create_test_set:
        # No held-out set yet: take a stable hash-chosen slice once, and keep it apart from now on.
        test_records = [r for r in records if stable_fraction(f"test:{r['id']}") < args.test_fraction]
        chosen = {r["id"] for r in test_records}
        records = [r for r in records if r["id"] not in chosen]
        atomic_write_json(test_path, [{k: r[k] for k in ("id", "question", "answer", "domain", "source")}
                                      for r in test_records])
        logger.info("created held-out test set %s with %d records", test_path, len(test_records))
    timer.lap("test_set")

    # --- near duplicates (test-set ones first) -----------------------------------------------------------------
    near_pairs = []
    if args.near_dup_threshold < 1 and records:
        texts = _PairTexts(test_records, records)
        quality = [1.0] * len(test_records) + [r["quality_score"] for r in records]
        found = find_near_duplicates(texts, quality, args.near_dup_threshold, protected=len(test_records),
                                     seed=args.seed)
        del texts
        offset = len(test_records)
        remove = set()
        for i, j, sim in found:
            rec = records[i - offset]
            if j < offset:
                drops.drop("test_set_near_duplicate", rec["source"], rec["source_index"],
                           f"{rec['id']} ~ test {test_records[j]['id']} (Jaccard {sim})")
                other = f"test:{test_records[j]['id']}"
            else:
                drops.drop("near_duplicate", rec["source"], rec["source_index"],
                           f"{rec['id']} ~ {records[j - offset]['id']} (Jaccard {sim})")
                other = records[j - offset]["id"]
            remove.add(i - offset)
            if len(near_pairs) < 200:
                near_pairs.append({"dropped": rec["id"], "kept": other, "jaccard": sim})
        records = [r for k, r in enumerate(records) if k not in remove]
    timer.lap("near_duplicates")

    if args.min_quality > 0:
        kept = []
        for rec in records:
            if rec["quality_score"] < args.min_quality:
                drops.drop("low_quality", rec["source"], rec["source_index"], f"{rec['id']}: {rec['quality_score']}")
            else:
                kept.append(rec)
        records = kept
    if not records:
        raise UserError(f"no usable record found under {datasets_dir}: {sum(drops.counts.values())} dropped "
                        f"({dict(drops.counts)}). See documentation/DATASETS.md for the accepted formats.")
    real_count = len(records)
    timer.lap("min_quality")

    # --- 4-5. split, synthetic examples, balancing ----------------------------------------------------------------
    split_records(records, args.validation_fraction, args.seed)
    train = [r for r in records if r["split"] == "train" and not r.get("synthetic")]
    augmenter = Augmenter(train, args.seed, {question_key(r["question"]) for r in records}) \
        if args.synthetic_ratio > 0 else None
    synthetic = generate_synthetic_examples(records, args.synthetic_ratio, args.seed, augmenter)
    compute_quality_scores(synthetic)
    records.extend(synthetic)
    target = read_json(args.target_distribution, "--target_distribution") if args.target_distribution else None
    records, balance = balance_domains(records, args.max_domain_fraction, args.min_domain_count, target, args.seed,
                                       allow_synthetic=args.synthetic_ratio > 0, drops=drops, augmenter=augmenter)
    for rec in records:
        if "quality_score" not in rec:
            rec["quality_score"] = quality_score(rec["question"], rec["answer"])
    timer.lap("split_augment_balance")

    # --- 6. difficulty, curriculum order, outputs ------------------------------------------------------------------
    compute_difficulty(records)
    records = apply_curriculum_ordering(records)
    timer.lap("difficulty_curriculum")
    output = Path(args.output)
    write_prepared(output, records)
    timer.lap("write")

    final_by_file = Counter(r["source"] for r in records if not r.get("synthetic"))
    for rel, info in per_file.items():
        info["kept"] = final_by_file.get(rel, 0)
        info["dropped"] = dict(drops.per_file.get(rel, {}))
    split_counts = Counter((r["domain"], r["split"]) for r in records)
    domains = sorted({r["domain"] for r in records})
    stats = {
        "format_version": FORMAT_VERSION,
        "input_records": loaded + sum(drops.counts[r] for r in ("invalid_json", "unsupported_shape")),
        "loaded_records": loaded,
        "output_records": len(records),
        "real_records": real_count,
        "synthetic_records": sum(bool(r.get("synthetic")) for r in records),
        "train_records": sum(r["split"] == "train" for r in records),
        "validation_records": sum(r["split"] == "validation" for r in records),
        "test_records": len(test_records),
        "per_file": dict(sorted(per_file.items())),
        "per_domain": {d: {"train": split_counts[(d, "train")], "validation": split_counts[(d, "validation")],
                           "synthetic": sum(1 for r in records if r["domain"] == d and r.get("synthetic"))}
                       for d in domains},
        "domain_inferred": sum(bool(r.get("domain_inferred")) for r in records),
        "dropped": drops.as_dict(),
        "dropped_total": sum(drops.counts.values()),
        "dedup": {"exact": drops.counts["exact_duplicate"], "near": drops.counts["near_duplicate"],
                  "test_set_exact": drops.counts["test_set_duplicate"],
                  "test_set_near": drops.counts["test_set_near_duplicate"],
                  "near_threshold": args.near_dup_threshold, "near_pairs": near_pairs},
        "balancing": balance,
        "synthetic_by_method": dict(Counter(r.get("augmentation", "?") for r in records if r.get("synthetic"))),
        "quality_histogram": histogram(r["quality_score"] for r in records),
        "difficulty_counts": {str(k): v for k, v in sorted(Counter(r["difficulty"] for r in records).items())},
        "with_code": sum(r["has_code"] for r in records),
        "timings_s": timer.times,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    atomic_write_json(Path(args.stats_output) if args.stats_output else output.with_name("enhanced_data_stats.json"),
                      stats)
    return stats


def summary_table(stats: dict) -> str:
    """The console summary: one row per domain, then the drop reasons."""
    balance = stats["balancing"]
    rows = [("domain", "before", "capped", "synthetic", "train", "validation")]
    for d, info in stats["per_domain"].items():
        rows.append((d, str(balance["before"].get(d, 0)), str(balance["capped"].get(d, 0)), str(info["synthetic"]),
                     str(info["train"]), str(info["validation"])))
    rows.append(("total", str(sum(balance["before"].values())), str(sum(balance["capped"].values())),
                 str(stats["synthetic_records"]), str(stats["train_records"]), str(stats["validation_records"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if stats["dropped"]:
        lines.append("")
        lines.append("dropped (reason: count, first example)")
        for reason, info in stats["dropped"].items():
            ex = info["examples"][0] if info["examples"] else {}
            where = f"{ex.get('source')}" + (f" #{ex['index']}" if ex.get("index") is not None else "")
            lines.append(f"  {reason}: {info['count']}  ({where} {ex.get('detail', '')})"[:160])
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prepare Datasets/ for training (see documentation/DATA_PROCESSING.md).")
    io = p.add_argument_group("files")
    io.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets", help="input folder")
    io.add_argument("--output", type=Path, default=None,
                    help="prepared file (default: <datasets_dir>/enhanced_training_data.json)")
    io.add_argument("--stats_output", type=Path, default=None, help="stats file (default: next to --output)")
    io.add_argument("--test_set", type=Path, default=None,
                    help="held-out test set, kept apart (default: <datasets_dir>/test_set.json)")
    io.add_argument("--create_test_set", action=argparse.BooleanOptionalAction, default=True,
                    help="create the test set from the data when it does not exist (default on; with "
                         "--no-create_test_set a missing test set means no held-out set)")
    io.add_argument("--test_fraction", type=float, default=0.1, help="share of records for a created test set")
    io.add_argument("--knowledge_base", type=Path, default=None,
                    help="outputs of knowledge_base_enhancer_main.py (contexts, domain vectors), used when present "
                         "(default: <datasets_dir>/knowledge_base)")
    va = p.add_argument_group("validation and dedup")
    va.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                    help="make any unreadable file or invalid record fatal")
    va.add_argument("--max_answer_chars", type=int, default=20000,
                    help="drop records whose question or answer is longer (characters)")
    va.add_argument("--max_answer_tokens", type=int, default=0,
                    help="drop records whose question or answer has more GPT-2 pre-tokens (0 = off)")
    va.add_argument("--near_dup_threshold", type=float, default=0.8,
                    help="Jaccard similarity of word 3-grams at which two records are near-duplicates (1 = off)")
    va.add_argument("--min_quality", type=float, default=0.0, help="drop records scoring below this (0 = off)")
    st = p.add_argument_group("split, balance and augmentation")
    st.add_argument("--seed", type=int, default=42, help="seed of the split, the MinHash and the augmentation")
    st.add_argument("--validation_fraction", type=float, default=0.1, help="validation share per domain")
    st.add_argument("--max_domain_fraction", type=float, default=0.2,
                    help="cap every domain at this share of the total (1 = off)")
    st.add_argument("--min_domain_count", type=int, default=300,
                    help="raise smaller domains to this many records, synthetic then repeated (0 = off)")
    st.add_argument("--target_distribution", type=Path, default=None,
                    help='JSON file {"domain": weight, ...}: listed domains are cut or filled to these shares')
    st.add_argument("--synthetic_ratio", type=float, default=0.1,
                    help="synthetic examples per real training record and domain, at most (0 = off)")
    args = p.parse_args(argv)
    if not 0 <= args.validation_fraction < 1:
        p.error("--validation_fraction must be in [0, 1)")
    if not 0 < args.test_fraction < 1:
        p.error("--test_fraction must be in (0, 1)")
    if not 0 <= args.min_quality <= 1:
        p.error("--min_quality must be in [0, 1]")
    if args.max_answer_chars < 1:
        p.error("--max_answer_chars must be at least 1")
    if args.max_answer_tokens < 0:
        p.error("--max_answer_tokens must be 0 (off) or more")
    if not 0 < args.near_dup_threshold <= 1:
        p.error("--near_dup_threshold must be in (0, 1] (1 = off)")
    if not 0 < args.max_domain_fraction <= 1:
        p.error("--max_domain_fraction must be in (0, 1] (1 = off)")
    if args.min_domain_count < 0:
        p.error("--min_domain_count must be 0 (off) or more")
    if not 0 <= args.synthetic_ratio <= 10:
        p.error("--synthetic_ratio must be in [0, 10] (0 = off)")
    if args.target_distribution is not None:
        target = read_json(args.target_distribution, "--target_distribution")
        if not isinstance(target, dict) or not target or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in target.values()):
            p.error("--target_distribution must hold a JSON object of domain -> non-negative weight")
        if sum(target.values()) <= 0:
            p.error("--target_distribution weights must not all be 0")
    args.output = args.output or args.datasets_dir / "enhanced_training_data.json"
    args.test_set = args.test_set or args.datasets_dir / "test_set.json"
    if args.knowledge_base is None:
        args.knowledge_base = args.datasets_dir / "knowledge_base"
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    stats = prepare(args)
    logger.info("prepared %d records (%d train, %d validation, %d synthetic; %d held out for test) -> %s",
                stats["output_records"], stats["train_records"], stats["validation_records"],
                stats["synthetic_records"], stats["test_records"], args.output)
    logger.info("\n%s", summary_table(stats))
    if stats["dropped_total"]:
        logger.warning("dropped %d records; details in the stats file", stats["dropped_total"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
