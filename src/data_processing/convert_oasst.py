"""Convert OpenAssistant-style message trees into Theta records, following the best-ranked reply path.

Accepted: nested trees (``{"message_id", "role": "prompter"|"assistant", "text", "rank", "replies": [...]}``,
optionally wrapped as ``{"prompt": tree}``) or flat messages with ``parent_id`` (oasst1's JSON Lines export).
At every level the reply with the lowest ``rank`` wins (rank 0 is the best; missing ranks come last, then the
input order), and each prompter -> assistant step of that path becomes one record with its ``turn``.

    python src/data_processing/convert_oasst.py oasst_trees.jsonl --output Datasets/oasst.json
    python -m src.data_processing.convert_oasst messages.jsonl --output Datasets/oasst.json --lang en
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, finish, make_record, read_items
from src.utils.common import run_entry_point, setup_logging


def _best(replies: list[dict]) -> dict | None:
    usable = [r for r in replies if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip()
              and not r.get("deleted")]
    if not usable:
        return None
    return min(enumerate(usable), key=lambda ir: (ir[1].get("rank") is None, ir[1].get("rank") or 0, ir[0]))[1]


def best_path(root: dict) -> list[dict]:
    """The root message and then, level by level, the best-ranked reply."""
    path, node = [], root
    while node is not None:
        path.append(node)
        node = _best(node.get("replies") or [])
    return path


def trees_from_flat(messages: list[dict]) -> list[dict]:
    """Nested trees from flat messages linked by ``parent_id`` (input order kept among siblings)."""
    children: dict[str, list[dict]] = defaultdict(list)
    roots = []
    for m in messages:
        node = {**m, "replies": []}
        m["_node"] = node
    for m in messages:
        parent = m.get("parent_id")
        (children[parent] if parent else roots).append(m["_node"])
    for m in messages:
        m["_node"]["replies"] = children.get(m.get("message_id"), [])
    return roots


def convert_oasst(path: Path, domain: str | None = None, id_prefix: str | None = None, lang: str | None = None,
                  skipped: Counter | None = None) -> list[dict]:
    skipped = skipped if skipped is not None else Counter()
    prefix = id_prefix or path.stem
    trees, flat = [], []
    for _, item in read_items(path, skipped):
        if not isinstance(item, dict):
            skipped["not_a_message"] += 1
        elif isinstance(item.get("prompt"), dict):
            trees.append(item["prompt"])
        elif "replies" in item:
            trees.append(item)
        elif "message_id" in item:
            flat.append(item)
        else:
            skipped["not_a_message"] += 1
    trees += trees_from_flat(flat)
    records = []
    for t, root in enumerate(trees):
        if lang and root.get("lang") not in (None, lang):
            skipped["other_language"] += 1
            continue
        tree_id = root.get("message_id", t)
        turn, pending = 0, None
        for node in best_path(root):
            role, text = node.get("role"), node.get("text")
            if not isinstance(text, str) or not text.strip():
                break
            if role == "prompter":
                pending = text
            elif role == "assistant" and pending is not None:
                records.append(make_record(f"{prefix}-{tree_id}-t{turn}", pending, text, domain, path.name,
                                           turn=turn))
                turn, pending = turn + 1, None
        if turn == 0:
            skipped["no_answered_prompt"] += 1
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = base_parser("Convert OASST message trees (best-ranked path) to Theta records.",
                    "JSON / JSON Lines of trees or flat messages")
    p.add_argument("--lang", type=str, default=None, help="keep only trees in this language (e.g. en)")
    args = p.parse_args(argv)
    skipped = Counter()
    return finish(convert_oasst(args.input, args.domain, args.id_prefix, args.lang, skipped), skipped, args.output,
                  "OASST")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
