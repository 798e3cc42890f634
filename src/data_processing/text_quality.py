"""Text normalisation, the quality score and the difficulty rating of a Q&A record.

Both formulas are deterministic, cheap (a few regular expressions per record) and documented in
documentation/DATA_PROCESSING.md, where each is worked through on an example.

    from src.data_processing.text_quality import normalise_text, quality_components, quality_score, difficulty
    quality_score("What is DNS?", "DNS translates names into IP addresses.")
"""

from __future__ import annotations

import re
import unicodedata

CODE_FENCE = "```"

# Quality: weights of the six parts (they sum to 1).
QUALITY_WEIGHTS = {"length": 0.25, "relevance": 0.20, "formatting": 0.10, "code": 0.15, "repetition": 0.15,
                   "boilerplate": 0.15}
CONTENT_WORD = re.compile(r"[a-z]{4,}")
STOPWORDS = frozenset(
    "what does this that with from have which when where your about there their would could should into they "
    "them then than these those been were will some more most also just like make many much very such explain "
    "describe tell give show please difference between work works used using".split())
TERMINAL = (".", "!", "?", ":", ")", "]", '"', "'", CODE_FENCE, "\u3002", "\uff01", "\uff1f", "\uff1a", "\uff09",
            "\u300d", "\u300f", "\u2026", "\u0964")  # CJK full stop, full-width ! ? : ), corner quotes, ellipsis, danda
# Scripts written without spaces between words (CJK, kana, Thai, Lao, Myanmar, Khmer): their length is counted
# in characters, CHARS_PER_WORD characters making one word, so a Chinese answer is as "long" as its English twin.
NO_SPACE = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff"
UNIT = re.compile(f"[{NO_SPACE}]|[^\\s{NO_SPACE}]+")
NO_SPACE_CHAR = re.compile(f"[{NO_SPACE}]")
CHARS_PER_WORD = 1.6
UNICODE_CONTENT_WORD = re.compile(r"[^\W\d_]{4,}")
CJK_RUN = re.compile(f"[{NO_SPACE}]{{2,}}")
# Characters of Chinese question words and particles: a bigram holding one says nothing about the topic.
CJK_STOP = set("什么是的了吗呢请如何为怎样哪些一个和与在有这那我你他她它们把被就都也还又能会要可以中")
# Content problems that make a record untrainable: unfilled template slots and media tokens whose media is gone.
PLACEHOLDER = re.compile(r"\{\{[^{}\n]{1,80}\}\}|\[(?:SPECIFIC|INSERT|YOUR|ENTER|ADD|PLACEHOLDER)\b[^\]\n]{0,80}\]")
MEDIA_TOKEN = re.compile(r"<(?:image|img|video|audio|speech)>", re.IGNORECASE)
SHOUTING = re.compile(r"[!?]{3,}")
_BOILERPLATE = (r"\bas an ai\b", r"\blanguage model\b", r"\bi(?:'m| am) (?:sorry|unable)\b",
                r"\bi cannot (?:help|answer)\b", r"\blorem ipsum\b", r"\bclick here\b", r"\bsubscribe\b",
                r"\b(?:todo|tbd|fixme)\b", r"^\s*n/?a\s*\.?\s*$", r"\bi don'?t know\b")
BOILERPLATE = [re.compile(p, re.IGNORECASE) for p in _BOILERPLATE]
# Substrings one of which every boilerplate pattern needs: a plain `in` test skips the regexes for clean text.
BOILERPLATE_HINTS = ("as an ai", "language model", "sorry", "unable", "cannot", "lorem", "click here", "subscribe",
                     "todo", "tbd", "fixme", "know")
_UPPER = bytes(range(65, 91))
_LOWER = bytes(range(97, 123))

# Difficulty markers.
# One match per term; the possessive \w++ never backtracks inside a word (the plain \w+ form was 25% slower).
TECH_TERM = re.compile(r"\b(?:[A-Z]{2,}|\w++(?:\(\)|\.\w)|[a-z]++_\w)")
STEP_MARKER = re.compile(r"(?mi)^\s*(?:\d+[.)]\s|step \d+|first\b|then\b|next\b|finally\b)")


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------

