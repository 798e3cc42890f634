"""Convert Markdown or plain-text FAQ files into Theta records.

Two layouts are recognised, in one file or mixed:
- Markdown headings: a heading (any level) that ends with "?" is a question; the text up to the next heading
  of the same or a higher level is its answer, so sub-headings, tables, lists and code inside an answer stay in
  it. Other headings are section titles; with --domain_from_sections a section title names the domain.
- Q/A lines: a line starting ``Q:`` (or ``Question:``) opens a question, ``A:`` (or ``Answer:``) its answer,
  which runs until the next ``Q:`` or heading.
Fenced code blocks in answers are copied byte for byte, and a ``#`` inside them is never taken for a heading.

    python src/data_processing/convert_faq.py docs/faq.md --output Datasets/faq.json --domain helpdesk
    python -m src.data_processing.convert_faq faq.txt --output Datasets/faq.json
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, check_input, check_output_path, finish, make_record
from src.utils.common import run_entry_point, setup_logging

HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
Q_LINE = re.compile(r"^\s*(?:\*\*)?(?:Q|Question)\s*[:.)](?:\*\*)?\s*(.*)$", re.IGNORECASE)
A_LINE = re.compile(r"^\s*(?:\*\*)?(?:A|Answer)\s*[:.)](?:\*\*)?\s*(.*)$", re.IGNORECASE)


def parse_faq(text: str) -> list[tuple[str, str, str | None]]:
    """``(question, answer, section)`` triples in file order."""
    pairs, section = [], None
    question: list[str] | None = None
    answer: list[str] = []
    in_answer, in_code = False, False
    q_level = 0  # heading level of the current question (0: a Q: line)

    def flush():
        nonlocal question, answer, in_answer, q_level
        if question is not None:
            q, a = "\n".join(question).strip(), "\n".join(answer).strip("\n").rstrip()
            if q and a.strip():
                pairs.append((q, a.strip("\n"), section))
        question, answer, in_answer, q_level = None, [], False, 0

    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if not in_code and not line.lstrip().startswith("```"):
            m = HEADING.match(line)
            if m:
                level, title = len(m.group(1)), m.group(2).strip()
                if question is not None and in_answer and q_level and level > q_level \
                        and not title.endswith("?"):
                    answer.append(line)  # a sub-heading inside the answer
                    continue
                flush()
                if title.endswith("?"):
                    question, in_answer, q_level = [title], True, level
                else:
                    section = title
                continue
            m = Q_LINE.match(line)
            if m:
                flush()
                question = [m.group(1)]
                continue
            m = A_LINE.match(line)
            if m and question is not None and not in_answer:
                in_answer = True
                answer.append(m.group(1))
                continue
        if question is None:
            continue
        if in_answer:
            answer.append(line)
        else:
            question.append(line)  # a question that runs over several lines before "A:"
    flush()
    return pairs


def convert_faq(path: Path, domain: str | None = None, id_prefix: str | None = None,
                domain_from_sections: bool = False, skipped: Counter | None = None) -> list[dict]:
    check_input(path, "a Markdown / plain-text FAQ", "convert_faq", {"text"})
    prefix = id_prefix or path.stem
    text = path.read_text(encoding="utf-8", errors="replace")
    records = []
    for i, (q, a, section) in enumerate(parse_faq(text)):
        d = domain or (section if domain_from_sections else None)
        records.append(make_record(f"{prefix}-{i:04d}", q, a, d, path.name))
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = base_parser("Convert a Markdown / plain-text FAQ to Theta records.", "FAQ file (.md or .txt)")
    p.add_argument("--domain_from_sections", action="store_true",
                   help="use the enclosing non-question heading as each record's domain")
    args = p.parse_args(argv)
    check_output_path(args.output)
    skipped = Counter()
    records = convert_faq(args.input, args.domain, args.id_prefix, args.domain_from_sections, skipped)
    return finish(records, skipped, args.output, "FAQ")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
