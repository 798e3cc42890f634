"""Knowledge base step: TF-IDF retrieval over the knowledge notes, record contexts, consistency check and
per-domain term vectors. Optional; prepare_data_for_training.py uses its contexts when they exist.

The notes are ``Datasets/knowledge/`` (yours: Markdown, text or JSON passages to retrieve from, never Q&A records)
and, when the run reads the sample (no data of your own, or --include_sample), ``Datasets/sample/knowledge/``. The
records are read with the readers and the validation data preparation uses (src/utils/data_layout.py decides
which files), so the two steps agree on what is readable.

    python src/data_processing/knowledge_base_enhancer_main.py
    python -m src.data_processing.knowledge_base_enhancer_main --datasets_dir Datasets --with_context --top_k 2
    python -m src.data_processing.knowledge_base_enhancer_main --query "How long does a DNS answer stay cached?"

Outputs in --output_dir (default Datasets/knowledge_base/), written atomically:
- ``index.json``: the passages (file, heading, text) and the idf of every term;
- ``domain_vectors.json``: per domain, its record count, top terms and a TF-IDF term vector computed from the
  records (each domain's text is one document; ``domains.domain_vectors``, the vectors preparation's classifier
  computes from the same records);
- ``consistency_report.json``: record pairs whose questions nearly match (cosine >= --question_similarity) but
  whose answers disagree (cosine < --answer_similarity);
- ``contexts.json`` (with --with_context): ``{record id: top-k passages}`` and the data files they were built
  from; preparation attaches them as ``context`` when it reads the same files.

TF-IDF here: tokens are lower-case ``[a-z][a-z0-9_]+`` minus stopwords; tf = 1 + ln(count);
idf = ln((1 + N) / (1 + df)) + 1; vectors are L2-normalised, so a dot product is a cosine. Pure Python with an
inverted index: a knowledge folder of thousands of passages answers a query in well under a millisecond.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import write_json_output
from src.data_processing.domains import DomainClassifier, DomainResolver, assign_missing_domains, domain_vectors
from src.data_processing.loading import ColumnMap, DropLog, iter_all_datasets
from src.data_processing.text_quality import STOPWORDS
from src.data_processing.validation import validate_record
from src.utils.common import (PROJECT_ROOT, FlagParser, UserError, read_json, run_entry_point,
                              setup_logging)
from src.utils.data_layout import DataSources, resolve_sources

logger = logging.getLogger(__name__)

TOKEN = re.compile(r"[a-z][a-z0-9_]+")
EXTRA_STOPWORDS = frozenset("the and for are but not you can its has was all any our out one may use how why who "
                            "each other only own same too off per via".split())
PASSAGE_WORDS = 120  # longer paragraphs are cut into pieces of about this many words
HEADING = re.compile(r"^#{1,6}\s+(.*)$")


def tokenize(text: str) -> list[str]:
    return [t for t in TOKEN.findall(text.lower()) if t not in STOPWORDS and t not in EXTRA_STOPWORDS]


def tfidf_vector(tokens: list[str], idf: dict[str, float]) -> dict[str, float]:
    """L2-normalised ``(1 + ln tf) * idf`` over the terms the idf knows."""
    vec = {t: (1 + math.log(c)) * idf[t] for t, c in Counter(tokens).items() if t in idf}
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {t: v / norm for t, v in vec.items()} if norm else {}


def compute_idf(docs: list[list[str]]) -> dict[str, float]:
    df = Counter(t for doc in docs for t in set(doc))
    n = len(docs)
    return {t: math.log((1 + n) / (1 + d)) + 1 for t, d in df.items()}


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(t, 0.0) for t, v in a.items())


# ---------------------------------------------------------------------------------------------------------------
# Knowledge passages and the retrieval index
# ---------------------------------------------------------------------------------------------------------------

def _split_words(text: str, limit: int) -> list[str]:
    words = text.split(" ")
    if len(words) <= limit * 1.5:
        return [text]
    return [" ".join(words[i:i + limit]) for i in range(0, len(words), limit)]


def split_passages(text: str, name: str) -> list[dict]:
    """Markdown or text into passages: one per paragraph (headings give the title; code blocks stay whole and
    join the paragraph before them)."""
    passages, title, para, in_code = [], name, [], False

    def flush():
        body = "\n".join(para).strip()
        if body:
            if "```" in body:
                passages.append({"title": title, "text": body})
            else:
                for piece in _split_words(" ".join(body.split()), PASSAGE_WORDS):
                    passages.append({"title": title, "text": piece})
        para.clear()

    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
            para.append(line)
            continue
        if in_code:
            para.append(line)
            continue
        m = HEADING.match(line)
        if m:
            flush()
            title = m.group(1).strip()
        elif not line.strip():
            if para and not para[-1].strip().startswith("```") or not para:
                flush()
        else:
            para.append(line)
    flush()
    if passages and text.lstrip() and not text.lstrip().startswith("#"):
        # A plain-text file's first line is its title when it stands alone.
        first = text.strip().splitlines()[0].strip()
        if passages[0]["text"] == first:
            passages.pop(0)
            for p in passages:
                if p["title"] == name:
                    p["title"] = first
    return passages


def load_knowledge_passages(knowledge_dir: Path) -> list[dict]:
    """Passages of every ``*.md``, ``*.txt`` and ``*.json`` file (a list of strings or of ``{title, text}``)."""
    passages = []
    for path in sorted(Path(knowledge_dir).rglob("*")):
        if not path.is_file() or path.suffix not in (".md", ".txt", ".json"):
            continue
        rel = path.relative_to(knowledge_dir).as_posix()
        if path.suffix == ".json":
            data = read_json(path, "knowledge file")
            items = data.get("passages", []) if isinstance(data, dict) else data
            for item in items if isinstance(items, list) else []:
                if isinstance(item, str) and item.strip():
                    passages.append({"file": rel, "title": path.stem, "text": item.strip()})
                elif isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip():
                    passages.append({"file": rel, "title": str(item.get("title", path.stem)),
                                     "text": item["text"].strip()})
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for p in split_passages(text, path.stem):
            passages.append({"file": rel, **p})
    return passages


class KnowledgeIndex:
    """TF-IDF retrieval over passages, with an inverted index (term -> [(passage, weight)])."""

    def __init__(self, passages: list[dict]) -> None:
        self.passages = passages
        docs = [tokenize(f"{p['title']} {p['text']}") for p in passages]
        self.idf = compute_idf(docs)
        self.postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for i, doc in enumerate(docs):
            for t, w in tfidf_vector(doc, self.idf).items():
                self.postings[t].append((i, w))

    def search(self, query: str, k: int = 2, min_score: float = 0.0) -> list[tuple[int, float]]:
        """``(passage index, cosine)`` of the best ``k`` passages scoring at least ``min_score``."""
        scores: dict[int, float] = defaultdict(float)
        for t, qw in tfidf_vector(tokenize(query), self.idf).items():
            for i, w in self.postings.get(t, ()):
                scores[i] += qw * w
        best = sorted(scores.items(), key=lambda iv: (-iv[1], iv[0]))[:k]
        return [(i, round(s, 4)) for i, s in best if s >= min_score and s > 0]

    def context_for(self, query: str, k: int, min_score: float, max_chars: int) -> str:
        parts = [self.passages[i]["text"] for i, _ in self.search(query, k, min_score)]
        text = "\n\n".join(parts)
        return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0] + " ..."


# ---------------------------------------------------------------------------------------------------------------
# Technical embeddings and consistency
# ---------------------------------------------------------------------------------------------------------------

def consistency_check(records: list[dict], question_similarity: float = 0.8,
                      answer_similarity: float = 0.3, max_pairs: int = 500) -> list[dict]:
    """Pairs of records whose questions nearly match but whose answers disagree (TF-IDF cosines).

    Candidates share at least one of each question's three rarest terms (an inverted index), so the cost grows
    with the number of similar questions, not with the square of the records.
    """
    q_docs = [tokenize(r["question"]) for r in records]
    a_docs = [tokenize(r["answer"]) for r in records]
    q_idf, a_idf = compute_idf(q_docs), compute_idf(a_docs)
    q_vecs = [tfidf_vector(d, q_idf) for d in q_docs]
    blocks: dict[str, list[int]] = defaultdict(list)
    for i, vec in enumerate(q_vecs):
        for t in sorted(vec, key=lambda t: (-q_idf[t], t))[:3]:
            blocks[t].append(i)
    seen, found = set(), []
    for members in blocks.values():
        if len(members) > 200:  # a term in hundreds of questions blocks nothing useful
            continue
        for x, i in enumerate(members):
            for j in members[x + 1:]:
                if (i, j) in seen:
                    continue
                seen.add((i, j))
                qs = cosine(q_vecs[i], q_vecs[j])
                if qs < question_similarity:
                    continue
                ans = cosine(tfidf_vector(a_docs[i], a_idf), tfidf_vector(a_docs[j], a_idf))
                if ans < answer_similarity:
                    found.append({"a": records[i]["id"], "b": records[j]["id"], "question_similarity": round(qs, 4),
                                  "answer_similarity": round(ans, 4), "question_a": records[i]["question"][:200],
                                  "question_b": records[j]["question"][:200]})
    found.sort(key=lambda f: (-f["question_similarity"], f["a"], f["b"]))
    return found[:max_pairs]


def load_records(datasets_dir: Path, test_set: Path | None, max_chars: int,
                 sources: DataSources | None = None,
                 columns: ColumnMap | None = None) -> tuple[list[dict], DropLog]:
    """Validated records of the datasets folder, with the ids and domains preparation gives them: the same readers,
    ``--columns`` included, so both steps agree on what is readable."""
    drops = DropLog()
    records, seen_ids = [], set()
    resolver = DomainResolver()
    for rec in iter_all_datasets(datasets_dir, [test_set] if test_set else [], drops, sources=sources,
                                 columns=columns):
        clean = validate_record(rec, drops, max_chars, resolver=resolver)
        if clean is None:
            continue
        base, n = clean["id"], 1
        while clean["id"] in seen_ids:
            n += 1
            clean["id"] = f"{base}~{n}"
        seen_ids.add(clean["id"])
        records.append(clean)
    if any(r["domain"] is None for r in records):
        assign_missing_domains(records, DomainClassifier.from_records(records))
    return records, drops


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = FlagParser(description="Build the knowledge index, contexts, domain vectors and the "
                               "consistency report (see documentation/DATA_PROCESSING.md).")
    io = p.add_argument_group("files")
    io.add_argument("--datasets_dir", type=Path, default=PROJECT_ROOT / "Datasets", help="records folder")
    io.add_argument("--include_sample", action=argparse.BooleanOptionalAction, default=False,
                    help="also read the shipped sample (its records and its knowledge/ notes) next to your own "
                         "files, as prepare_data_for_training --include_sample does")
    io.add_argument("--knowledge_dir", type=Path, default=None,
                    help="Markdown/text/JSON knowledge files (default: <datasets_dir>/knowledge, plus the "
                         "sample's knowledge/ when the sample is read)")
    io.add_argument("--output_dir", type=Path, default=None,
                    help="where the outputs go (default: <datasets_dir>/knowledge_base, which preparation reads)")
    io.add_argument("--test_set", type=Path, default=None,
                    help="a held-out file inside the datasets folder that is not named test_set.json, never read "
                         "as records (files named test_set.json never are)")
    io.add_argument("--columns", type=str, default=None,
                    help="other names of the fields, as prepare_data_for_training --columns: question=q,answer=a, "
                         "or a JSON file")
    rt = p.add_argument_group("retrieval")
    rt.add_argument("--with_context", action=argparse.BooleanOptionalAction, default=False,
                    help="write contexts.json: the top-k passages of each record's question")
    rt.add_argument("--top_k", type=int, default=2, help="passages per record")
    rt.add_argument("--min_score", type=float, default=0.2, help="cosine a passage needs to be attached")
    rt.add_argument("--max_context_chars", type=int, default=800, help="cut longer contexts at a word")
    rt.add_argument("--query", type=str, default=None, help="print the top passages for this text and stop")
    ck = p.add_argument_group("consistency check")
    ck.add_argument("--question_similarity", type=float, default=0.8, help="questions at least this close...")
    ck.add_argument("--answer_similarity", type=float, default=0.3, help="...whose answers are below this")
    ck.add_argument("--max_answer_chars", type=int, default=20000, help="same limit as preparation")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top_k must be at least 1")
    for name in ("min_score", "question_similarity", "answer_similarity"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} must be in [0, 1]")
    if args.max_context_chars < 50:
        p.error("--max_context_chars must be at least 50")
    try:
        args.column_map = ColumnMap.parse(args.columns)
    except UserError as err:
        p.error(str(err))
    args.sources = resolve_sources(args.datasets_dir, args.include_sample)
    args.knowledge_dirs = [args.knowledge_dir] if args.knowledge_dir else list(args.sources.knowledge_dirs)
    args.output_dir = args.output_dir or args.datasets_dir / "knowledge_base"
    return args


def run(args: argparse.Namespace) -> dict:
    if not args.knowledge_dirs:
        raise UserError(f"no knowledge notes: {Path(args.datasets_dir) / 'knowledge'} does not exist. Put Markdown, "
                        "text or JSON notes there (documentation/DATASETS.md, \"knowledge/\"), or give "
                        "--knowledge_dir")
    for folder in args.knowledge_dirs:
        if not Path(folder).is_dir():
            raise UserError(f"--knowledge_dir {folder} is not a folder")
    passages = [p for folder in args.knowledge_dirs for p in load_knowledge_passages(folder)]
    if not passages:
        raise UserError(f"{', '.join(str(f) for f in args.knowledge_dirs)} holds no .md, .txt or .json passage")
    index = KnowledgeIndex(passages)
    if args.query:
        for i, score in index.search(args.query, args.top_k):
            print(f"[{score:.3f}] {passages[i]['file']} / {passages[i]['title']}\n{passages[i]['text']}\n")
        return {"passages": len(passages)}
    datasets_dir = Path(args.datasets_dir)
    if not datasets_dir.is_dir():
        raise UserError(f"--datasets_dir {args.datasets_dir} is not a folder")
    logger.info("%s", args.sources.data_line())
    records, drops = load_records(datasets_dir, args.test_set, args.max_answer_chars, args.sources,
                                  getattr(args, "column_map", None))
    if not records:
        raise UserError(f"no usable record under {args.datasets_dir}")
    out = Path(args.output_dir)
    write_json_output(out / "index.json", {"format_version": 1, "passages": passages,
                                           "idf": {t: round(v, 5) for t, v in sorted(index.idf.items())}})
    vectors = domain_vectors(records)
    write_json_output(out / "domain_vectors.json", {"format_version": 1, "domains": vectors})
    conflicts = consistency_check(records, args.question_similarity, args.answer_similarity)
    write_json_output(out / "consistency_report.json", {"format_version": 1, "pairs": conflicts,
                                                        "question_similarity": args.question_similarity,
                                                        "answer_similarity": args.answer_similarity})
    summary = {"passages": len(passages), "files": len({p["file"] for p in passages}), "records": len(records),
               "domains": {d: v["top_terms"][:5] for d, v in vectors.items()}, "conflicts": len(conflicts)}
    if args.with_context:
        contexts = {}
        for rec in records:
            ctx = index.context_for(rec["question"], args.top_k, args.min_score, args.max_context_chars)
            if ctx:
                contexts[rec["id"]] = ctx
        # The files the contexts belong to: preparation uses them only when it reads the same files.
        data_files = [p.relative_to(datasets_dir).as_posix() for p in args.sources.files]
        write_json_output(out / "contexts.json", {"format_version": 1, "top_k": args.top_k,
                                                  "min_score": args.min_score, "data_files": data_files,
                                                  "contexts": contexts})
        summary["with_context"] = len(contexts)
    elif (out / "contexts.json").exists():
        (out / "contexts.json").unlink()  # stale contexts from an earlier --with_context run would still be used
    return summary


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    summary = run(args)
    if args.query:
        return 0
    logger.info("knowledge index: %d passages from %d files -> %s", summary["passages"], summary["files"],
                args.output_dir)
    for domain, terms in summary["domains"].items():
        logger.info("  %-22s %s", domain, ", ".join(terms))
    if "with_context" in summary:
        logger.info("contexts for %d of %d records (top %d, score >= %.2f)", summary["with_context"],
                    summary["records"], args.top_k, args.min_score)
    logger.info("consistency check: %d question pairs with disagreeing answers (see consistency_report.json)",
                summary["conflicts"])
    return 0


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
