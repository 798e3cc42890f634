"""The data contract between data preparation, training and evaluation: the prepared file's format version, the one
question key and what ``has_code`` means.

    from src.utils.data_contract import PREPARED_FORMAT_VERSION, question_key, has_code
    question_key("What is C#?") != question_key("What is C++?")   # True
    has_code("Run:\\n```bash\\nls\\n```")                          # True

Data preparation (src/data_processing/prepare_data_for_training.py) writes ``PREPARED_FORMAT_VERSION`` into the
prepared file and its stats; training checks it and asks for a re-run of preparation when it differs. Preparation,
augmentation and evaluation compare questions through ``question_key`` only, so "the same question" means the same
thing when the held-out set is kept apart and when evaluation checks it for leaks.
"""

from __future__ import annotations

import re
import unicodedata

# Version of Datasets/enhanced_training_data.json. 2: the domain balance is each record's ``sample_weight`` (a
# version-1 file held materialised repeats and lost capped records instead), conversation turns carry their
# context. A trainer reading a version-1 file would train on the old, lossy balance: it asks for a re-run.
PREPARED_FORMAT_VERSION = 2

# Symbols that change what a question asks ("C#" / "C++", "!=" / "==", "a < b" / "a > b"): kept in the key.
KEY_SYMBOLS = frozenset("+#=!<>")
_CODE_FENCE = re.compile(r"(?m)^[ \t]{0,3}(?:```|~~~)")


def _keep(ch: str) -> bool:
    """Letters and digits of every script, combining marks (Devanagari, Thai vowels...) and the key symbols."""
    return ch.isalnum() or ch in KEY_SYMBOLS or unicodedata.category(ch)[0] == "M"


def question_key(text: str) -> str:
    """The one key under which two questions count as the same question.

    NFKC (full-width letters and digits become plain ones, ligatures are split), ``casefold`` (so "Straße" meets
    "STRASSE"), then every run of characters that are not letters, digits, marks or one of ``+ # = ! < >`` becomes
    one space, trimmed. A run made only of ``!`` at the end of a word ("Hello!") is sentence punctuation and goes;
    ``!=`` stays. Scripts without spaces keep every character, so two different Chinese questions differ.

    Cost: one pass over the characters (about 1 us per character); ASCII text takes a faster regex path.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    if text.isascii():
        pieces = re.findall(r"[a-z0-9+#=!<>]+", text)
    else:
        pieces, current = [], []
        for ch in text:
            if _keep(ch):
                current.append(ch)
            elif current:
                pieces.append("".join(current))
                current = []
        if current:
            pieces.append("".join(current))
    out = []
    for piece in pieces:
        stripped = piece.rstrip("!")
        if stripped and stripped != piece and not stripped[-1] in KEY_SYMBOLS:
            piece = stripped  # "hello!" -> "hello", but "!=" and "a!=" stay
        elif not stripped and len(pieces) > 1:
            continue  # a lone "!" between words is punctuation
        out.append(piece)
    return " ".join(out)


def has_code(text: str) -> bool:
    """Whether ``text`` holds a fenced code block: a line opening with ``` or ~~~ (up to three spaces before it,
    as CommonMark allows). Inline `code` spans are prose. Data preparation sets the record's ``has_code`` field
    from its question and answer; the trainer's code-contrastive loss selects on that field."""
    return "```" in text or "~~~" in text and bool(_CODE_FENCE.search(text))
