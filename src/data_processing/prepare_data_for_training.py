"""Prepare Datasets/ for training: load, validate, normalise, dedup, score, rate, order and split.

Every input record ends up either in the output or in the stats as dropped, with its reason.

    python src/data_processing/prepare_data_for_training.py
    python -m src.data_processing.prepare_data_for_training --datasets_dir Datasets --seed 42
    python -m src.data_processing.prepare_data_for_training --strict --validation_fraction 0.1

Outputs (written atomically):
- ``Datasets/enhanced_training_data.json``: ``{"format_version": 1, "records": [...]}``, canonical records with
  ``split`` set to ``train`` or ``validation``, in curriculum order (easy to hard, domains interleaved).
- ``Datasets/enhanced_data_stats.json``: counts per file, per domain and per drop reason (with the first
  examples of each), score histograms.
- ``Datasets/test_set.json``: only when it does not exist yet (a stable hash-chosen slice of the data).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.utils.common import PROJECT_ROOT, UserError, atomic_write_json, run_entry_point, setup_logging

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
OUTPUT_NAMES = {"enhanced_training_data.json", "enhanced_data_stats.json"}
DROP_EXAMPLES = 3  # first examples kept per drop reason in the stats

DOMAIN_ALIASES = {
    "security": "cybersecurity", "cyber_security": "cybersecurity", "infosec": "cybersecurity",
    "coding": "programming", "software": "programming", "code": "programming",
    "network": "networking", "networks": "networking",
    "datascience": "data_science", "ml": "data_science", "machine_learning": "data_science",
    "cloud": "cloud_computing", "cloudcomputing": "cloud_computing",
    "general": "general_conversation", "chat": "general_conversation", "conversation": "general_conversation",
}
# Keyword classifier for records without a domain: the domain whose keywords occur most often wins.
DOMAIN_KEYWORDS = {
    "cybersecurity": "attack malware phishing encryption firewall vulnerability exploit password authentication "
                     "tls certificate threat xss injection mfa",
    "programming": "function python code variable class loop compile javascript git api bug debug list string",
    "networking": "tcp udp ip dns dhcp router subnet packet ethernet port protocol vlan latency bgp",
    "data_science": "model data regression classification dataset feature statistics pandas training accuracy "
                    "mean variance cluster",
    "cloud_computing": "cloud aws azure gcp kubernetes container serverless instance region scaling storage "
                       "terraform docker",
}
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
CODE_FENCE = "```"
STEP_MARKERS = re.compile(r"(?m)^\s*(\d+[.)]|step \d+|first|then|finally)\b", re.IGNORECASE)
TECH_TERM = re.compile(r"\b([A-Z]{2,}[A-Za-z0-9]*|\w+\(\)|\w+_\w+|\w+\.\w+)\b")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

class DropLog:
    """Counts of dropped records per reason, with the first few examples of each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = defaultdict(list)

    def drop(self, reason: str, source: str, index: int | None, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < DROP_EXAMPLES:
            self.examples[reason].append({"source": source, "index": index, "detail": detail[:200]})

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples[reason]} for reason, n in self.counts.most_common()}


