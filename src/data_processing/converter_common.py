"""Shared parts of the converters (convert_*.py): reading JSON or JSON Lines, the common flags, checking the
input (missing, a folder, another format: which one and which converter reads it) and the output (a folder),
writing our record list atomically with the user's umask, and the per-reason skip counts every converter reports.

    from src.data_processing.converter_common import base_parser, read_items, finish
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

from src.data_processing.json_stream import iter_file_items
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS
from src.utils.common import FlagParser, UserError, atomic_write_json

logger = logging.getLogger(__name__)


# Which converter reads a JSON item with these keys (first match wins), for "wrong converter" errors.
SHAPE_CONVERTERS = (
    ({"message_id", "replies"}, "an OASST message tree", "convert_oasst"),
    ({"message_id", "parent_id"}, "OASST flat messages", "convert_oasst"),
    ({"instruction", "output"}, "Alpaca records", "convert_alpaca"),
    ({"instruction", "response"}, "Dolly records", "prepare_data_for_training (reads them as they are)"),
    ({"conversations"}, "ShareGPT chats", "convert_chat"),
    ({"messages"}, "OpenAI messages chats", "convert_chat"),
    ({"title", "answers"}, "StackExchange questions", "convert_stackexchange"),
    ({"items"}, "a StackExchange API page", "convert_stackexchange"),
    ({"prompt"}, "prompt / completion or preference records", "prepare_data_for_training (reads them as they are)"),
    ({"question", "answer"}, "Theta records", "nothing: put the file in Datasets/ as it is"),
)


def check_output_path(path: Path, flag: str = "--output") -> None:
    """A clear error, before any work, for an output path that cannot be a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'records.json'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            break


def write_json_output(path: Path, data, indent: int | None = 2) -> Path:
    """``atomic_write_json`` (atomic, with the umask mode) after the output checks."""
    check_output_path(path)
    return atomic_write_json(path, data, indent=indent)


def _head(path: Path, n: int = 65536) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def describe_input(path: Path) -> tuple[str, str | None]:
    """``(what the file looks like, the converter that reads it)`` from its first bytes: JSON shapes by the keys
    of the first item, XML, Parquet, CSV, Markdown / plain text."""
    head = _head(path)
    if head.startswith(b"PAR1"):
        return "a Parquet table", "prepare_data_for_training (reads .parquet in Datasets/)"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text.startswith("<"):
        return "XML", "convert_stackexchange (Posts.xml)"
    if text.startswith(("{", "[")):
        first = _first_json_item(text)
        if isinstance(first, dict):
            for keys, what, converter in SHAPE_CONVERTERS:
                if keys <= set(first):
                    return f"JSON ({what})", converter
            return f"JSON (keys {sorted(first)[:6]})", None
        return "JSON", None
    if path.suffix.lower() in (".csv", ".tsv"):
        return "a CSV/TSV table", "prepare_data_for_training (reads .csv/.tsv in Datasets/)"
    return "Markdown or plain text", "convert_faq"


def _first_json_item(text: str):
    line = text.split("\n", 1)[0]
    for candidate in (line, text):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        return value[0] if isinstance(value, list) and value else value
    decoder = json.JSONDecoder()  # a cut-off array: decode its first element
    body = text.lstrip()[1:].lstrip() if text.lstrip().startswith("[") else text
    for key in ("qa_pairs", "records", "data", "examples"):
        if body.startswith("{") and f'"{key}"' in body[:200]:
            body = body[body.index("[", body.index(f'"{key}"')) + 1:].lstrip()
            break
    try:
        value, _ = decoder.raw_decode(body)
        return value
    except json.JSONDecodeError:
        return None


def check_input(path: Path, reads: str, converter: str, formats: set[str]) -> None:
    """Missing file, a folder, or another format: a UserError saying what the file looks like and which converter
    reads it. ``formats`` are the kinds this converter takes (``json``, ``xml``, ``text``); ``reads`` names them."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"input {path} is a folder; give the {reads} file")
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    what, reader = describe_input(path)
    kind = {"J": "json", "X": "xml", "M": "text"}.get(what[0], "table")
    wrong_shape = kind == "json" and reader is not None and reader.startswith("convert_") and \
        reader.split(" ")[0] != converter
    if kind not in formats or wrong_shape:
        hint = f"; {reader} reads it" if reader else "; see documentation/DATASETS.md"
        raise UserError(f"{path} looks like {what}, not {reads}{hint}")


def base_parser(description: str, input_help: str) -> argparse.ArgumentParser:
    p = FlagParser(description=description)
    p.add_argument("input", type=Path, help=input_help)
    p.add_argument("--output", type=Path, required=True,
                   help="our JSON record list, e.g. Datasets/<name>.json (written atomically)")
    p.add_argument("--domain", type=str, default=None,
                   help="domain of every record (default: none, so preparation infers and marks it)")
    p.add_argument("--id_prefix", type=str, default=None, help="prefix of the record ids (default: input file stem)")
    p.add_argument("--max_history_turns", "--context_turns", dest="max_history_turns", type=int,
                   default=DEFAULT_MAX_HISTORY_TURNS,
                   help="earlier exchanges kept as each turn's context (0 = none), the same default as "
                        "prepare_data_for_training")
    return p


def read_items(path: Path, skipped: Counter) -> Iterator[tuple[int, object]]:
    """``(index, value)`` of a JSON / JSON Lines file; unreadable parts counted in ``skipped``."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    for item in iter_file_items(path):
        if item.error is not None:
            skipped[item.reason] += 1
            logger.warning("%s: %s", path, item.error)
            continue
        yield item.index, item.value


def make_record(rid: str, question: str, answer: str, domain: str | None, source: str, **extra) -> dict:
    rec = {"id": rid, "question": question.strip(), "answer": answer.strip()}
    if domain:
        rec["domain"] = domain
    rec["source"] = source
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def finish(records: list[dict], skipped: Counter, output: Path, what: str) -> int:
    """Write the records, log what was converted and skipped; no record at all is a user error."""
    check_output_path(output)
    if not records:
        raise UserError(f"no {what} record could be converted ({dict(skipped) or 'empty input'})")
    write_json_output(output, records)
    logger.info("converted %d records -> %s", len(records), output)
    if skipped:
        logger.warning("skipped: %s", ", ".join(f"{k} {v}" for k, v in skipped.most_common()))
    return 0
