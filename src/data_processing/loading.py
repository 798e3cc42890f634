"""Loading every input of data preparation: the files under the datasets folder (JSON, JSON Lines, gzipped ones,
CSV, TSV, Parquet) and a Hugging Face dataset, each item mapped to records by ``record_shapes.shape_item``.

    from src.data_processing.loading import DropLog, dataset_files, iter_all_datasets
    drops = DropLog()
    records = list(iter_all_datasets(Path("Datasets"), drops=drops))

Every item ends as records or as a counted drop with its file, index and reason; files that no reader takes are
listed with the converter that reads them (``Posts.xml`` -> convert_stackexchange, ``*.md`` -> convert_faq).
CSV, TSV and Parquet go through the ``datasets`` library in streaming mode (no cache copy of the file).
"""

from __future__ import annotations

import gzip
import logging
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

from src.data_processing.json_stream import Item, iter_json_items, iter_jsonl_items
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS, shape_item
from src.utils.common import UserError

logger = logging.getLogger(__name__)

OUTPUT_NAMES = {"enhanced_training_data.json", "enhanced_data_stats.json"}
SKIPPED_DIRS = {"knowledge", "knowledge_base"}  # the knowledge folder and the knowledge step's outputs
DROP_EXAMPLES = 3  # first examples kept per drop reason in the stats
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
# Problems with the input itself; --strict makes each of them fatal (dedup, balancing and --min_quality are not).
INPUT_PROBLEMS = {"invalid_json", "invalid_utf8", "empty_file", "unreadable_file", "unsupported_shape",
                  "missing_question", "missing_answer", "wrong_type_question", "wrong_type_answer",
                  "empty_question", "empty_answer", "control_characters", "too_long", "pretraining_text",
                  "unreadable_table"}


def converter_for(path: Path) -> str:
    """The converter that reads a file prepare does not (for the skipped-files list)."""
    name, suffix = path.name.lower(), path.suffix.lower()
    if suffix == ".xml":
        return "convert_stackexchange (StackExchange Posts.xml)"
    if suffix in (".md", ".markdown", ".txt"):
        return "convert_faq (Markdown / plain-text FAQ)"
    if name.endswith((".gz", ".zip", ".bz2", ".xz", ".tar")):
        return "none: unpack it first (only .json.gz and .jsonl.gz are read packed)"
    return "none: see documentation/DATASETS.md for the accepted formats"


class DropLog:
    """Counts of dropped records per reason with the first few examples of each, per-file counts, and notes
    (things set aside that are not records: rejected replies, tool turns kept as context...)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list] = defaultdict(list)
        self.per_file: dict[str, Counter] = defaultdict(Counter)
        self.notes: Counter = Counter()
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


def _readable(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(JSON_SUFFIXES) or path.suffix.lower() in TABLE_SUFFIXES


def dataset_files(datasets_dir: Path, exclude: Iterable[Path] = (),
                  skipped: list[dict] | None = None) -> list[Path]:
    """Input files under ``datasets_dir``, sorted: JSON / JSON Lines (also gzipped), CSV, TSV, Parquet; not our
    outputs, not ``exclude``, nothing under ``knowledge/``, ``knowledge_base/`` or a hidden folder. Other files
    are appended to ``skipped`` as ``{"file", "converter"}``."""
    excluded = {Path(p).resolve() for p in exclude}
    files = []
    for path in sorted(Path(datasets_dir).rglob("*")):
        rel = path.relative_to(datasets_dir)
        if not path.is_file() or path.name in OUTPUT_NAMES:
            continue
        if rel.parts[0] in SKIPPED_DIRS or any(part.startswith(".") for part in rel.parts):
            continue
        if path.resolve() in excluded:
            continue
        if _readable(path):
            files.append(path)
        elif skipped is not None:
            skipped.append({"file": rel.as_posix(), "converter": converter_for(path)})
    return files


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
                      max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, tool_calls: str = "keep"
                      ) -> Iterator[dict]:
    """Records of a stream of items, each with ``source``, ``source_index`` and ``source_line``."""
    stats.setdefault("items", 0)
    stats.setdefault("records", 0)
    for item in items:
        if item.error is not None:
            drops.drop(item.reason, rel, item.index, item.error, item.line)
            if item.fatal:
                stats["error"] = item.error
            continue
        stats["items"] += 1
        result = shape_item(item.value, max_history_turns, tool_calls)
        if result.notes:
            drops.notes.update(result.notes)
        if result.reason is not None:
            drops.drop(result.reason, rel, item.index, result.detail, item.line)
            continue
        for rec in result.records:
            stats["records"] += 1
            rec = dict(rec)
            rec["source"], rec["source_index"], rec["source_line"] = rel, item.index, item.line
            yield rec


def iter_file_records(path: Path, rel: str, drops: DropLog, file_stats: dict | None = None,
                      max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, tool_calls: str = "keep"
                      ) -> Iterator[dict]:
    """Records of one file (see ``iter_item_records``)."""
    stats = file_stats if file_stats is not None else {}
    yield from iter_item_records(iter_raw_items(path), rel, drops, stats, max_history_turns, tool_calls)


def iter_all_datasets(datasets_dir: Path, exclude: Iterable[Path] = (), drops: DropLog | None = None,
                      per_file: dict | None = None, progress: bool = False, skipped: list | None = None,
                      max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, tool_calls: str = "keep",
                      hf_dataset: str | None = None) -> Iterator[dict]:
    """Stream every record of every input file (see ``dataset_files``), then of ``hf_dataset``, with a progress
    bar on a terminal."""
    drops = drops if drops is not None else DropLog()
    per_file = per_file if per_file is not None else {}
    files = dataset_files(Path(datasets_dir), exclude, skipped)
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
            yield from iter_file_records(path, rel, drops, per_file[rel], max_history_turns, tool_calls)
            if bar is not None:
                bar.update(1)
        if hf_dataset:
            rel = f"hf:{hf_dataset}"
            per_file[rel] = {}
            yield from iter_item_records(iter_hf_items(hf_dataset), rel, drops, per_file[rel], max_history_turns,
                                         tool_calls)
    finally:
        if bar is not None:
            bar.close()


def load_all_datasets(datasets_dir: Path, exclude: Iterable[Path] = (), drops: DropLog | None = None,
                      per_file: dict | None = None, **kwargs) -> list[dict]:
    """Every record of every input as a list (``iter_all_datasets`` streams the same; same keyword arguments)."""
    return list(iter_all_datasets(datasets_dir, exclude, drops, per_file, **kwargs))
