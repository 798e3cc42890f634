"""Prepare Datasets/ for training: load, validate, normalise, dedup, hold out, score, split, augment, balance.

Every input record ends up either in the output or in the stats as dropped, with its reason and its place
(file, record index, line). Balancing speaks through per-record ``sample_weight`` values: no real record is
deleted or copied to reach a domain mix unless --materialise_balance asks for it.

    python src/data_processing/prepare_data_for_training.py --profile quick
    python -m src.data_processing.prepare_data_for_training --datasets_dir Datasets --seed 42 --strict
    python -m src.data_processing.prepare_data_for_training --columns question=q,answer=a --include_sample
    python -m src.data_processing.prepare_data_for_training --hf_dataset ./my_saved_dataset:train \\
        --domain_map domain_map.json --max_domain_fraction 1 --min_domain_count 0 --synthetic_ratio 0

Which data: the user's files in --datasets_dir, or the shipped sample in its sample/ folder when there are none
(or with --include_sample); src/utils/data_layout.py decides, and the first line of the output says which.

Stages, in order (documentation/DATA_PROCESSING.md has the details and the formulas):
 1. load every readable file (JSON, JSON Lines, gzipped, CSV, TSV, Parquet) and --hf_dataset, each item read in
    its shape (documentation/DATASETS.md), --columns mapping other field names; other files listed as skipped;
 2. validate and normalise (NFC, whitespace; code blocks byte for byte), placeholders and orphan media tokens,
    domains (record field > --domain_map or folder/file name > a classifier over the data's own domains),
    quality and difficulty, exact dedup (on big inputs the per-record work runs on --workers processes); the
    problems the user must see (a file that cannot be read, gives nothing or loses over 5% of its records),
    fatal with --strict;
 3. the held-out test set is fixed first (read, or drawn by a stable hash of the question key), then every
    record that repeats or nearly repeats one of its questions is removed; near-duplicates (question and answer
    both close) keep the better copy; --min_quality filter;
 4. split train/validation by a hash of the id, per domain, topped up to --validation_fraction;
 5. synthetic examples (at most --synthetic_ratio of the output), then domain balancing as sample weights;
 6. atomic outputs.

Outputs (written atomically, with the user's umask; Theta's own files in Datasets/ are all named enhanced_*):
- ``Datasets/enhanced_training_data.json``: ``{"format_version": N, "records": [...]}``, one record per line.
- ``Datasets/enhanced_data_stats.json``: counts per file, domain and drop reason (first examples of each), the
  problems, dedup and balancing figures (mix before and after), score histograms, stage timings.
- ``Datasets/enhanced_test_set.json``: the held-out set drawn from the data, on every run, when there is no
  ``Datasets/test_set.json`` of the user's (and the sample is not all the data) and --create_test_set is on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.augmentation import Augmenter
from src.data_processing.balancing import balance_domains, effective_cap, water_fill  # noqa: F401 (re-exported)
from src.data_processing.converter_common import check_output_path, write_json_output
from src.data_processing.domains import (GENERAL, DomainClassifier, DomainResolver, assign_missing_domains,  # noqa
                                         load_domain_map, normalise_domain)
from src.data_processing.loading import (DROPPED_SHARE_WARNING, INPUT_PROBLEMS, PROBLEM_KINDS,  # noqa: F401
                                         ColumnMap, DataProblem, DropLog, dataset_files, empty_problem,
                                         file_problems, iter_all_datasets, iter_file_records, not_read_problems)
from src.data_processing.near_duplicates import MinHasher, find_near_duplicates
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS
from src.data_processing.text_quality import difficulty, quality_score
from src.data_processing.validation import approx_tokens, validate_record  # noqa: F401 (re-exported)
from src.utils.common import PROJECT_ROOT, FlagParser, UserError, atomic_open, read_json, run_entry_point, \
    setup_logging, stable_hash
from src.utils.data_contract import PREPARED_FORMAT_VERSION, has_code, question_key  # noqa: F401 (re-exported)
from src.utils.data_layout import STATS_NAME, DataSources, resolve_sources
from src.utils.profiles import PROFILE_NAMES, annotate_profile_help, prepare_values

logger = logging.getLogger(__name__)

FORMAT_VERSION = PREPARED_FORMAT_VERSION
OUTPUT_KEYS = ("id", "question", "answer", "domain", "quality_score", "difficulty", "has_code", "source", "split",
               "sample_weight")
POOL_MIN_BYTES = 64 << 20  # inputs under this are processed in this process: a pool's start-up would cost more
POOL_CHUNK = 4000  # records per task sent to a worker
# The data-preparation half of each overnight profile (the scripts pass --profile and nothing else). Both follow
# the rules of documentation/DATA_PROCESSING.md: balance by weights (nothing real dropped or copied), synthetic
# examples at most 10% of the output, a floor bounded by --max_repeats.
PROFILES = {name: prepare_values(name) for name in PROFILE_NAMES}  # the one table: src/utils/profiles.py


# ---------------------------------------------------------------------------------------------------------------
# The per-record stage
# ---------------------------------------------------------------------------------------------------------------

class _EventLog:
    """A DropLog stand-in inside a worker: records the drop events, in order, for the parent to replay."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def drop(self, reason, source, index, detail="", line=None) -> None:
        self.events.append((reason, source, index, detail, line))


