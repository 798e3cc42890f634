"""Convert chat transcripts into Theta records: ShareGPT (``conversations`` of ``{from, value}`` with
human/gpt) and OpenAI ``messages`` JSON Lines (``{role, content}``, content a string or a list of text parts).

Each user message followed by an assistant message becomes one record with ``turn`` (0, 1, ...). A system
message and, from the second turn on, the previous exchange go into ``context`` (with --context_turns > 0), so a
later turn keeps the conversation it depends on.

    python src/data_processing/convert_chat.py sharegpt.json --output Datasets/chat.json
    python -m src.data_processing.convert_chat openai_chats.jsonl --output Datasets/chat.json --context_turns 0
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, finish, make_record, read_items
from src.utils.common import run_entry_point, setup_logging

USER_ROLES = {"user", "human", "prompter"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}


def message_text(content: object) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else None
    return None


def convert_conversation(messages: list, conv_id: str, domain: str | None, source: str, context_turns: int,
                         skipped: Counter) -> list[dict]:
    records, system, history, pending, turn = [], None, [], None, 0
    for msg in messages:
        if not isinstance(msg, dict):
            skipped["bad_message"] += 1
            continue
        role = str(msg.get("role", msg.get("from", ""))).lower()
        text = message_text(msg.get("content", msg.get("value")))
        if text is None or not text.strip():
            skipped["empty_message"] += 1
            continue
        if role == "system":
            system = text.strip()
        elif role in USER_ROLES:
            pending = text
        elif role in ASSISTANT_ROLES and pending is not None:
            context_parts = [system] if system and context_turns > 0 else []
            if context_turns > 0:
                context_parts += [f"User: {q}\nAssistant: {a}" for q, a in history[-context_turns:]]
            records.append(make_record(f"{conv_id}-t{turn}", pending, text, domain, source, turn=turn,
                                       context="\n\n".join(context_parts) or None))
            history.append((pending.strip(), text.strip()))
            pending, turn = None, turn + 1
        else:
            skipped["unpaired_message"] += 1
    return records


def convert_chat(path: Path, domain: str | None = None, id_prefix: str | None = None, context_turns: int = 1,
                 skipped: Counter | None = None) -> list[dict]:
    skipped = skipped if skipped is not None else Counter()
    prefix = id_prefix or path.stem
    records = []
    for index, item in read_items(path, skipped):
        messages = item.get("conversations") or item.get("messages") if isinstance(item, dict) else None
        if not isinstance(messages, list):
            skipped["no_messages"] += 1
            continue
        conv_id = f"{prefix}-{item.get('id', index)}"
        made = convert_conversation(messages, conv_id, domain or item.get("domain"), path.name, context_turns,
                                    skipped)
        if not made:
            skipped["no_exchange"] += 1
        records.extend(made)
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = base_parser("Convert ShareGPT / OpenAI messages chats to Theta records.", "JSON list or JSON Lines file")
    p.add_argument("--context_turns", type=int, default=1,
                   help="previous exchanges (and the system message) kept as context; 0 = none")
    args = p.parse_args(argv)
    if args.context_turns < 0:
        p.error("--context_turns must be 0 or more")
    skipped = Counter()
    records = convert_chat(args.input, args.domain, args.id_prefix, args.context_turns, skipped)
    return finish(records, skipped, args.output, "chat")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
