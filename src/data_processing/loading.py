"""Loading every input of data preparation: the files under the datasets folder (JSON, JSON Lines, gzipped ones,
CSV, TSV, Parquet) and a Hugging Face dataset, each item mapped to records by ``record_shapes.shape_item``; and
the survey of what in that folder would surprise the user (``survey_datasets``).

    from src.data_processing.loading import DropLog, iter_all_datasets, survey_datasets
    drops = DropLog()
    records = list(iter_all_datasets(Path("Datasets"), drops=drops))
    for problem in survey_datasets(Path("Datasets")):
        print(problem)          # "helpdesk_export.json: ...; fix: ..."

Which files are data, and whether the shipped sample is read, is ``src/utils/data_layout.py``'s decision. Every
item ends as records or as a counted drop with its file, index and reason; files that no reader takes are listed
with what to do with them (``Posts.xml`` -> convert_stackexchange, ``*.md`` -> convert_faq). CSV, TSV and Parquet
go through the ``datasets`` library in streaming mode (no cache copy of the file). ``--columns`` maps other column
names to ours before an item's shape is read.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from src.data_processing.json_stream import Item, iter_json_items, iter_jsonl_items
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS, shape_item
from src.utils.common import UserError
from src.utils.data_layout import TABLE_SUFFIXES, DataSources, resolve_sources

logger = logging.getLogger(__name__)

DROP_EXAMPLES = 3  # first examples kept per drop reason in the stats
# Problems with the input itself; --strict makes each of them fatal (dedup, balancing and --min_quality are not).
INPUT_PROBLEMS = {"invalid_json", "invalid_utf8", "empty_file", "unreadable_file", "unsupported_shape",
                  "missing_question", "missing_answer", "wrong_type_question", "wrong_type_answer",
                  "empty_question", "empty_answer", "control_characters", "too_long", "pretraining_text",
                  "unreadable_table"}
# Reasons that count towards "many records of a file dropped": the input problems plus unusable content.
PROBLEM_DROPS = INPUT_PROBLEMS | {"placeholder_text", "missing_media"}
DROPPED_SHARE_WARNING = 0.05  # more than this share of a file's records dropped is a problem the user must see
SURVEY_RECORDS = 500  # records per file the survey reads and validates; the rest of a file is checked at its end
COLUMN_FIELDS = ("question", "answer", "context", "domain", "id")  # what --columns may name


def skip_hint(path: Path) -> tuple[str | None, str]:
    """``(converter module or None, what to do)`` for a file preparation does not read."""
    name, suffix = path.name.lower(), path.suffix.lower()
    if suffix == ".xml":
        return "convert_stackexchange", ("a StackExchange dump? convert it: python -m "
                                         "src.data_processing.convert_stackexchange (documentation/DATASETS.md)")
    if suffix in (".md", ".markdown", ".txt"):
        return "convert_faq", ("a Markdown or plain-text FAQ? convert it: python -m src.data_processing.convert_faq; "
                               "notes for retrieval go in knowledge/ instead")
    if name.endswith((".gz", ".zip", ".bz2", ".xz", ".tar", ".7z")):
        return None, "a packed file: unpack it into the folder (only .json.gz and .jsonl.gz are read packed)"
    what = f"{suffix} files" if suffix else "files without an extension"
    return None, (f"{what} are not read: save it as JSON, JSON Lines, CSV, TSV or Parquet "
                  "(documentation/DATASETS.md), or move it out of the folder")


class ColumnMap:
    """``--columns``: other names of a record's fields, for every file or per file-name pattern.

    ``question=q,answer=a`` maps those columns in every file; a JSON file holds either that as an object
    (``{"question": "q", "answer": "a"}``) or, like ``--domain_map``, file-name patterns to such objects
    (``{"faq_*.csv": {"question": "Frage", "answer": "Antwort"}}``; first matching pattern wins). Names match
    case-insensitively (table columns are lower-cased); a field the item already has is never overwritten.
    """

    def __init__(self, everywhere: dict[str, str] | None = None,
                 per_pattern: dict[str, dict[str, str]] | None = None) -> None:
        self.everywhere = dict(everywhere or {})
        self.per_pattern = dict(per_pattern or {})
        self._by_file: dict[str, dict[str, str]] = {}

    @staticmethod
    def _checked(mapping: object, where: str) -> dict[str, str]:
        if not isinstance(mapping, dict) or not mapping:
            raise UserError(f"--columns {where}: expected field=column pairs, e.g. question=q,answer=a")
        out = {}
        for field, column in mapping.items():
            if field not in COLUMN_FIELDS:
                raise UserError(f"--columns {where}: {field!r} is not a field Theta reads; use one of "
                                f"{', '.join(COLUMN_FIELDS)} (e.g. question=q,answer=a)")
            if not isinstance(column, str) or not column.strip():
                raise UserError(f"--columns {where}: the column for {field!r} must be a name, e.g. {field}=q")
            out[field] = column.strip()
        return out

    @classmethod
    def parse(cls, spec: str | None) -> "ColumnMap | None":
        """The map of a ``--columns`` value (inline pairs or a JSON file), None for no value."""
        if spec is None or not str(spec).strip():
            return None
        spec = str(spec).strip()
        path = Path(spec)
        if path.suffix.lower() == ".json" or (path.is_file() and "=" not in spec):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except OSError as err:
                raise UserError(f"--columns {spec}: cannot read the file ({err.strerror})") from err
            except json.JSONDecodeError as err:
                raise UserError(f"--columns {spec} is not valid JSON (line {err.lineno}, column {err.colno}: "
                                f"{err.msg})") from err
            if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
                return cls(per_pattern={k: cls._checked(v, f"{spec}, pattern {k!r}") for k, v in data.items()})
            return cls(everywhere=cls._checked(data, spec))
        pairs = {}
        for part in spec.split(","):
            field, sep, column = part.partition("=")
            if not sep:
                raise UserError(f"--columns {spec}: {part.strip()!r} is not field=column; write e.g. "
                                "question=q,answer=a, or give a JSON file")
            pairs[field.strip()] = column
        return cls(everywhere=cls._checked(pairs, spec))

    def for_file(self, rel_path: str) -> dict[str, str]:
        """The field -> column map that applies to a file (empty when none does)."""
        cached = self._by_file.get(rel_path)
        if cached is None:
            cached = self.everywhere
            name = PurePosixPath(rel_path).name
            for pattern, mapping in self.per_pattern.items():
                if fnmatch.fnmatch(rel_path, pattern) or fnmatch.fnmatch(name, pattern):
                    cached = mapping
                    break
            self._by_file[rel_path] = cached
        return cached

    @staticmethod
    def apply(item: dict, mapping: dict[str, str]) -> dict:
        """``item`` with its mapped columns renamed to our fields (a copy when anything changes)."""
        out = None
        lower = None
        for field, column in mapping.items():
            if field in item:
                continue
            key = column if column in item else None
            if key is None:
                lower = lower or {str(k).lower(): k for k in item}
                key = lower.get(column.lower())
            if key is None:
                continue
            out = out if out is not None else dict(item)
            out[field] = out.pop(key)
        return out if out is not None else item

    def describe(self) -> str:
        parts = [",".join(f"{f}={c}" for f, c in self.everywhere.items())] if self.everywhere else []
        parts += [f"{p}: " + ",".join(f"{f}={c}" for f, c in m.items()) for p, m in self.per_pattern.items()]
        return "; ".join(parts)


class DropLog:
    """Counts of dropped records per reason with the first few examples of each, per-file counts, and notes
    (things set aside that are not records: rejected replies, tool turns kept as context...)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = defaultdict(list)
        self.per_file: dict[str, Counter] = defaultdict(Counter)
        self.notes: Counter = Counter()
        self.strict = False
        self._first: dict[tuple[str, str], dict] = {}  # (file, reason) -> its first example

    def drop(self, reason: str, source: str, index: int | None, detail: str = "", line: int | None = None) -> None:
        if self.strict and reason in INPUT_PROBLEMS:
            where = f"{source}" + (f", record {index}" if index is not None else "") + \
                    (f", line {line}" if line is not None and "line " not in detail else "")
            raise UserError(f"--strict: {reason} in {where}: {detail}")
        self.counts[reason] += 1
        self.per_file[source][reason] += 1
        first = (source, reason) not in self._first
        if first or len(self.examples[reason]) < DROP_EXAMPLES:
            ex = {"source": source, "index": index, "detail": detail[:200]}
            if line is not None:
                ex["line"] = line
            if len(self.examples[reason]) < DROP_EXAMPLES:
                self.examples[reason].append(ex)
            if first:
                self._first[(source, reason)] = ex

    def file_examples(self, source: str) -> dict[str, list[dict]]:
        """reason -> [the first example of that reason in this file]."""
        return {reason: [ex] for (src, reason), ex in self._first.items() if src == source}

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples[reason]} for reason, n in self.counts.most_common()}


