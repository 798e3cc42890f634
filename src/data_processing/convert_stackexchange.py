"""Convert StackExchange-style dumps into Theta records: one record per kept answer, the accepted answer first,
then the others by score.

Accepted inputs:
- the official dump's ``Posts.xml`` (rows with PostTypeId 1 = question, 2 = answer, ParentId, AcceptedAnswerId,
  Score, Title, Body, Tags), read as a stream;
- JSON / JSON Lines of questions: ``{"title", "body", "score", "tags", "answers": [{"body", "score",
  "is_accepted"}]}`` (the API's field names).
Bodies are HTML: ``<pre><code>`` becomes a fenced code block kept verbatim, inline ``<code>`` becomes
backticks, other tags are dropped and entities decoded. The question is the title, then the body.

    python src/data_processing/convert_stackexchange.py Posts.xml --output Datasets/stackexchange.json
    python -m src.data_processing.convert_stackexchange questions.json --output Datasets/se.json --max_answers 2
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `src` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from src.data_processing.converter_common import base_parser, check_input, check_output_path, finish, make_record, \
    read_items
from src.utils.common import UserError, run_entry_point, setup_logging

BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table",
              "tr"}


class _HtmlToText(HTMLParser):
    """HTML to plain text with Markdown code: <pre> content verbatim inside ``` fences."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.in_pre = 0
        self.in_code = 0

    def handle_starttag(self, tag, attrs):
        if tag == "pre":
            self.in_pre += 1
            self.out.append("\n```\n")
        elif tag == "code" and not self.in_pre:
            self.in_code += 1
            self.out.append("`")
        elif tag == "li":
            self.out.append("\n- ")
        elif tag in BLOCK_TAGS:
            self.out.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag == "pre" and self.in_pre:
            self.in_pre -= 1
            if not "".join(self.out[-1:]).endswith("\n"):
                self.out.append("\n")
            self.out.append("```\n")
        elif tag == "code" and self.in_code:
            self.in_code -= 1
            self.out.append("`")
        elif tag in BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data):
        self.out.append(data if self.in_pre else " ".join(data.split("\n")))

    def text(self) -> str:
        raw = "".join(self.out)
        parts = raw.split("```")
        for i in range(0, len(parts), 2):  # tidy prose only: collapse blank-line runs and spaces
            lines = [" ".join(line.split()) for line in parts[i].split("\n")]
            tidy, blank = [], 0
            for line in lines:
                blank = blank + 1 if not line else 0
                if blank <= 1:
                    tidy.append(line)
            parts[i] = "\n".join(tidy)
        return "```".join(parts).strip()


def html_to_text(html: str) -> str:
    parser = _HtmlToText()
    parser.feed(html or "")
    parser.close()
    return parser.text()


def order_answers(answers: list[dict], min_score: int, max_answers: int) -> list[dict]:
    """Accepted first, then by score (descending), keeping those with score >= min_score (the accepted one
    always), at most ``max_answers``."""
    ranked = sorted(answers, key=lambda a: (not a.get("is_accepted"), -int(a.get("score") or 0)))
    kept = [a for a in ranked if a.get("is_accepted") or int(a.get("score") or 0) >= min_score]
    return kept[:max_answers]


def questions_from_xml(path: Path) -> list[dict]:
    """Questions with their answers from a ``Posts.xml`` dump, streamed with iterparse."""
    questions: dict[str, dict] = {}
    answers: dict[str, list[dict]] = defaultdict(list)
    try:
        for _, elem in ET.iterparse(path, events=("end",)):
            if elem.tag != "row":
                continue
            a = elem.attrib
            if a.get("PostTypeId") == "1":
                questions[a["Id"]] = {"id": a["Id"], "title": a.get("Title", ""), "body": a.get("Body", ""),
                                      "score": int(a.get("Score", 0)), "tags": a.get("Tags", ""),
                                      "accepted": a.get("AcceptedAnswerId")}
            elif a.get("PostTypeId") == "2" and a.get("ParentId"):
                answers[a["ParentId"]].append({"id": a["Id"], "body": a.get("Body", ""),
                                               "score": int(a.get("Score", 0))})
            elem.clear()
    except ET.ParseError as err:
        raise UserError(f"{path} is not valid XML (line {err.position[0]}, column {err.position[1] + 1})") from err
    out = []
    for qid, q in questions.items():
        q["answers"] = [{**ans, "is_accepted": ans["id"] == q["accepted"]} for ans in answers.get(qid, [])]
        out.append(q)
    return out


def convert_stackexchange(path: Path, domain: str | None = None, id_prefix: str | None = None,
                          min_score: int = 1, max_answers: int = 1, skipped: Counter | None = None) -> list[dict]:
    skipped = skipped if skipped is not None else Counter()
    prefix = id_prefix or path.stem
    if path.suffix == ".xml":
        questions = questions_from_xml(path)
    else:
        questions = []
        for index, item in read_items(path, skipped):
            if isinstance(item, dict) and isinstance(item.get("items"), list):  # an API page
                questions.extend(i for i in item["items"] if isinstance(i, dict))
            elif isinstance(item, dict):
                questions.append({**item, "id": item.get("question_id", item.get("id", index))})
            else:
                skipped["not_a_question"] += 1
    records = []
    for q in questions:
        title, body = q.get("title") or "", html_to_text(q.get("body") or "")
        if not isinstance(title, str) or not title.strip():
            skipped["no_title"] += 1
            continue
        question = f"{html_to_text(title)}\n\n{body}" if body else html_to_text(title)
        kept = order_answers([a for a in q.get("answers") or [] if isinstance(a, dict)], min_score, max_answers)
        if not kept:
            skipped["no_good_answer"] += 1
            continue
        for rank, ans in enumerate(kept):
            text = html_to_text(ans.get("body") or "")
            if not text:
                skipped["empty_answer"] += 1
                continue
            records.append(make_record(f"{prefix}-{q['id']}-a{rank}", question, text, domain, path.name,
                                       score=int(ans.get("score") or 0), accepted=bool(ans.get("is_accepted"))))
    return records


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = base_parser("Convert StackExchange questions and answers to Theta records.",
                    "Posts.xml, or JSON / JSON Lines of questions with answers")
    p.add_argument("--min_score", type=int, default=1, help="answers below this score are skipped (not accepted ones)")
    p.add_argument("--max_answers", type=int, default=1, help="answers kept per question, accepted first")
    args = p.parse_args(argv)
    if args.max_answers < 1:
        p.error("--max_answers must be at least 1")
    check_output_path(args.output)
    check_input(args.input, "a StackExchange Posts.xml or questions JSON file", "convert_stackexchange",
                {"xml", "json"})
    skipped = Counter()
    records = convert_stackexchange(args.input, args.domain, args.id_prefix, args.min_score, args.max_answers,
                                    skipped)
    return finish(records, skipped, args.output, "StackExchange")


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
