"""Synthetic Q&A examples that keep the meaning of real ones: rephrased questions, inverted definitions and
combined related records. Nothing is downloaded; every answer is reused byte for byte, so code and newlines are
never touched, and only single-line questions without code are rewritten.

    from src.data_processing.augmentation import Augmenter
    new = Augmenter(records, seed=42).generate({"helpdesk": 10})

Methods (each output is marked ``synthetic: true`` with ``origin`` = the source record's id and ``augmentation``
= the method):
- ``rephrase``: the question through a template for its pattern ("What is X?" -> "Can you explain what X is?",
  "How do I X?" -> "What are the steps to X?", ...); the answer unchanged.
- ``invert``: an answer opening with a definition ("X is a Y ...") gives the question "Which term describes
  Y?" and the first sentence as answer.
- ``combine``: two records of one domain whose questions share content words become one two-part question, the
  answers joined by a blank line (``origins`` lists both).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

from src.data_processing.text_quality import CODE_FENCE, CONTENT_WORD, STOPWORDS
from src.utils.data_contract import question_key

_Q = r"(?P<x>[^?\n]{2,120}?)"
REPHRASE = [
    (re.compile(r"^what is the difference between (?P<a>[^?\n]{1,60}?) and (?P<b>[^?\n]{1,60}?)\?$", re.I),
     ["How do {a} and {b} differ?", "Can you compare {a} and {b}?"]),
    (re.compile(rf"^what (?:is|are) the (?:main )?(?:benefits?|advantages?) of {_Q}\?$", re.I),
     ["Why would someone use {x}?", "What makes {x} useful?"]),
    (re.compile(rf"^what is {_Q}\?$", re.I),
     ["Can you explain what {x} is?", "What does {x} mean?", "Give an explanation of {x}."]),
    (re.compile(rf"^what are {_Q}\?$", re.I),
     ["Can you explain what {x} are?", "What is meant by {x}?"]),
    (re.compile(rf"^how does {_Q} work\?$", re.I),
     ["Explain how {x} works.", "Can you describe how {x} works?"]),
    (re.compile(rf"^how (?:do|can|should) (?:i|you|we|one) {_Q}\?$", re.I),
     ["What are the steps to {x}?", "Explain how to {x}.", "What is a good way to {x}?"]),
    (re.compile(rf"^(?:explain|describe) {_Q}\.?$", re.I),
     ["Can you explain {x}?", "What should I know about {x}?"]),
    (re.compile(rf"^when should (?:i|you|we|one) {_Q}\?$", re.I),
     ["In which situations should you {x}?", "What are good times to {x}?"]),
]
GENERIC = ["Could you answer this question: {q}", "I would like to understand this. {q}"]
DEFINITION = re.compile(r"^(?P<x>[A-Za-z][^.\n:]{0,60}?) (?P<v>is|are) (?P<d>(?:a|an|the) [^\n]{10,200}?\.)(?:\s|$)")


def _simple_question(q: str) -> bool:
    return "\n" not in q and CODE_FENCE not in q and len(q) <= 300


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def rephrasings(question: str) -> list[str]:
    """Template rephrasings of a single-line question, specific patterns first, then the generic wrappers."""
    if not _simple_question(question):
        return []
    q = question.strip()
    out = []
    for pattern, templates in REPHRASE:
        m = pattern.match(q)
        if m:
            parts = {k: v.strip() for k, v in m.groupdict().items()}
            out.extend(t.format(**parts) for t in templates)
            break
    if q.endswith("?") and len(q.split()) >= 4:  # wrapping a greeting or a command would read oddly
        out.extend(t.format(q=q) for t in GENERIC)
    return [s[0].upper() + s[1:] for s in out]


def inversion(question: str, answer: str) -> tuple[str, str] | None:
    """(question, answer) asking for the term that the answer's opening definition defines, or None."""
    first = answer.split("\n", 1)[0]
    if CODE_FENCE in first:
        return None
    m = DEFINITION.match(first)
    if not m:
        return None
    term = m.group("x").strip()
    # The defined term must be what the question is about, or the inversion would change the meaning.
    if question_key(term) not in question_key(question) or len(term.split()) > 6:
        return None
    definition = m.group("d").rstrip(".")
    return f"Which term describes {definition}?", m.group(0).strip()