def dataset_files(datasets_dir: Path, exclude: Iterable[Path] = (), skipped: list[dict] | None = None,
                  sources: DataSources | None = None) -> list[Path]:
    """The data files a run reads under ``datasets_dir`` (``src/utils/data_layout.py`` decides, the sample
    included or not: ``sources``, resolved here when not given), sorted, without ``exclude``. The files no reader
    takes are appended to ``skipped`` as ``{"file", "converter", "hint"}``."""
    sources = sources or resolve_sources(datasets_dir)
    excluded = {Path(p).resolve() for p in exclude}
    if skipped is not None:
        for path in sources.other_files:
            converter, hint = skip_hint(path)
            skipped.append({"file": path.relative_to(datasets_dir).as_posix(), "converter": converter, "hint": hint})
    return [p for p in sources.files if p.resolve() not in excluded]


def iter_raw_items(path: Path) -> Iterator[Item]:
    """Items of one file, streamed; open errors become one fatal item."""
    name = path.name.lower()
    if path.suffix.lower() in TABLE_SUFFIXES:
        yield from iter_table_items(path)
        return
    try:
        fh = gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")
    except OSError as err:
        yield Item(None, 1, error=f"cannot read: {err.strerror}", reason="unreadable_file", fatal=True)
        return
    with fh:
        try:
            if name.endswith((".jsonl", ".jsonl.gz")):
                yield from iter_jsonl_items(fh)
            else:
                yield from iter_json_items(fh)
        except (OSError, EOFError) as err:  # a broken gzip stream
            yield Item(None, 1, error=f"cannot read: {err}", reason="unreadable_file", fatal=True)