def normalise_text(text: str) -> str:
    """Prose: Unicode NFC, CRLF -> LF, trailing spaces of each line removed, the whole text trimmed.

    Text between ``` fences (the fences included) is kept byte for byte: no NFC, no trimming, whatever it holds.
    An unclosed fence protects everything after it.
    """
    if CODE_FENCE not in text:
        if text.isascii():  # the common case: NFC cannot change ASCII
            prose = text
        else:
            prose = unicodedata.normalize("NFC", text)
        if "\r" in prose or " \n" in prose or "\t\n" in prose:
            prose = "\n".join(line.rstrip() for line in prose.replace("\r\n", "\n").split("\n"))
        return prose.strip()
    parts = text.split(CODE_FENCE)
    for i in range(0, len(parts), 2):  # even parts are prose, odd parts code
        prose = unicodedata.normalize("NFC", parts[i]).replace("\r\n", "\n")
        parts[i] = "\n".join(line.rstrip() for line in prose.split("\n"))
    if len(parts) > 1:
        parts[0] = parts[0].lstrip()
        if len(parts) % 2:  # the last part is prose
            parts[-1] = parts[-1].rstrip()
    return CODE_FENCE.join(parts)


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of ``text`` (language tag line included), in order."""
    return text.split(CODE_FENCE)[1::2]


# ---------------------------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------------------------

def text_units(text: str) -> list[str]:
    """Word-like units: whitespace-separated words, and each character of a script without spaces on its own."""
    if text.isascii():
        return text.split()
    return UNIT.findall(text)


def length_in_words(text: str, units: list[str] | None = None) -> float:
    """Length in words, a character of a script without spaces counting 1 / CHARS_PER_WORD of a word."""
    if text.isascii():
        return len(units) if units is not None else len(text.split())
    units = units if units is not None else text_units(text)
    cjk = len(NO_SPACE_CHAR.findall(text))
    return len(units) - cjk + cjk / CHARS_PER_WORD


def content_terms(text: str) -> set[str]:
    """Topic-bearing terms: 4+ letter words that are not stopwords (every script with spaces), and character
    bigrams of scripts without spaces that hold no question word or particle."""
    lowered = text.lower()
    if text.isascii():
        return {w for w in CONTENT_WORD.findall(lowered) if w not in STOPWORDS}
    terms = {w for w in UNICODE_CONTENT_WORD.findall(lowered) if w not in STOPWORDS and not NO_SPACE_CHAR.search(w)}
    for run in CJK_RUN.findall(text):
        terms.update(run[i:i + 2] for i in range(len(run) - 1) if not (set(run[i:i + 2]) & CJK_STOP))
    return terms


def content_flags(*texts: str) -> list[str]:
    """``placeholder`` (an unfilled ``{{slot}}`` or ``[SPECIFIC ...]`` template) and ``missing_media`` (an
    ``<image>``-style token whose media is not part of a text record), in that order, each at most once."""
    flags = []
    joined = "\n".join(t for t in texts if t)
    if ("{{" in joined or "[" in joined) and PLACEHOLDER.search(joined):
        flags.append("placeholder")
    if "<" in joined and MEDIA_TOKEN.search(joined):
        flags.append("missing_media")
    return flags


def _length_part(n_words: float) -> float:
    if n_words < 3:
        return 0.0
    if n_words < 20:
        return (n_words - 3) / 17
    if n_words <= 300:
        return 1.0
    return max(0.5, 1.0 - 0.5 * (n_words - 300) / 300)


def _code_part(answer: str) -> float:
    fences = answer.count(CODE_FENCE)
    if fences == 0:
        return 1.0
    if fences % 2:
        return 0.0
    for block in code_blocks(answer):
        body = block.split("\n", 1)[1] if "\n" in block else ""  # first line is the language tag
        if not body.strip():
            return 0.5
    return 1.0


def _mostly_capitals(text: str) -> bool:
    """20+ cased letters, over 80% of them capitals (ASCII letters are counted with bytes.translate: fast)."""
    if text.isascii():
        raw = text.encode("ascii")
        upper = len(raw) - len(raw.translate(None, _UPPER))
        lower = len(raw) - len(raw.translate(None, _LOWER))
    else:
        upper = sum(1 for c in text if c.isupper())
        lower = sum(1 for c in text if c.islower())
    return upper + lower >= 20 and upper > 0.8 * (upper + lower)


def quality_components(question: str, answer: str) -> dict[str, float]:
    """The six parts of the quality score, each in [0, 1] (see ``quality_score``)."""
    words = text_units(answer)
    n = length_in_words(answer, words)
    q_words = content_terms(question)
    if q_words:
        a_words = content_terms(answer)
        relevance = min(1.0, 2 * len(q_words & a_words) / len(q_words))
    else:
        relevance = 0.5
    formatting = 1.0
    if not answer.rstrip().endswith(TERMINAL):
        formatting -= 0.5
    if (("!" in answer or "?" in answer) and SHOUTING.search(answer)) or _mostly_capitals(answer):
        formatting -= 0.5
    if len(words) >= 3:
        trigrams = list(zip(words, words[1:], words[2:]))
        repetition = len(set(trigrams)) / len(trigrams)
    else:
        repetition = 1.0
    boilerplate = 1.0
    lowered = answer.lower()
    if len(answer) < 8 or any(hint in lowered for hint in BOILERPLATE_HINTS):
        boilerplate = max(0.0, 1.0 - 0.5 * sum(1 for p in BOILERPLATE if p.search(answer)))
    return {"length": _length_part(n), "relevance": relevance, "formatting": formatting,
            "code": _code_part(answer), "repetition": repetition, "boilerplate": boilerplate}


def quality_score(question: str, answer: str) -> float:
    """Quality in [0, 1], rounded to 4 places: the weighted sum of six parts.

    - length (0.25): answer words n (split on whitespace; in scripts without spaces 1.6 characters make a
      word): 0 under 3, (n - 3) / 17 up to 19, 1 from 20 to 300,
      then down by 0.5 per 300 words to a floor of 0.5;
    - relevance (0.20): the question's content terms (4+ letter words, not stopwords; character bigrams in
      scripts without spaces) that the answer repeats:
      min(1, 2 * shared / question words); 0.5 when the question has none;
    - formatting (0.10): 1, minus 0.5 when the answer does not end with . ! ? : ) ] quote or a fence, minus 0.5
      for shouting (a run of 3+ ! or ?, or 80%+ capital letters over 20+ letters);
    - code (0.15): 1 without fences, 0 for an odd number of fences, 0.5 when a fenced block is empty, else 1;
    - repetition (0.15): distinct trigrams / all trigrams of the answer's words (characters in scripts without
      spaces; 1 under 3);
    - boilerplate (0.15): 1 minus 0.5 per boilerplate pattern found ("as an AI", "lorem ipsum", "TODO"...), >= 0.
    """
    parts = quality_components(question, answer)
    return round(sum(QUALITY_WEIGHTS[k] * v for k, v in parts.items()), 4)


# ---------------------------------------------------------------------------------------------------------------
# Difficulty
# ---------------------------------------------------------------------------------------------------------------

def difficulty_points(question: str, answer: str, has_code: bool) -> dict[str, bool]:
    n = length_in_words(answer)
    return {
        "long_answer": n >= 80,
        "technical_terms": n > 0 and len(TECH_TERM.findall(answer)) / n >= 0.08,
        "code": has_code,
        "multi_step": len(STEP_MARKER.findall(answer)) >= 2,
        "long_question": length_in_words(question) >= 25,
    }


def difficulty(question: str, answer: str, has_code: bool) -> int:
    """1-5 (words counted as in ``length_in_words``): 1 plus one point each for a long answer (80+ words),
    dense technical terms (acronyms, ``call()``, snake_case or dotted names making 8%+ of the answer's words),
    code, multi-step reasoning (2+ numbered lines or lines opening with first/then/next/finally/step N) and a
    long question (25+ words); capped at 5."""
    return min(5, 1 + sum(difficulty_points(question, answer, has_code).values()))