class Augmenter:
    """Deterministic generator of synthetic examples from a list of (train) records."""

    def __init__(self, records: list[dict], seed: int, taken_questions: set[str] | None = None) -> None:
        self.seed = seed
        self.by_domain: dict[str, list[dict]] = defaultdict(list)
        for rec in records:
            if not rec.get("synthetic"):
                self.by_domain[rec["domain"]].append(rec)
        self.taken = taken_questions if taken_questions is not None else {question_key(r["question"])
                                                                          for r in records}
        self.counter: dict[str, int] = defaultdict(int)

    def _make(self, origin: dict, question: str, answer: str, method: str, origins: list[str] | None = None) -> dict:
        key = question_key(question)
        self.taken.add(key)
        self.counter[origin["id"]] += 1
        rec = {"id": f"{origin['id']}~syn{self.counter[origin['id']]}", "question": question, "answer": answer,
               "domain": origin["domain"], "source": origin["source"], "synthetic": True,
               "origin": origin["id"], "augmentation": method,
               "has_code": CODE_FENCE in answer or CODE_FENCE in question}
        if origins:
            rec["origins"] = origins
        if origin.get("split"):
            rec["split"] = origin["split"]
        if origin.get("context") and method != "combine":
            rec["context"] = origin["context"]
        return rec

    def _candidates(self, domain: str, rng: random.Random):
        """Candidate (origin, question, answer, method, origins) in a seeded order: one round of each method
        over all records before the next template, so a small budget spreads over many records."""
        recs = sorted(self.by_domain[domain], key=lambda r: r["id"])
        rng.shuffle(recs)
        for rec in recs:  # round 1: the first rephrasing of each record
            alts = rephrasings(rec["question"])
            if alts:
                yield rec, alts[0], rec["answer"], "rephrase", None
        for rec in recs:  # round 2: definition inversion
            inv = inversion(rec["question"], rec["answer"])
            if inv:
                yield rec, inv[0], inv[1], "invert", None
        yield from self._combinations(recs, rng)
        for k in range(1, 5):  # further rephrasings
            for rec in recs:
                alts = rephrasings(rec["question"])
                if k < len(alts):
                    yield rec, alts[k], rec["answer"], "rephrase", None

    def _combinations(self, recs: list[dict], rng: random.Random):
        index: dict[str, list[int]] = defaultdict(list)
        words = []
        for i, rec in enumerate(recs):
            ws = {w for w in CONTENT_WORD.findall(rec["question"].lower()) if w not in STOPWORDS}
            words.append(ws)
            for w in ws:
                index[w].append(i)
        for i, rec in enumerate(recs):
            if not _simple_question(rec["question"]):
                continue
            shared: dict[int, int] = defaultdict(int)
            for w in words[i]:
                if len(index[w]) > 50:  # a word in every question relates nothing
                    continue
                for j in index[w]:
                    if j != i and (rec.get("split") == recs[j].get("split")):
                        shared[j] += 1
            partners = sorted(j for j, n in shared.items() if n >= 2 and _simple_question(recs[j]["question"]))
            if not partners:
                continue
            other = recs[rng.choice(partners)]
            q = f"{rec['question'].strip()} Also, {_lower_first(other['question'].strip())}"
            yield rec, q, f"{rec['answer']}\n\n{other['answer']}", "combine", [rec["id"], other["id"]]

    def generate(self, budget: dict[str, int]) -> list[dict]:
        """Up to ``budget[domain]`` new records per domain, never repeating a question already present."""
        out = []
        for domain in sorted(budget):
            want = budget[domain]
            if want <= 0 or domain not in self.by_domain:
                continue
            rng = random.Random(f"{self.seed}:{domain}")
            made = 0
            for origin, q, a, method, origins in self._candidates(domain, rng):
                if question_key(q) in self.taken:
                    continue
                out.append(self._make(origin, q, a, method, origins))
                made += 1
                if made >= want:
                    break
        return out