def _quiet_datasets() -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("datasets", "fsspec", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def iter_table_items(path: Path) -> Iterator[Item]:
    """Rows of a CSV, TSV or Parquet file through ``datasets`` (streaming): one dict per row, column names
    lower-cased (``Question`` -> ``question``). Index is the row number, line the row number + 2 for CSV
    (after the header)."""
    _quiet_datasets()
    import datasets

    builder = TABLE_SUFFIXES[path.suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **kwargs)
        for i, row in enumerate(ds):
            yield Item(i, i + 2 if builder == "csv" else i + 1, {str(k).strip().lower(): v for k, v in row.items()})
    except Exception as err:  # the datasets library raises many types for a malformed table
        yield Item(None, 1, error=f"cannot read the table: {type(err).__name__}: {str(err)[:200]}",
                   reason="unreadable_table", fatal=True)


def _split_name(spec: str) -> tuple[str, str]:
    """``NAME[:SPLIT]``; a Windows drive letter (``C:\\data``) is not a split."""
    name, sep, split = spec.rpartition(":")
    if not sep or not name or "/" in split or "\\" in split or (len(name) == 1 and name.isalpha()):
        return spec, "train"
    return name, split or "train"


def iter_hf_items(spec: str) -> Iterator[Item]:
    """Rows of ``--hf_dataset NAME[:SPLIT]``: a folder written by ``Dataset.save_to_disk``, a local dataset folder
    or file that ``datasets.load_dataset`` reads, or a hub name (needs the network or the local cache)."""
    _quiet_datasets()
    import datasets

    name, split = _split_name(spec)
    path = Path(name)
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"--hf_dataset {spec}: no split {split!r} in {path} (splits: {sorted(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except UserError:
        raise
    except Exception as err:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("the hub cannot be reached offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set): download it "
                "once online, or save it with Dataset.save_to_disk(folder) and pass the folder"
                if offline and not path.exists() else "check the name, the split and the files")
        raise UserError(f"--hf_dataset {spec}: cannot load it ({type(err).__name__}: {str(err)[:200]}); "
                        f"{hint}") from err
    i = -1
    try:
        for i, row in enumerate(ds):
            yield Item(i, i + 1, {str(k).strip().lower(): v for k, v in row.items()})
    except Exception as err:  # a streamed file that breaks half-way: what was read stays, the rest is reported
        yield Item(i + 1, i + 2, error=f"cannot read further: {type(err).__name__}: {str(err)[:200]}",
                   reason="unreadable_table", fatal=True)


def iter_item_records(items: Iterable[Item], rel: str, drops: DropLog, stats: dict,
                      max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, tool_calls: str = "keep",
                      columns: ColumnMap | None = None) -> Iterator[dict]:
    """Records of a stream of items, each with ``source``, ``source_index`` and ``source_line``."""
    stats.setdefault("items", 0)
    stats.setdefault("records", 0)
    stats.setdefault("unusable_items", 0)  # items that gave no record: read errors and shapes with a drop reason
    mapping = columns.for_file(rel) if columns is not None else {}
    for item in items:
        if item.error is not None:
            stats["unusable_items"] += 1
            drops.drop(item.reason, rel, item.index, item.error, item.line)
            if item.fatal:
                stats["error"] = item.error
                stats["error_reason"] = item.reason
            continue
        stats["items"] += 1
        value = ColumnMap.apply(item.value, mapping) if mapping and isinstance(item.value, dict) else item.value
        result = shape_item(value, max_history_turns, tool_calls)
        if result.notes:
            drops.notes.update(result.notes)
        if result.reason is not None:
            stats["unusable_items"] += 1
            drops.drop(result.reason, rel, item.index, result.detail, item.line)
            continue
        for rec in result.records:
            stats["records"] += 1
            rec = dict(rec)
            rec["source"], rec["source_index"], rec["source_line"] = rel, item.index, item.line
            yield rec


def iter_file_records(path: Path, rel: str, drops: DropLog, file_stats: dict | None = None,
                      max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, tool_calls: str = "keep",
                      columns: ColumnMap | None = None) -> Iterator[dict]:
    """Records of one file (see ``iter_item_records``)."""
    stats = file_stats if file_stats is not None else {}
    yield from iter_item_records(iter_raw_items(path), rel, drops, stats, max_history_turns, tool_calls, columns)


def iter_all_datasets(datasets_dir: Path, exclude: Iterable[Path] = (), drops: DropLog | None = None,
                      per_file: dict | None = None, progress: bool = False, skipped: list | None = None,
                      max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, tool_calls: str = "keep",
                      hf_dataset: str | None = None, sources: DataSources | None = None,
                      columns: ColumnMap | None = None) -> Iterator[dict]:
    """Stream every record of every input file (see ``dataset_files``), then of ``hf_dataset``, with a progress
    bar on a terminal."""
    drops = drops if drops is not None else DropLog()
    per_file = per_file if per_file is not None else {}
    files = dataset_files(Path(datasets_dir), exclude, skipped, sources)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="file", desc="loading", dynamic_ncols=True)
    try:
        for path in files:
            rel = path.relative_to(datasets_dir).as_posix()
            per_file[rel] = {}
            if bar is not None:
                bar.set_description(f"loading {rel[-30:]}")
            yield from iter_file_records(path, rel, drops, per_file[rel], max_history_turns, tool_calls, columns)
            if bar is not None:
                bar.update(1)
        if hf_dataset:
            rel = f"hf:{hf_dataset}"
            per_file[rel] = {}
            yield from iter_item_records(iter_hf_items(hf_dataset), rel, drops, per_file[rel], max_history_turns,
                                         tool_calls, columns)
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Problems the user must see before the night
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataProblem:
    """One thing in the data folder that would surprise the user, in words.

    ``file``: the path under the data folder ("" for the folder itself); ``kind``: one of ``PROBLEM_KINDS``;
    ``message``: what is wrong; ``fix``: what to do; ``fatal``: the run cannot start (an empty folder) even
    without ``--strict``. ``str(problem)`` is the line to show.
    """
    file: str
    kind: str
    message: str
    fix: str
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.file or 'the data folder'}: {self.message}; fix: {self.fix}"

    def as_dict(self) -> dict:
        return asdict(self)