class RecordStage:
    """The per-record work: validate, normalise, flags, domain (field, map or name), quality, difficulty. Picklable
    settings, so the same object runs in this process or in a worker of the pool. Records no field, map or name
    gives a domain keep ``domain: None``: the classifier labels them once the domains of the whole data are known."""

    def __init__(self, max_chars: int, max_tokens: int, domain_map: dict, keep_flagged: bool,
                 near_duplicates: bool = True):
        self.max_chars, self.max_tokens, self.keep_flagged = max_chars, max_tokens, keep_flagged
        self.domain_map = domain_map
        self.near_duplicates = near_duplicates  # False: no near-duplicate stage, no signatures
        self._resolver = None
        self._hasher = None

    @property
    def resolver(self) -> DomainResolver:
        if self._resolver is None:
            self._resolver = DomainResolver(self.domain_map)
        return self._resolver

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_resolver"] = state["_hasher"] = None
        return state

    def one(self, rec: dict, drops) -> dict | None:
        clean = validate_record(rec, drops, self.max_chars, self.max_tokens, resolver=self.resolver,
                                keep_flagged=self.keep_flagged)
        if clean is None:
            return None
        clean["source_line"] = rec.get("source_line")
        clean["quality_score"] = quality_score(clean["question"], clean["answer"])
        clean["difficulty"] = difficulty(clean["question"], clean["answer"], clean["has_code"])
        clean["_dk"] = dedup_key(clean)  # here, so a pool computes it too; removed after the test-set stage
        clean["_qk"] = question_key(clean["question"])  # removed once the test set and the augmenter have it
        return clean

    def chunk(self, recs: list[dict]) -> tuple[list, list]:
        """``(results, events)``: one result per record (a dict or None) and the drop events in order. With the
        near-duplicate stage on, each clean record also carries the MinHash signature of its answer (``_sig``,
        bytes), so that stage does not hash the texts again in one process."""
        log = _EventLog()
        out = []
        for rec in recs:
            start = len(log.events)
            out.append(self.one(rec, log))
            if out[-1] is None and len(log.events) == start:
                log.events.append(("invalid_record", rec.get("source"), rec.get("source_index"), "", None))
        if self.near_duplicates:
            if self._hasher is None:
                self._hasher = MinHasher()
            clean = [r for r in out if r is not None]
            for rec, row in zip(clean, self._hasher.signatures(r["answer"] for r in clean)):
                rec["_sig"] = row.tobytes()
        return out, log.events


_WORKER_STAGE: RecordStage | None = None


def _init_worker(stage: RecordStage) -> None:
    global _WORKER_STAGE
    _WORKER_STAGE = stage


def _run_chunk(recs: list[dict]) -> tuple[list, list]:
    return _WORKER_STAGE.chunk(recs)


def _chunks(it: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for rec in it:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def process_records(raw: Iterable[dict], stage: RecordStage, drops: DropLog, workers: int) -> Iterator[dict]:
    """Clean records in input order; with ``workers`` > 1 the per-record work runs in a process pool (chunks of
    ``POOL_CHUNK``, at most 2 per worker in flight, so memory stays bounded), results and drop events replayed in
    order, so the output is the same as with one process."""
    if workers <= 1:
        for chunk in _chunks(raw, POOL_CHUNK):
            results, events = stage.chunk(chunk)
            for event in events:
                drops.drop(*event)
            yield from (r for r in results if r is not None)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(stage,)) as pool:
        pending: deque = deque()

        def drain(limit: int) -> Iterator[dict]:
            while len(pending) > limit:
                results, events = pending.popleft().result()
                for event in events:
                    drops.drop(*event)
                yield from (r for r in results if r is not None)

        for chunk in _chunks(raw, POOL_CHUNK):
            pending.append(pool.submit(_run_chunk, chunk))
            yield from drain(2 * workers)
        yield from drain(0)


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

    def pair(self, i: int) -> tuple[str, str]:
        r = self.records[i]
        return r["question"], r["answer"]


# ---------------------------------------------------------------------------------------------------------------
# Scores, split, augmentation
# ---------------------------------------------------------------------------------------------------------------

def compute_quality_scores(records: list[dict]) -> list[dict]:
    """Set ``quality_score`` on every record (formula: ``text_quality.quality_score``)."""
    for rec in records:
        rec["quality_score"] = quality_score(rec["question"], rec["answer"])
    return records