def _raw_items(path: Path, drops: DropLog) -> Iterator[tuple[int, object]]:
    """``(index, item)`` for each record-like item of a file; file-level problems go to ``drops``."""
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for index, raw in enumerate(fh):
                if not raw.strip():
                    continue
                try:
                    yield index, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    drops.drop("invalid_utf8", path.name, index, "line is not UTF-8")
                except json.JSONDecodeError as err:
                    drops.drop("invalid_json", path.name, index, f"line {index + 1}, column {err.colno}: {err.msg}")
        return
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        drops.drop("invalid_utf8", path.name, None, f"byte {err.start}")
        return
    except json.JSONDecodeError as err:
        drops.drop("invalid_json", path.name, None, f"line {err.lineno}, column {err.colno}: {err.msg}")
        return
    if isinstance(doc, dict) and isinstance(doc.get("qa_pairs"), list):
        doc = doc["qa_pairs"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        drops.drop("unsupported_shape", path.name, None, f"top level is {type(doc).__name__}")
        return
    yield from enumerate(doc)


def _records_from_item(item: object) -> Iterator[dict]:
    """Map one input item (any shape DESIGN.md accepts) to zero or more ``{question, answer, ...}`` dicts."""
    if not isinstance(item, dict):
        return
    if "question" in item or "answer" in item:
        yield item
    elif "instruction" in item and "output" in item:
        question = item["instruction"]
        if isinstance(question, str) and isinstance(item.get("input"), str) and item["input"].strip():
            question = f"{question}\n{item['input']}"
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
            content = msg.get("content", msg.get("value"))
            if role in ("user", "human"):
                pending = content
            elif role in ("assistant", "gpt", "bot") and pending is not None:
                yield {"question": pending, "answer": content, "domain": item.get("domain"), "turn": turn,
                       "id": f"{item['id']}-t{turn}" if "id" in item else None}
                pending, turn = None, turn + 1


def load_all_datasets(datasets_dir: Path, exclude: Iterable[Path] = (), drops: DropLog | None = None,
                      per_file: Counter | None = None) -> list[dict]:
    """Every record of every ``*.json``/``*.jsonl`` under ``datasets_dir`` (outputs and ``exclude`` skipped).

    Each record gets ``source`` (file path relative to the folder) and ``source_index``.
    """
    drops = drops if drops is not None else DropLog()
    per_file = per_file if per_file is not None else Counter()
    excluded = {Path(p).resolve() for p in exclude}
    files = sorted(p for p in Path(datasets_dir).rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")
                   and p.name not in OUTPUT_NAMES and p.resolve() not in excluded)
    records = []
    for path in files:
        rel = path.relative_to(datasets_dir).as_posix()
        for index, item in _raw_items(path, drops):
            produced = False
            for rec in _records_from_item(item):
                produced = True
                records.append({**rec, "source": rel, "source_index": index})
                per_file[rel] += 1
            if not produced:
                drops.drop("unsupported_shape", rel, index, f"keys: {sorted(item)[:8]}" if isinstance(item, dict)
                           else f"item is {type(item).__name__}")
    return records


# ---------------------------------------------------------------------------------------------------------------
# Validation and normalisation
# ---------------------------------------------------------------------------------------------------------------

def normalise_text(text: str) -> str:
    """Unicode NFC, trailing whitespace trimmed; code blocks are kept byte for byte."""
    text = unicodedata.normalize("NFC", text)
    parts = text.split(CODE_FENCE)
    # Even parts are prose: strip trailing spaces per line. Odd parts are code: untouched.
    for i in range(0, len(parts), 2):
        parts[i] = "\n".join(line.rstrip() for line in parts[i].split("\n"))
    return CODE_FENCE.join(parts).strip()


def normalise_domain(domain: object) -> str | None:
    if not isinstance(domain, str) or not domain.strip():
        return None
    key = re.sub(r"[\s\-]+", "_", domain.strip().lower())
    return DOMAIN_ALIASES.get(key, key)


def infer_domain(question: str, answer: str) -> str:
    words = re.findall(r"[a-z]+", f"{question} {answer}".lower())
    counts = Counter(words)
    scores = {d: sum(counts[k] for k in kws.split()) for d, kws in DOMAIN_KEYWORDS.items()}
    best = max(scores, key=lambda d: (scores[d], d))
    return best if scores[best] > 0 else "general_conversation"


def validate_record(rec: dict, drops: DropLog, max_answer_chars: int) -> dict | None:
    """The normalised record, or None after logging the reason it is dropped."""
    source, index = rec.get("source", "?"), rec.get("source_index")
    for field in ("question", "answer"):
        value = rec.get(field)
        if value is None:
            drops.drop(f"missing_{field}", source, index)
            return None
        if not isinstance(value, str):
            drops.drop(f"wrong_type_{field}", source, index, type(value).__name__)
            return None
        if CONTROL_CHARS.search(value):
            drops.drop("control_characters", source, index, field)
            return None
        if not value.strip():
            drops.drop(f"empty_{field}", source, index)
            return None
    question, answer = normalise_text(rec["question"]), normalise_text(rec["answer"])
    if len(answer) > max_answer_chars or len(question) > max_answer_chars:
        drops.drop("too_long", source, index, f"{len(answer)} characters")
        return None
    domain = normalise_domain(rec.get("domain"))
    out = {"id": str(rec["id"]) if rec.get("id") not in (None, "") else f"{source}#{index}",
           "question": question, "answer": answer, "domain": domain or infer_domain(question, answer),
           "source": source, "has_code": CODE_FENCE in answer or CODE_FENCE in question}
    if domain is None:
        out["domain_inferred"] = True
    for key in ("context", "synthetic", "turn"):
        if rec.get(key) is not None:
            out[key] = rec[key]
    return out


def dedup_key(rec: dict) -> str:
    text = re.sub(r"\s+", " ", f"{rec['question']}\x00{rec['answer']}".lower()).strip()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def question_key(question: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", question.lower()).strip()


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------

def quality_score(rec: dict) -> float:
    """Deterministic quality in [0, 1]: the mean of four parts, each in [0, 1].

    - length: answer word count ramps 0 -> 1 from 3 to 20 words, 1 up to 300, then falls to 0.5 at 600+;
    - relevance: share of the question's content words (4+ letters) that the answer repeats, x2, capped at 1;
    - formatting: 1, minus 0.5 for unbalanced code fences, minus 0.25 for an answer that does not end with
      punctuation or a code fence;
    - repetition: distinct word trigrams / all word trigrams of the answer (1 for answers under 3 words).
    """
    answer, question = rec["answer"], rec["question"]
    words = answer.split()
    n = len(words)
    if n < 3:
        length = 0.0
    elif n < 20:
        length = (n - 3) / 17
    elif n <= 300:
        length = 1.0
    else:
        length = max(0.5, 1.0 - 0.5 * (n - 300) / 300)
    q_words = {w for w in re.findall(r"[a-z]{4,}", question.lower())}
    a_words = set(re.findall(r"[a-z]{4,}", answer.lower()))
    relevance = min(1.0, 2 * len(q_words & a_words) / len(q_words)) if q_words else 0.5
    formatting = 1.0
    if answer.count(CODE_FENCE) % 2:
        formatting -= 0.5
    if not answer.rstrip().endswith((".", "!", "?", ":", ")", CODE_FENCE, '"')):
        formatting -= 0.25
    trigrams = [tuple(words[i:i + 3]) for i in range(n - 2)]
    repetition = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    return round((length + relevance + formatting + repetition) / 4, 4)


def compute_quality_scores(records: list[dict]) -> list[dict]:
    for rec in records:
        rec["quality_score"] = quality_score(rec)
    return records


def difficulty(rec: dict) -> int:
    """1-5: 1 + one point each for a long answer (80+ words), dense technical terms (8%+ of words), code,
    multi-step reasoning markers (2+), and a long question (25+ words)."""
    words = rec["answer"].split()
    terms = len(TECH_TERM.findall(rec["answer"]))
    points = 1
    points += len(words) >= 80
    points += bool(words) and terms / len(words) >= 0.08
    points += rec["has_code"]
    points += len(STEP_MARKERS.findall(rec["answer"])) >= 2
    points += len(rec["question"].split()) >= 25
    return int(min(5, points))


def apply_curriculum_ordering(records: list[dict]) -> list[dict]:
    """Easy to hard within each domain (difficulty, then answer length, then id), domains interleaved round-robin."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_domain[rec["domain"]].append(rec)
    queues = [sorted(recs, key=lambda r: (r["difficulty"], len(r["answer"]), r["id"]))
              for _, recs in sorted(by_domain.items())]
    ordered, i = [], 0
    while any(queues):
        for q in queues:
            if i < len(q):
                ordered.append(q[i])
        i += 1
        queues = [q for q in queues if i < len(q)]
    return ordered


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: adding records never moves the others across a split."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12


def split_records(records: list[dict], validation_fraction: float, seed: int) -> None:
    """Per domain, the records whose hash ranks lowest form the validation split (at least one per domain
    with 10+ records); the rest train."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_domain[rec["domain"]].append(rec)
    for recs in by_domain.values():
        ranked = sorted(recs, key=lambda r: stable_fraction(f"{seed}:{r['id']}"))
        n_val = round(len(recs) * validation_fraction)
        if validation_fraction > 0 and n_val == 0 and len(recs) >= 10:
            n_val = 1
        for i, rec in enumerate(ranked):
            rec["split"] = "validation" if i < n_val else "train"


# ---------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------

def histogram(values: list[float], bins: int = 10, low: float = 0.0, high: float = 1.0) -> list[int]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / (high - low) * bins))] += 1
    return counts