PROBLEM_KINDS = {
    "empty_datasets": "no data file at all (fatal)",
    "unreadable_file": "a file that cannot be read (or breaks off): what comes after the break is lost",
    "nothing_kept": "a file from which no record would be kept",
    "many_dropped": f"more than {DROPPED_SHARE_WARNING:.0%} of a file's records dropped",
    "not_read": "a file in the folder that no reader takes",
}
# What to do when every record of a file went for one reason.
REASON_FIXES = {
    "unsupported_shape": "name the question and answer fields: --columns question=<field>,answer=<field> (the "
                         "drop line lists the file's fields), or see documentation/DATASETS.md for the shapes",
    "missing_answer": "the file holds prompts without answers: add the answers (or completions), or move the "
                      "file out of the folder",
    "missing_question": "add the questions (or prompts), or move the file out of the folder",
    "pretraining_text": "give question/answer fields or a chat shape (documentation/DATASETS.md)",
    "no_answered_turn": "give each conversation an assistant reply (with weight 1, if it has weights)",
    "invalid_utf8": "save the file as UTF-8",
}


def _examples_detail(examples: list[dict]) -> str:
    ex = examples[0] if examples else {}
    detail = ex.get("detail", "")
    where = f"record {ex['index']}" if ex.get("index") is not None else ""
    return f" ({', '.join(x for x in (where, detail) if x)})" if (where or detail) else ""


