"""Shared parts of the converters (convert_*.py): reading JSON or JSON Lines, the common flags, writing our
record list atomically, and the per-reason skip counts every converter reports.

    from src.data_processing.converter_common import base_parser, read_items, finish
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

from src.data_processing.json_stream import iter_file_items
from src.utils.common import UserError, atomic_write_json

logger = logging.getLogger(__name__)


def base_parser(description: str, input_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("input", type=Path, help=input_help)
    p.add_argument("--output", type=Path, required=True,
                   help="our JSON record list, e.g. Datasets/<name>.json (written atomically)")
    p.add_argument("--domain", type=str, default=None,
                   help="domain of every record (default: none, so preparation infers and marks it)")
    p.add_argument("--id_prefix", type=str, default=None, help="prefix of the record ids (default: input file stem)")
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
    if not records:
        raise UserError(f"no {what} record could be converted ({dict(skipped) or 'empty input'})")
    atomic_write_json(output, records)
    logger.info("converted %d records -> %s", len(records), output)
    if skipped:
        logger.warning("skipped: %s", ", ".join(f"{k} {v}" for k, v in skipped.most_common()))
    return 0
