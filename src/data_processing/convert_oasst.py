"""Convert OpenAssistant-style message trees into Theta records, following the best-ranked reply path.

Accepted: nested trees (``{"message_id", "role": "prompter"|"assistant", "text", "rank", "replies": [...]}``,
optionally wrapped as ``{"prompt": tree}``) or flat messages with ``parent_id`` (oasst1's JSON Lines export).
Only messages OASST's own export flags mark usable are followed: not ``deleted``, ``review_result`` true (reviewed
and accepted; a message without review fields, as in hand-made trees, counts as reviewed), and a tree whose
``tree_state`` is ``ready_for_export`` when it says. At every level the usable reply with the lowest ``rank``
wins (rank 0 is the best; missing ranks come last, then the input order), and each assistant message of that
path becomes one record with its ``turn`` and, as context, the --max_history_turns exchanges before it (the same
rule as data preparation). --lang keeps the trees whose root is in that language.

    python src/data_processing/convert_oasst.py oasst_trees.jsonl --output Datasets/oasst.json
    python -m src.data_processing.convert_oasst messages.jsonl --output Datasets/oasst.json --lang en
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, check_input, check_output_path, finish, make_record, \
    read_items
from src.data_processing.record_shapes import DEFAULT_MAX_HISTORY_TURNS, conversation_records
from src.utils.common import run_entry_point, setup_logging

READY = "ready_for_export"


def usable_message(m: object) -> bool:
    """Text, not deleted, and reviewed and accepted (``review_result`` true; absent review fields count as
    reviewed), following the export's own flags."""
    if not isinstance(m, dict) or not isinstance(m.get("text"), str) or not m["text"].strip():
        return False
    if m.get("deleted") is True:
        return False
    if "review_result" in m and m["review_result"] is not True:
        return False
    return True


def _best(replies: list[dict]) -> dict | None:
    usable = [r for r in replies if usable_message(r)]
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
                  skipped: Counter | None = None, max_history_turns: int = DEFAULT_MAX_HISTORY_TURNS) -> list[dict]:
    skipped = skipped if skipped is not None else Counter()
    prefix = id_prefix or path.stem
    trees, flat = [], []
    for _, item in read_items(path, skipped):
        if not isinstance(item, dict):
            skipped["not_a_message"] += 1
        elif isinstance(item.get("prompt"), dict):
            if item.get("tree_state") not in (None, READY):
                skipped["tree_not_ready"] += 1
                continue
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
        if root.get("tree_state") not in (None, READY):
            skipped["tree_not_ready"] += 1
            continue
        if not usable_message(root):
            skipped["prompt_not_usable"] += 1
            continue
        tree_id = root.get("message_id", t)
        path_msgs = [{"role": "user" if n.get("role") == "prompter" else n.get("role"), "content": n["text"]}
                     for n in best_path(root)]
        made = conversation_records(path_msgs, max_history_turns).records
        for rec in made:
            records.append(make_record(f"{prefix}-{tree_id}-t{rec['turn']}", rec["question"], rec["answer"], domain,
                                       path.name, turn=rec["turn"], context=rec.get("context")))
        if not made:
            skipped["no_answered_prompt"] += 1
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = base_parser("Convert OASST message trees (best-ranked path) to Theta records.",
                    "JSON / JSON Lines of trees or flat messages")
    p.add_argument("--lang", type=str, default=None, help="keep only trees in this language (e.g. en)")
    args = p.parse_args(argv)
    check_output_path(args.output)
    check_input(args.input, "an OASST JSON / JSON Lines export", "convert_oasst", {"json"})
    skipped = Counter()
    records = convert_oasst(args.input, args.domain, args.id_prefix, args.lang, skipped, args.max_history_turns)
    return finish(records, skipped, args.output, "OASST")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