def file_problems(rel: str, file_stats: dict, dropped: dict[str, int], examples: dict[str, list],
                  valid: int, partial: bool = False) -> list[DataProblem]:
    """The problems of one read file: it could not be read (or broke off), nothing would be kept from it, or more
    than ``DROPPED_SHARE_WARNING`` of its records were dropped as bad input. ``dropped``: reason -> count for the
    file; ``examples``: reason -> first examples; ``valid``: its records that passed validation; ``partial``: only
    the first records of the file were read (the survey)."""
    problems = []
    error = file_stats.get("error")
    read_note = " (in the first records read)" if partial else ""
    if error is not None:
        reason = file_stats.get("error_reason", "")
        if reason == "empty_file":
            problems.append(DataProblem(rel, "unreadable_file", "the file is empty",
                                        "export it again, or remove it"))
        elif reason == "invalid_json":
            got = f"; the {valid} records before the break are read, the rest is lost" if valid and not partial \
                else ""
            problems.append(DataProblem(rel, "unreadable_file", f"the JSON breaks off or is invalid at {error}{got}",
                                        "export the file again (a cut-off download or export is the usual "
                                        "cause), or repair it at that line"))
        else:
            problems.append(DataProblem(rel, "unreadable_file", error,
                                        "check the file opens and is in one of the formats of "
                                        "documentation/DATASETS.md"))
    dropped = Counter(dropped)
    if error is not None and dropped.get(file_stats.get("error_reason")):
        dropped[file_stats["error_reason"]] -= 1  # the one item that ended the file is not a record
    dropped = +dropped
    bad = {r: n for r, n in dropped.items() if r in PROBLEM_DROPS}
    total = valid + sum(dropped.values())
    if valid == 0 and (total or error is None):
        if total:
            reason, n = max(dropped.items(), key=lambda rn: (rn[1], rn[0]))
            detail = _examples_detail(examples.get(reason))
            fix = REASON_FIXES.get(reason, "see the drop reasons in enhanced_data_stats.json and "
                                           "documentation/DATASETS.md for the accepted shapes")
            if "--columns question=" in detail:  # the reader guessed the pair: say it as the fix
                hint = detail[detail.index("--columns question="):].rstrip(")")
                detail = detail[:detail.index("; if these")] + ")"
                fix = f"if those are the question and the answer, name them: {hint}"
            why = (f"the first {total} items read were all dropped" if partial else
                   f"all its {total} items were dropped") + (f" as {reason}" if n == total else
                                                           f", most as {reason} ({n})") + detail
        else:
            why, fix = "it holds no item", "remove it, or export it again"
        problems.append(DataProblem(rel, "nothing_kept", f"gives no record: {why}", fix))
    elif total and sum(bad.values()) / total > DROPPED_SHARE_WARNING:
        share = sum(bad.values()) / total
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(bad.items(), key=lambda rn: -rn[1]))
        top = max(bad, key=bad.get)
        problems.append(DataProblem(rel, "many_dropped",
                                    f"{sum(bad.values())} of {total} records ({share:.0%}) dropped{read_note}: "
                                    f"{reasons}{_examples_detail(examples.get(top))}",
                                    REASON_FIXES.get(top, "fix or remove those records (their first examples are "
                                                          "in enhanced_data_stats.json under dropped)")))
    return problems