def compute_difficulty(records: list[dict], only_missing: bool = False) -> list[dict]:
    """Set ``difficulty`` (1-5) on every record (formula: ``text_quality.difficulty``)."""
    for rec in records:
        if not only_missing or "difficulty" not in rec:
            rec["difficulty"] = difficulty(rec["question"], rec["answer"], rec["has_code"])
    return records


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: adding records never moves the others across a split."""
    return stable_hash(key) / 16 ** 12


def split_records(records: list[dict], validation_fraction: float, seed: int, synthetic_ratio: float = 0.0) -> None:
    """Validation iff ``stable_fraction(f"{seed}:{id}") < validation_fraction``, per domain, so a record's split
    depends on its own id. A domain whose draw falls short is topped up with its lowest-hash training records to
    ``floor(f * n * (1 + r) / (1 + f * r))`` (r = ``synthetic_ratio``): validation then stays at least the
    fraction of the domain's output, synthetic training examples included, less one record. Only records just
    above the threshold move when files are added."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        frac = stable_fraction(f"{seed}:{rec['id']}")
        rec["split"] = "validation" if frac < validation_fraction else "train"
        by_domain[rec["domain"]].append(rec)
    if validation_fraction <= 0:
        return
    f, r = validation_fraction, synthetic_ratio
    for recs in by_domain.values():
        quota = math.floor(f * len(recs) * (1 + r) / (1 + f * r) + 1e-9)
        have = sum(1 for x in recs if x["split"] == "validation")
        if have < quota:
            train = sorted((x for x in recs if x["split"] == "train"),
                           key=lambda x: (stable_fraction(f"{seed}:{x['id']}"), x["id"]))
            for x in train[:quota - have]:
                x["split"] = "validation"


def generate_synthetic_examples(records: list[dict], ratio: float, seed: int,
                                augmenter: Augmenter | None = None) -> list[dict]:
    """New synthetic records from the real training records: per domain at most ``floor(ratio * real train
    records)``, so they are at most ``ratio`` of the output (fewer when the methods run out). See
    ``augmentation`` for the methods; deterministic for a seed."""
    if ratio <= 0:
        return []
    train = [r for r in records if r.get("split", "train") == "train" and not r.get("synthetic")]
    augmenter = augmenter or Augmenter(train, seed, {question_key(r["question"]) for r in records})
    counts = Counter(r["domain"] for r in train)
    return augmenter.generate({d: int(math.floor(ratio * n)) for d, n in counts.items()})


# ---------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------

def histogram(values: Iterable[float], bins: int = 10, low: float = 0.0, high: float = 1.0) -> list[int]:
    counts = [0] * bins
    for v in values:
        counts[max(0, min(bins - 1, int((v - low) / (high - low) * bins)))] += 1
    return counts


def write_prepared(path: Path, records: list[dict]) -> None:
    """``{"format_version": N, "records": [...]}`` with one record per line, streamed through
    :func:`atomic_open` (no half-written file, no second copy of the data in memory), mode from the umask."""
    with atomic_open(path) as fh:
        fh.write(f'{{"format_version": {FORMAT_VERSION}, "records": [\n')
        dumps = json.JSONEncoder(ensure_ascii=False).encode
        for i, rec in enumerate(records):
            out = {k: rec[k] for k in OUTPUT_KEYS}
            for k, v in rec.items():
                if k not in out and k not in ("source_line", "source_index"):
                    out[k] = v
            out["source_index"] = rec.get("source_index")
            fh.write((",\n" if i else "") + dumps(out))
        fh.write("\n]}\n")


def load_test_set(path: Path, max_chars: int, classifier: "_OnDemand") -> list[dict]:
    """Validated records of the held-out test set (problems there are logged, never fatal); a record without a
    domain gets the classifier's label, the classifier of the training data."""
    test_drops = DropLog()
    out = []
    resolver = DomainResolver()
    for rec in iter_file_records(path, path.name, test_drops):
        clean = validate_record(rec, test_drops, max_chars, resolver=resolver, keep_flagged=True)
        if clean is not None:
            out.append(clean)
    if any(r["domain"] is None for r in out):
        assign_missing_domains(out, classifier())
    if test_drops.counts:
        logger.warning("test set %s: %d unusable records (%s)", path, sum(test_drops.counts.values()),
                       dict(test_drops.counts))
    return out


def load_knowledge(kb_dir: Path | None, data_files: list[str]) -> tuple[dict[str, str], str | None]:
    """Contexts by record id written by knowledge_base_enhancer_main.py ``--with_context``, when they were built
    from the data files this run reads (else a note why they are not used: stale contexts of other data, the
    sample's say, must not reach the user's records)."""
    if kb_dir is None or not (kb_dir / "contexts.json").is_file():
        return {}, None
    data = read_json(kb_dir / "contexts.json", "knowledge contexts")
    if data.get("data_files") != data_files:
        return {}, (f"{kb_dir / 'contexts.json'} was built from other data files than this run reads: not used "
                    "(run the knowledge step again with --with_context)")
    return data.get("contexts", {}), None


class _OnDemand:
    """The classifier for records without a domain, built once, from the training records' domains, and only
    when a record needs it (building it reads every labelled record's terms)."""

    def __init__(self, records: list[dict]) -> None:
        self.records = records
        self._classifier: DomainClassifier | None = None

    def __call__(self) -> DomainClassifier:
        if self._classifier is None:
            self._classifier = DomainClassifier.from_records(self.records)
            labels = sorted(self._classifier.labels)
            logger.info("domain classifier: labels %s plus %s (the domains of this data)",
                        ", ".join(labels) if labels else "none", GENERAL)
        return self._classifier


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(now - self._t, 3)
        self._t = now