def prepare(args: argparse.Namespace) -> dict:
    datasets_dir = Path(args.datasets_dir)
    if not datasets_dir.is_dir():
        raise UserError(f"--datasets_dir {datasets_dir} is not a folder")
    drops, per_file = DropLog(), Counter()
    test_path = Path(args.test_set) if args.test_set else None
    raw = load_all_datasets(datasets_dir, exclude=[test_path] if test_path else [], drops=drops, per_file=per_file)
    if args.strict and drops.counts:
        reason, info = next(iter(drops.as_dict().items()))
        raise UserError(f"--strict: {sum(drops.counts.values())} problem(s), first: {reason} in "
                        f"{info['examples'][0]['source']} {info['examples'][0]}")

    records, seen, seen_ids = [], {}, set()
    for rec in raw:
        clean = validate_record(rec, drops, args.max_answer_chars)
        if clean is None:
            continue
        key = dedup_key(clean)
        if key in seen:
            drops.drop("exact_duplicate", clean["source"], rec["source_index"], f"same as {seen[key]}")
            continue
        seen[key] = clean["id"]
        base_id, n = clean["id"], 1
        while clean["id"] in seen_ids:  # ids must be unique: the split and the samplers key on them
            n += 1
            clean["id"] = f"{base_id}~{n}"
        seen_ids.add(clean["id"])
        records.append(clean)

    test_records = []
    if test_path is not None and test_path.exists():
        test_drops = DropLog()
        test_raw = [r for _, item in _raw_items(test_path, test_drops) for r in _records_from_item(item)]
        test_records = [v for r in test_raw if (v := validate_record({**r, "source": test_path.name,
                                                                        "source_index": None}, test_drops,
                                                                       args.max_answer_chars))]
        test_questions = {question_key(r["question"]) for r in test_records}
        test_keys = {dedup_key(r) for r in test_records}
        kept = []
        for rec in records:
            if dedup_key(rec) in test_keys or question_key(rec["question"]) in test_questions:
                drops.drop("test_set_overlap", rec["source"], None, rec["id"])
            else:
                kept.append(rec)
        records = kept
    elif test_path is not None and args.create_test_set:
        # No held-out set yet: take a stable hash-chosen slice per domain once, and keep it apart from now on.
        test_records = [r for r in records if stable_fraction(f"test:{r['id']}") < args.test_fraction]
        chosen = {r["id"] for r in test_records}
        records = [r for r in records if r["id"] not in chosen]
        atomic_write_json(test_path, [{k: r[k] for k in ("id", "question", "answer", "domain", "source")}
                                      for r in test_records])
        logger.info("created held-out test set %s with %d records", test_path, len(test_records))

    if args.min_quality > 0:
        compute_quality_scores(records)
        kept = []
        for rec in records:
            if rec["quality_score"] < args.min_quality:
                drops.drop("low_quality", rec["source"], None, f"{rec['id']}: {rec['quality_score']}")
            else:
                kept.append(rec)
        records = kept
    if not records:
        raise UserError(f"no usable record found under {datasets_dir}: {sum(drops.counts.values())} dropped "
                        f"({dict(drops.counts)}). See Datasets/README.md for the accepted formats.")
    compute_quality_scores(records)
    for rec in records:
        rec["difficulty"] = difficulty(rec)
    records = apply_curriculum_ordering(records)
    split_records(records, args.validation_fraction, args.seed)

    output = Path(args.output)
    stats = {
        "format_version": FORMAT_VERSION,
        "input_records": len(raw) + sum(c for r, c in drops.counts.items() if r in ("invalid_json", "invalid_utf8",
                                                                                  "unsupported_shape")),
        "output_records": len(records),
        "train_records": sum(r["split"] == "train" for r in records),
        "validation_records": sum(r["split"] == "validation" for r in records),
        "test_records": len(test_records),
        "per_file": dict(sorted(per_file.items())),
        "per_domain": dict(sorted(Counter(r["domain"] for r in records).items())),
        "domain_inferred": sum(bool(r.get("domain_inferred")) for r in records),
        "dropped": drops.as_dict(),
        "dropped_total": sum(drops.counts.values()),
        "quality_histogram": histogram([r["quality_score"] for r in records]),
        "difficulty_counts": {str(k): v for k, v in sorted(Counter(r["difficulty"] for r in records).items())},
        "with_code": sum(r["has_code"] for r in records),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    atomic_write_json(output, {"format_version": FORMAT_VERSION, "records": records})
    atomic_write_json(Path(args.stats_output) if args.stats_output else output.with_name("enhanced_data_stats.json"),
                      stats)
    return stats


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
                    help="create the test set from the data when it does not exist (default on)")
    io.add_argument("--test_fraction", type=float, default=0.1, help="share of records for a created test set")
    st = p.add_argument_group("stages")
    st.add_argument("--seed", type=int, default=42, help="seed of the split")
    st.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                    help="make any unreadable file or record fatal")
    st.add_argument("--min_quality", type=float, default=0.0, help="drop records scoring below this (0 = off)")
    st.add_argument("--validation_fraction", type=float, default=0.1, help="validation share per domain")
    st.add_argument("--max_answer_chars", type=int, default=20000, help="drop records with longer text")
    args = p.parse_args(argv)
    if not 0 <= args.validation_fraction < 1:
        p.error("--validation_fraction must be in [0, 1)")
    if not 0 < args.test_fraction < 1:
        p.error("--test_fraction must be in (0, 1)")
    if not 0 <= args.min_quality <= 1:
        p.error("--min_quality must be in [0, 1]")
    if args.max_answer_chars < 1:
        p.error("--max_answer_chars must be at least 1")
    args.output = args.output or args.datasets_dir / "enhanced_training_data.json"
    args.test_set = args.test_set or args.datasets_dir / "test_set.json"
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    stats = prepare(args)
    logger.info("prepared %d records (%d train, %d validation; %d held out for test) -> %s",
                stats["output_records"], stats["train_records"], stats["validation_records"],
                stats["test_records"], args.output)
    logger.info("per domain: %s", ", ".join(f"{d} {n}" for d, n in stats["per_domain"].items()))
    if stats["dropped_total"]:
        logger.warning("dropped %d records: %s", stats["dropped_total"],
                       ", ".join(f"{r} {i['count']}" for r, i in stats["dropped"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