def empty_problem(datasets_dir: Path) -> DataProblem:
    return DataProblem("", "empty_datasets", f"{datasets_dir} holds no data file (JSON, JSON Lines, CSV, TSV or "
                       "Parquet) and no sample to fall back on",
                       f"put your question-answer files in {datasets_dir} (documentation/DATASETS.md lists the "
                       "formats)", fatal=True)


def not_read_problems(skipped: list[dict]) -> list[DataProblem]:
    return [DataProblem(s["file"], "not_read", "not read by data preparation", s["hint"]) for s in skipped]


def _breaks_off(path: Path) -> str | None:
    """Where a JSON or JSON Lines file (not gzipped) whose start was read ends in the middle of a value, judged
    from its last 64 KiB; None when its end looks whole."""
    name = path.name.lower()
    if not name.endswith((".json", ".jsonl")):
        return None  # gzipped files would have to be read whole; tables are read by the datasets library
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read().rstrip()
    except OSError as err:
        return f"cannot read its end: {err.strerror}"
    if not tail:
        return None
    if name.endswith(".jsonl"):
        last = tail.rsplit(b"\n", 1)[-1]
        try:
            json.loads(last.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            return f"its last line: {err.msg}"
        return None
    return None if tail[-1:] in (b"]", b"}") else "its end (the file stops in the middle of a record)"


def survey_datasets(datasets_dir: Path | str, include_sample: bool = False, columns: ColumnMap | None = None,
                    max_records: int = SURVEY_RECORDS, max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS,
                    tool_calls: str = "keep", max_chars: int | None = None) -> list[DataProblem]:
    """What in ``datasets_dir`` the user must see before the night, as a list of ``DataProblem`` (empty: all
    well). The stable API the pre-flight, the banner and the start email use.

    Reads the files a run would read (the sample when the folder holds no data of the user's own, see
    ``src/utils/data_layout.py``) with the readers and the validation data preparation uses, so they agree: the
    first ``max_records`` records of each file are read and validated, and a JSON or JSON Lines file read only
    in part is checked at its end (a cut-off export). Problems (``PROBLEM_KINDS``): ``empty_datasets`` (fatal:
    no data and no sample), ``unreadable_file``, ``nothing_kept``, ``many_dropped`` (more than
    ``DROPPED_SHARE_WARNING`` of the records read) and ``not_read`` (a file no reader takes). Preparation records
    the same problems, counted over whole files, under ``problems`` in enhanced_data_stats.json, and ``--strict``
    makes them fatal. Cost: a few hundred records per file, well under a second for a folder of ordinary files.
    """
    from src.data_processing.validation import DEFAULT_MAX_CHARS, validate_record

    datasets_dir = Path(datasets_dir)
    if not datasets_dir.is_dir():
        return [DataProblem("", "empty_datasets", f"{datasets_dir} does not exist or is not a folder",
                            "create it and put your question-answer files in it", fatal=True)]
    sources = resolve_sources(datasets_dir, include_sample)
    if sources.empty:
        return [empty_problem(datasets_dir)] + not_read_problems(_skipped(datasets_dir, sources))
    problems: list[DataProblem] = []
    for path in sources.files:
        rel = path.relative_to(datasets_dir).as_posix()
        drops, stats, valid, cut = DropLog(), {}, 0, []
        items = iter_raw_items(path)
        try:
            for rec in iter_item_records(_first(items, max_records, cut), rel, drops, stats, max_history_turns,
                                         tool_calls, columns):
                if validate_record(rec, drops, max_chars or DEFAULT_MAX_CHARS) is not None:
                    valid += 1
        finally:
            items.close()  # the file handle of a file read in part
        if cut and "error" not in stats:
            where = _breaks_off(path)
            if where is not None:
                stats["error"], stats["error_reason"] = where, "invalid_json"
        partial = bool(cut)
        problems.extend(file_problems(rel, stats, dict(drops.per_file.get(rel, {})), drops.examples, valid,
                                      partial))
    return problems + not_read_problems(_skipped(datasets_dir, sources))


def _first(items: Iterator[Item], n: int, cut: list) -> Iterator[Item]:
    """The first ``n`` items; ``cut`` gets an entry when the stream had more."""
    for k, item in enumerate(items):
        if k >= n:
            cut.append(k)
            return
        yield item


def _skipped(datasets_dir: Path, sources: DataSources) -> list[dict]:
    skipped: list[dict] = []
    dataset_files(datasets_dir, (), skipped, sources)
    return skipped