def _load_dedup(args, datasets_dir: Path, sources: DataSources, test_path: Path | None, stage: RecordStage,
                drops: DropLog, per_file: dict, skipped: list,
                columns: ColumnMap | None) -> tuple[list[dict], int, Counter]:
    """Stages 1-2 in one streaming pass: records validated, scored and exactly deduplicated (the better copy
    stays, in the first one's place); returns them, the number of records read and the valid records per file."""
    exclude = [test_path] if test_path else []
    workers = args.workers if args.workers > 0 else min(2, os.cpu_count() or 1)
    files = dataset_files(datasets_dir, exclude, None, sources)
    if args.workers == 0 and sum(p.stat().st_size for p in files) < POOL_MIN_BYTES:
        workers = 1
    loaded = [0]

    def raw() -> Iterator[dict]:
        for rec in iter_all_datasets(datasets_dir, exclude, drops, per_file, progress=True, skipped=skipped,
                                     max_history_turns=args.max_history_turns, tool_calls=args.tool_calls,
                                     hf_dataset=args.hf_dataset, sources=sources, columns=columns):
            loaded[0] += 1
            yield rec

    records: list[dict] = []
    valid: Counter = Counter()
    seen: dict[bytes, int] = {}  # dedup key -> position in records
    seen_ids: set[str] = set()
    for clean in process_records(raw(), stage, drops, workers):
        valid[clean["source"]] += 1
        key = clean["_dk"]
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
    for rec in records:
        rec.pop("source_line", None)
    return records, loaded[0], valid


def _qkey(rec: dict) -> str:
    """The record's question key, computed by the per-record stage when it ran (``_qk``)."""
    key = rec.get("_qk")
    return key if key is not None else question_key(rec["question"])


def hold_out_test_set(args, records: list[dict], test_path: Path | None, drops: DropLog,
                      classifier: _OnDemand) -> tuple[list[dict], list[dict], list[dict] | None]:
    """Stage 3a: ``(records, test_records, created)``. The test set is read, or drawn from the records by a
    stable hash of the question key (all copies of a question go to the same side; a set preparation draws into
    ``Datasets/enhanced_test_set.json`` is drawn again on every run, so it follows the data); then every record
    whose question key or dedup key matches a test record is removed, on this run, whichever way the set came."""
    created = None
    test_records: list[dict] = []
    redraw = getattr(args, "test_set_kind", None) == "generated"
    if test_path is not None and test_path.exists() and not redraw:
        test_records = load_test_set(test_path, args.max_answer_chars, classifier)
    elif test_path is not None and args.create_test_set:
        chosen = [r for r in records if stable_fraction(f"test:{args.seed}:{_qkey(r)}") < args.test_fraction]
        chosen_ids = {r["id"] for r in chosen}
        records = [r for r in records if r["id"] not in chosen_ids]
        test_records = chosen
        created = [{k: r[k] for k in ("id", "question", "answer", "domain", "source")} for r in chosen]
    if test_records:
        test_keys = {dedup_key(r) for r in test_records}
        test_questions = {question_key(r["question"]) for r in test_records}
        kept = []
        for rec in records:
            if rec.get("_dk", b"") in test_keys or _qkey(rec) in test_questions:
                drops.drop("test_set_duplicate", rec["source"], rec["source_index"], rec["id"])
            else:
                kept.append(rec)
        records = kept
    for rec in records:
        rec.pop("_dk", None)
    return records, test_records, created


def remove_near_duplicates(args, records: list[dict], test_records: list[dict], drops: DropLog) -> tuple:
    """Stage 3b: near-duplicates of test questions, then among the records (the better copy stays). Two
    records are near-duplicates only when their questions and their answers are both close
    (``near_duplicates.pair_similarity``)."""
    near_pairs: list[dict] = []
    if args.near_dup_threshold >= 1 or not records:
        for rec in records:
            rec.pop("_sig", None)
        return records, near_pairs
    texts = _PairTexts(test_records, records)
    quality = [1.0] * len(test_records) + [r["quality_score"] for r in records]
    signatures = None
    if all("_sig" in r for r in records):  # computed by the per-record stage (possibly in the pool)
        hasher = MinHasher()
        parts = [hasher.signatures(r["answer"] for r in test_records)]
        parts.append(np.frombuffer(b"".join(r.pop("_sig") for r in records), dtype=np.uint32)
                     .reshape(len(records), hasher.num_perm))
        signatures = np.concatenate(parts)
    for rec in records:
        rec.pop("_sig", None)
    found = find_near_duplicates(texts, quality, args.near_dup_threshold, protected=len(test_records),
                                 pairs=texts.pair, signatures=signatures)
    offset = len(test_records)
    remove = set()
    for i, j, sim in found:
        rec = records[i - offset]
        if j < offset:
            drops.drop("test_set_near_duplicate", rec["source"], rec["source_index"],
                       f"{rec['id']} ~ test {test_records[j]['id']} (similarity {sim})")
            other = f"test:{test_records[j]['id']}"
        else:
            drops.drop("near_duplicate", rec["source"], rec["source_index"],
                       f"{rec['id']} ~ {records[j - offset]['id']} (similarity {sim})")
            other = records[j - offset]["id"]
        remove.add(i - offset)
        if len(near_pairs) < 200:
            near_pairs.append({"dropped": rec["id"], "kept": other, "similarity": sim})
    return [r for k, r in enumerate(records) if k not in remove], near_pairs


