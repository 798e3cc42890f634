"""Convert chat transcripts into Theta records: ShareGPT (``conversations`` of ``{from, value}`` with
human/gpt) and OpenAI ``messages`` JSON Lines (``{role, content}``, content a string or a list of text parts).

Each assistant reply becomes one record with ``turn`` (0, 1, ...), read by the same code as data preparation
(src/data_processing/record_shapes.py): the system message and the --max_history_turns exchanges before it go into
``context``, tool calls and results of its exchange too (or, with --tool_calls drop, the conversation is skipped).

    python src/data_processing/convert_chat.py sharegpt.json --output Datasets/chat.json
    python -m src.data_processing.convert_chat openai_chats.jsonl --output Datasets/chat.json --max_history_turns 0
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, check_input, check_output_path, finish, make_record, \
    read_items
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS, message_text, shape_item  # noqa: F401
from src.utils.common import run_entry_point, setup_logging



def convert_chat(path: Path, domain: str | None = None, id_prefix: str | None = None,
                 max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS, skipped: Counter | None = None,
                 tool_calls: str = "keep") -> list[dict]:
    """One record per answered turn, read exactly as prepare_data_for_training reads the same item."""
    skipped = skipped if skipped is not None else Counter()
    prefix = id_prefix or path.stem
    records = []
    for index, item in read_items(path, skipped):
        messages = item if isinstance(item, list) else (item.get("conversations") or item.get("messages")
                                                        if isinstance(item, dict) else None)
        if not isinstance(messages, list):
            skipped["no_messages"] += 1
            continue
        result = shape_item(item if isinstance(item, dict) else {"messages": item}, max_history_turns, tool_calls)
        skipped.update({k: v for k, v in result.notes.items() if k in ("empty_message", "bad_message",
                                                                        "unanswered_last_turn")})
        if result.reason:
            skipped["no_exchange" if result.reason == "no_answered_turn" else result.reason] += 1
            continue
        conv_id = f"{prefix}-{item.get('id', index) if isinstance(item, dict) else index}"
        own_domain = item.get("domain") if isinstance(item, dict) else None
        for rec in result.records:
            records.append(make_record(f"{conv_id}-t{rec['turn']}", rec["question"], rec["answer"],
                                       domain or own_domain, path.name, turn=rec["turn"],
                                       context=rec.get("context")))
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = base_parser("Convert ShareGPT / OpenAI messages chats to Theta records.", "JSON list or JSON Lines file")
    p.add_argument("--tool_calls", choices=("keep", "drop"), default="keep",
                   help="conversations with tool calls: keep (tool turns become context) or skip them whole")
    args = p.parse_args(argv)
    if args.max_history_turns < 0:
        p.error("--max_history_turns must be 0 or more")
    check_output_path(args.output)
    check_input(args.input, "a ShareGPT / OpenAI messages chat file", "convert_chat", {"json"})
    skipped = Counter()
    records = convert_chat(args.input, args.domain, args.id_prefix, args.max_history_turns, skipped, args.tool_calls)
    return finish(records, skipped, args.output, "chat")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
