"""Convert Alpaca-style instruction data (``instruction`` / ``input`` / ``output``, JSON or JSON Lines) into Theta
records: the question is the instruction, followed by the input after a blank line when there is one; ``system``
and ``history`` (earlier [question, answer] pairs, at most --max_history_turns) become ``context``, as in data
preparation (src/data_processing/record_shapes.py).

    python src/data_processing/convert_alpaca.py alpaca_data.json --output Datasets/alpaca.json
    python -m src.data_processing.convert_alpaca data.jsonl --output Datasets/alpaca.json --domain sql
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, check_input, check_output_path, finish, make_record, \
    read_items
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS, shape_item
from src.utils.common import run_entry_point, setup_logging


def convert_alpaca(path: Path, domain: str | None = None, id_prefix: str | None = None,
                   skipped: Counter | None = None, max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS) -> list[dict]:
    skipped = skipped if skipped is not None else Counter()
    prefix = id_prefix or path.stem
    records = []
    for index, item in read_items(path, skipped):
        if not isinstance(item, dict) or "instruction" not in item or "output" not in item:
            skipped["not_alpaca"] += 1
            continue
        instruction, extra, output = item["instruction"], item.get("input") or "", item["output"]
        if not all(isinstance(x, str) for x in (instruction, extra, output)):
            skipped["not_text"] += 1
            continue
        if not instruction.strip() or not output.strip():
            skipped["empty"] += 1
            continue
        rec = shape_item(item, max_history_turns).records[0]
        records.append(make_record(f"{prefix}-{index:06d}", rec["question"], output, domain or item.get("domain"),
                                   path.name, context=rec.get("context")))
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = base_parser("Convert Alpaca instruction/input/output data to Theta records.",
                       "Alpaca JSON list or JSON Lines file").parse_args(argv)
    check_output_path(args.output)
    check_input(args.input, "an Alpaca JSON / JSON Lines file", "convert_alpaca", {"json"})
    skipped = Counter()
    records = convert_alpaca(args.input, args.domain, args.id_prefix, skipped, args.max_history_turns)
    return finish(records, skipped, args.output, "Alpaca")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