def data_problems(per_file: dict, drops: DropLog, valid: Counter, skipped: list[dict]) -> list[DataProblem]:
    """The problems of the whole read (``loading.file_problems`` per file, counted over whole files, and the files
    no reader takes): what the survey of the pre-flight reports from the first records of each file."""
    problems = []
    for rel, info in sorted(per_file.items()):
        problems += file_problems(rel, info, dict(drops.per_file.get(rel, {})), drops.file_examples(rel),
                                  valid.get(rel, 0))
    return problems + not_read_problems(skipped)


def _check_paths(args) -> None:
    """Every output path is usable before anything is written (a folder given as --output is an error now,
    not after the test set was written)."""
    check_output_path(Path(args.output), "--output")
    if args.stats_output:
        check_output_path(Path(args.stats_output), "--stats_output")
    if args.test_set and Path(args.test_set).is_dir():
        raise UserError(f"--test_set {args.test_set} is a folder; give the test set's file name, e.g. "
                        f"{Path(args.test_set) / 'test_set.json'}")


def prepare(args: argparse.Namespace) -> dict:
    """Run every stage; write the prepared file, the stats and a created test set; return the stats."""
    timer = _Timer()
    datasets_dir = Path(args.datasets_dir)
    if not datasets_dir.is_dir():
        raise UserError(f"--datasets_dir {datasets_dir} is not a folder" if datasets_dir.exists() else
                        f"--datasets_dir {datasets_dir} does not exist")
    _check_paths(args)
    sources = resolve_sources(datasets_dir, args.include_sample)
    if sources.empty and not args.hf_dataset:
        raise UserError(str(empty_problem(datasets_dir)))
    logger.info("%s; %s", sources.data_line(), sources.test_line() if args.test_set_kind != "given" else
                f"held-out set: {args.test_set} (--test_set)")
    test_path = Path(args.test_set) if args.test_set else None
    kb_dir = Path(args.knowledge_base) if args.knowledge_base else None
    contexts, kb_note = load_knowledge(kb_dir, [p.relative_to(datasets_dir).as_posix() for p in sources.files])
    if kb_note:
        logger.info("%s", kb_note)
    domain_map = {}
    if args.domain_map:
        try:
            domain_map = load_domain_map(args.domain_map)
        except (OSError, ValueError) as err:
            raise UserError(f"--domain_map {args.domain_map}: {err}") from err
    columns = ColumnMap.parse(args.columns)
    stage = RecordStage(args.max_answer_chars, args.max_answer_tokens, domain_map, args.keep_flagged,
                        near_duplicates=args.near_dup_threshold < 1)
    drops, per_file, skipped = DropLog(), {}, []
    drops.strict = args.strict

    records, loaded, valid = _load_dedup(args, datasets_dir, sources, test_path, stage, drops, per_file, skipped,
                                         columns)
    classifier = _OnDemand(records)
    if any(r["domain"] is None for r in records):
        assign_missing_domains(records, classifier())
    for rec in records:
        if rec["id"] in contexts and "context" not in rec:
            rec["context"] = contexts[rec["id"]]
    valid_distinct = len(records)
    problems = data_problems(per_file, drops, valid, skipped)
    if args.strict and problems:
        raise UserError("--strict: the data has problems:\n" + "\n".join(f"  - {p}" for p in problems))
    timer.lap("load_validate_dedup")

    records, test_records, created = hold_out_test_set(args, records, test_path, drops, classifier)
    timer.lap("test_set")
    records, near_pairs = remove_near_duplicates(args, records, test_records, drops)
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
        held = f"; {len(created)} went to the new held-out test set (--no-create_test_set or more data avoids " \
               f"that)" if created else ""
        found = "; ".join(str(p) for p in problems[:5])
        raise UserError(f"no usable record found under {datasets_dir}: {sum(drops.counts.values())} dropped "
                        f"({dict(drops.counts)}){held}." + (f" Problems: {found}." if found else "") +
                        " See documentation/DATASETS.md for the accepted formats.")
    real_count = len(records)
    timer.lap("min_quality")

    split_records(records, args.validation_fraction, args.seed, args.synthetic_ratio)
    augmenter = None
    if args.synthetic_ratio > 0:
        train = [r for r in records if r["split"] == "train" and not r.get("synthetic")]
        augmenter = Augmenter(train, args.seed, {_qkey(r) for r in records} | {_qkey(r) for r in test_records})
    for rec in records:
        rec.pop("_qk", None)
    synthetic = generate_synthetic_examples(records, args.synthetic_ratio, args.seed, augmenter)
    compute_quality_scores(synthetic)
    records.extend(synthetic)
    target = read_json(args.target_distribution, "--target_distribution") if args.target_distribution else None
    if target:
        target = {normalise_domain(d) or d: w for d, w in target.items()}
    records, balance = balance_domains(records, args.max_domain_fraction, args.min_domain_count, target, args.seed,
                                       allow_synthetic=args.synthetic_ratio > 0, drops=drops, augmenter=augmenter,
                                       materialise=args.materialise_balance, max_repeats=args.max_repeats,
                                       synthetic_ratio=args.synthetic_ratio)
    for rec in records:
        if "quality_score" not in rec:
            rec["quality_score"] = quality_score(rec["question"], rec["answer"])
    compute_difficulty(records, only_missing=True)
    timer.lap("split_augment_balance")
    # The file's record order carries no meaning: every sampler of the trainer draws its own order (the
    # curriculum ranks by ``difficulty``). Input order, then the added records, keeps the output repeatable.
    output = Path(args.output)
    write_prepared(output, records)
    if created is not None:
        write_json_output(test_path, created)
        logger.info("held-out test set: %d records drawn from the data -> %s", len(created), test_path)
    elif test_path is not None and not test_records and args.test_set_kind == "generated" and test_path.exists():
        test_path.unlink()  # a held-out set drawn on an earlier run: no longer this data's (--no-create_test_set)
    timer.lap("write")
    stats = build_stats(args, records, test_records, drops, per_file, skipped, balance, near_pairs, loaded,
                        valid_distinct, real_count, timer, held_out_from_data=len(created) if created else 0,
                        valid=valid, problems=problems, sources=sources)
    write_json_output(Path(args.stats_output) if args.stats_output else output.with_name(STATS_NAME), stats)
    return stats


def build_stats(args, records, test_records, drops, per_file, skipped, balance, near_pairs, loaded,
                valid_distinct, real_count, timer, held_out_from_data: int = 0, valid: Counter | None = None,
                problems: list[DataProblem] = (), sources: DataSources | None = None) -> dict:
    """The stats file's content (documentation/DATA_PROCESSING.md, "Stats"). ``held_out_from_data``: records
    this run moved into a created test set (they count as kept)."""
    final_by_file = Counter(r["source"] for r in records if not r.get("synthetic"))
    for rel, info in per_file.items():
        info["valid"] = (valid or {}).get(rel, 0)
        info["kept"] = final_by_file.get(rel, 0)
        info["dropped"] = dict(drops.per_file.get(rel, {}))
    split_counts = Counter((r["domain"], r["split"]) for r in records)
    synthetic_counts = Counter(r["domain"] for r in records if r.get("synthetic"))
    domains = sorted({r["domain"] for r in records})
    real_out = sum(1 for r in records if not r.get("synthetic"))
    added = sum(1 for r in records if r.get("synthetic"))
    return {
        "format_version": FORMAT_VERSION,
        "input_records": loaded + sum(info.get("unusable_items", 0) for info in per_file.values()),
        "loaded_records": loaded,
        "valid_distinct_records": valid_distinct,
        "output_records": len(records),
        "real_records": real_count,
        "real_kept_share": round((real_out + held_out_from_data) / valid_distinct, 4) if valid_distinct else 0.0,
        "synthetic_records": added,
        "synthetic_share": round(added / len(records), 4) if records else 0.0,
        "train_records": sum(r["split"] == "train" for r in records),
        "validation_records": sum(r["split"] == "validation" for r in records),
        "test_records": len(test_records),
        "data": {"sources": sources.data_line() if sources else None,
                 "read_sample": bool(sources and sources.read_sample),
                 "files": len(per_file),
                 "test_set": str(args.test_set) if args.test_set else None,
                 "test_set_kind": getattr(args, "test_set_kind", None)},
        "problems": [p.as_dict() for p in problems],
        "problems_rule": {"dropped_share_warning": DROPPED_SHARE_WARNING, "kinds": PROBLEM_KINDS},
        "skipped_files": skipped,
        "per_file": dict(sorted(per_file.items())),
        "per_domain": {d: {"real": split_counts[(d, "train")] + split_counts[(d, "validation")] - synthetic_counts[d],
                           "train": split_counts[(d, "train")], "validation": split_counts[(d, "validation")],
                           "synthetic": synthetic_counts[d],
                           "sample_weight": balance.get("weights", {}).get(d, 1.0)}
                       for d in domains},
        "domain_sources": dict(sorted(Counter(r.get("domain_source", "record") for r in records
                                              if not r.get("synthetic")).items())),
        "domain_inferred": sum(bool(r.get("domain_inferred")) for r in records),
        "dropped": drops.as_dict(),
        "dropped_total": sum(drops.counts.values()),
        "set_aside": dict(sorted(drops.notes.items())),
        "dedup": {"exact": drops.counts["exact_duplicate"], "near": drops.counts["near_duplicate"],
                  "test_set_exact": drops.counts["test_set_duplicate"],
                  "test_set_near": drops.counts["test_set_near_duplicate"],
                  "near_threshold": args.near_dup_threshold, "near_pairs": near_pairs},
        "balancing": balance,
        "synthetic_by_method": dict(sorted(Counter(r.get("augmentation", "?") for r in records
                                                   if r.get("synthetic")).items())),
        "flagged": dict(sorted(Counter(f for r in records for f in r.get("flags", ())).items())),
        "quality_histogram": histogram(r["quality_score"] for r in records),
        "difficulty_counts": {str(k): v for k, v in sorted(Counter(r["difficulty"] for r in records).items())},
        "with_code": sum(r["has_code"] for r in records),
        "timings_s": timer.times,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def summary_table(stats: dict) -> str:
    """The console summary: per domain the real count, the mix before and after and how it is reached, the
    splits; then balancing notes, skipped files and the drop reasons."""
    balance = stats["balancing"]
    rows = [("domain", "real", "share", "-> share", "weight", "synthetic", "train", "validation")]
    for d, info in stats["per_domain"].items():
        rows.append((d, str(info["real"]),
                     f"{balance.get('share_before', {}).get(d, 0):.3f}",
                     f"{balance.get('share_after', {}).get(d, 0):.3f}", f"{info['sample_weight']:.3f}",
                     str(info["synthetic"]), str(info["train"]), str(info["validation"])))
    rows.append(("total", str(sum(i["real"] for i in stats["per_domain"].values())), "1", "1", "",
                 str(stats["synthetic_records"]), str(stats["train_records"]), str(stats["validation_records"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    how = ("by sample weights (no record removed or copied)" if balance.get("method") == "weights" else
           f"materialised: capped {balance.get('capped')}, synthetic {balance.get('synthetic_added')}, "
           f"repeats {balance.get('repeated_added')}")
    lines.append(f"balance {how}; real records kept {stats['real_kept_share']:.1%} (a test set made from them "
                 f"included), "
                 f"synthetic {stats['synthetic_share']:.1%} of the output")
    lines.extend(f"  note: {n}" for n in balance.get("notes", []))
    for s in stats.get("skipped_files", []):
        lines.append(f"  skipped {s['file']}: {s['hint']}")
    if stats["dropped"]:
        lines.append("")
        lines.append("dropped (reason: count, first example)")
        for reason, info in stats["dropped"].items():
            ex = info["examples"][0] if info["examples"] else {}
            where = f"{ex.get('source')}" + (f" #{ex['index']}" if ex.get("index") is not None else "")
            lines.append(f"  {reason}: {info['count']}  ({where} {ex.get('detail', '')})"[:260])
    if stats.get("problems"):
        lines.append("")
        lines.append("problems to fix (the pre-flight shows them too; --strict makes them fatal)")
        lines.extend(f"  {p['file'] or 'the data folder'}: {p['message']}; fix: {p['fix']}" for p in stats["problems"])
    if stats.get("set_aside"):
        lines.append("set aside (not trained on, not records): " +
                     ", ".join(f"{k} {v}" for k, v in stats["set_aside"].items()))
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    p = FlagParser(description="Prepare Datasets/ for training (see documentation/DATA_PROCESSING.md).")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="data-preparation settings of an overnight profile (quick, rtx3060); flags given "
                        "explicitly win over the profile's")
    io = p.add_argument_group("files")
    io.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets", help="input folder")
    io.add_argument("--hf_dataset", type=str, default=None,
                    help="also read a Hugging Face dataset, NAME[:SPLIT] (default split train): a folder written "
                         "by Dataset.save_to_disk, a local dataset folder, or a hub name (needs the network)")
    io.add_argument("--output", type=Path, default=None,
                    help="prepared file (default: <datasets_dir>/enhanced_training_data.json)")
    io.add_argument("--stats_output", type=Path, default=None, help="stats file (default: next to --output)")
    io.add_argument("--include_sample", action=argparse.BooleanOptionalAction, default=False,
                    help="also read the shipped sample in <datasets_dir>/sample/ next to your own files (without "
                         "files of your own the sample is read anyway)")
    io.add_argument("--test_set", type=Path, default=None,
                    help="held-out test set, kept apart (default: <datasets_dir>/test_set.json when you wrote one, "
                         "else the sample's when the sample is all the data, else one drawn from the data into "
                         "<datasets_dir>/enhanced_test_set.json on every run)")
    io.add_argument("--create_test_set", action=argparse.BooleanOptionalAction, default=True,
                    help="draw the test set from the data when there is none (default on; with "
                         "--no-create_test_set a missing test set means no held-out set)")
    io.add_argument("--test_fraction", type=float, default=0.1, help="share of questions for a created test set")
    io.add_argument("--knowledge_base", type=Path, default=None,
                    help="outputs of knowledge_base_enhancer_main.py; its contexts are used when present and built "
                         "from the same data files (default: <datasets_dir>/knowledge_base)")
    io.add_argument("--workers", type=int, default=0,
                    help="processes for the per-record stage (0 = up to 2, on inputs over 64 MB only; 1 = this "
                         "process)")
    rd = p.add_argument_group("reading")
    rd.add_argument("--max_history_turns", type=int, default=DEFAULT_MAX_HISTORY_TURNS,
                    help="earlier exchanges of a conversation kept as each turn's context (0 = none; the "
                         "converters use the same default)")
    rd.add_argument("--tool_calls", choices=("keep", "drop"), default="keep",
                    help="conversations with tool calls: keep (tool turns become context) or drop them whole")
    rd.add_argument("--columns", type=str, default=None,
                    help="other names of the fields: question=q,answer=a (also context, domain, id), or a JSON "
                         "file of {field: column} or of {file-name pattern: {field: column}}")
    rd.add_argument("--domain_map", type=Path, default=None,
                    help='JSON file {"file-name pattern": "domain", ...} for records without a domain field')
    va = p.add_argument_group("validation and dedup")
    va.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                    help="make every problem fatal (exit 2): an unreadable file or invalid record, a file that gives "
                         "no record or loses more than 5%% of its records, a file no reader takes")
    va.add_argument("--max_answer_chars", type=int, default=20000,
                    help="drop records whose question or answer is longer (characters)")
    va.add_argument("--max_answer_tokens", type=int, default=0,
                    help="drop records whose question or answer has more GPT-2 pre-tokens (0 = off)")
    va.add_argument("--keep_flagged", action=argparse.BooleanOptionalAction, default=False,
                    help="keep records with unfilled placeholders or orphan <image> tokens (marked in 'flags') "
                         "instead of dropping them")
    va.add_argument("--near_dup_threshold", type=float, default=0.8,
                    help="similarity at which two records are near-duplicates: question word sets AND answer word "
                         "3-grams both at least this Jaccard (1 = off)")
    va.add_argument("--min_quality", type=float, default=0.0, help="drop records scoring below this (0 = off)")
    st = p.add_argument_group("split, balance and augmentation")
    st.add_argument("--seed", type=int, default=42, help="seed of the test-set draw, the split and the augmentation")
    st.add_argument("--validation_fraction", type=float, default=0.1, help="validation share per domain")
    st.add_argument("--max_domain_fraction", type=float, default=0.2,
                    help="no domain above this share of the training draws (1 = off; raised to 1/#domains when "
                         "lower is impossible)")
    st.add_argument("--min_domain_count", type=int, default=300,
                    help="raise smaller domains towards this many draws per epoch, bounded by --max_repeats (0 = off)")
    st.add_argument("--target_distribution", type=Path, default=None,
                    help='JSON file {"domain": weight, ...}: listed domains share their combined size so')
    st.add_argument("--max_repeats", type=float, default=3.0,
                    help="largest sample weight of a record; with --materialise_balance, most copies of one record")
    st.add_argument("--materialise_balance", action=argparse.BooleanOptionalAction, default=False,
                    help="write the balance into the file (drop surplus, add synthetic examples and marked "
                         "repeats) instead of sample weights")
    st.add_argument("--synthetic_ratio", type=float, default=0.1,
                    help="most synthetic plus repeated records, as a share of the output (0 = off)")
    annotate_profile_help(p, PROFILES)  # --help says what each profile sets, beside the default
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _build_parser()
    pre, _ = p.parse_known_args(argv)
    if pre.profile:
        p.set_defaults(**PROFILES[pre.profile])
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
    if not 0 <= args.synthetic_ratio < 1:
        p.error("--synthetic_ratio must be in [0, 1): it is the largest synthetic share of the output (0 = off)")
    if args.max_repeats < 1:
        p.error("--max_repeats must be at least 1")
    if args.columns is not None:
        try:
            ColumnMap.parse(args.columns)
        except UserError as err:
            p.error(str(err))
    if args.max_history_turns < 0:
        p.error("--max_history_turns must be 0 or more")
    if args.workers < 0:
        p.error("--workers must be 0 (auto) or more")
    if args.target_distribution is not None:
        target = read_json(args.target_distribution, "--target_distribution")
        if not isinstance(target, dict) or not target or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in target.values()):
            p.error("--target_distribution must hold a JSON object of domain -> non-negative weight")
        if sum(target.values()) <= 0:
            p.error("--target_distribution weights must not all be 0")
    args.output = args.output or args.datasets_dir / "enhanced_training_data.json"
    if args.test_set is None:
        sources = resolve_sources(args.datasets_dir, args.include_sample)
        args.test_set, args.test_set_kind = sources.test_set, sources.test_set_kind
    else:
        args.test_set_kind = "given"
    if args.knowledge_base is None:
        args.knowledge_base = args.datasets_dir / "knowledge_base"
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.profile:
        logger.info("profile %s: %s", args.profile,
                    ", ".join(f"--{k} {getattr(args, k)}" for k in PROFILES[args.profile]))
    stats = prepare(args)
    logger.info("prepared %d records (%d train, %d validation, %d synthetic; %d held out for test) -> %s",
                stats["output_records"], stats["train_records"], stats["validation_records"],
                stats["synthetic_records"], stats["test_records"], args.output)
    logger.info("\n%s", summary_table(stats))
    if stats["dropped_total"]:
        logger.warning("dropped %d records; details in the stats file", stats["dropped_total"])
    if stats["problems"]:
        logger.warning("%d problem%s in the data, listed above under 'problems to fix' and in the stats file "
                       "(--strict makes them fatal)", len(stats["problems"]), "s" * (len(stats["problems"]) > 1))
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
