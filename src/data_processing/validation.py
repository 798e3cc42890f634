"""Validation of one loaded record: the checks every reader of Datasets/ shares (data preparation, the knowledge
step, the survey of problems), so they agree on what is usable.

    from src.data_processing.loading import DropLog
    from src.data_processing.validation import validate_record
    clean = validate_record({"question": "Q?", "answer": "A.", "source": "a.json", "source_index": 0}, DropLog(),
                            max_chars=20000)

A record is dropped, with its reason, when its question or answer is missing, not text, empty, holds bytes that
are not UTF-8 or control characters, is too long, or holds an unfilled placeholder or an orphan media token
(unless ``keep_flagged``). A kept record is normalised (NFC outside code fences, whitespace) and gets its domain
from its own field, ``--domain_map`` or its file/folder name; one that none of them names keeps ``domain: None``
for the classifier, which needs the domains of the whole data first (``domains.assign_missing_domains``).
"""

from __future__ import annotations

import re

from src.data_processing.domains import DomainResolver
from src.data_processing.text_quality import content_flags, normalise_text
from src.utils.data_contract import has_code

CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SURROGATES = re.compile(r"[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or broken \\u escapes
TOKEN_PIECE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+")  # GPT-2 pre-tokenizer
KEPT_INPUT_FIELDS = ("context", "turn", "category", "preference")
DEFAULT_MAX_CHARS = 20000


def approx_tokens(text: str) -> int:
    """GPT-2 pre-tokenizer pieces: a lower bound of the BPE token count, computed without a tokenizer."""
    return len(TOKEN_PIECE.findall(text))


def default_id(rec: dict) -> str:
    """The record's own id, else ``<file>#<index>`` (``-t<turn>`` for a conversation turn)."""
    rid = rec.get("id")
    if rid not in (None, "") and not isinstance(rid, (dict, list)):
        return str(rid)
    base = f"{rec.get('source', '?')}#{rec.get('source_index')}"
    return f"{base}-t{rec['turn']}" if isinstance(rec.get("turn"), int) else base


def validate_record(rec: dict, drops, max_chars: int = DEFAULT_MAX_CHARS, max_tokens: int = 0,
                    resolver: DomainResolver | None = None, keep_flagged: bool = False) -> dict | None:
    """The normalised record, or None after logging (``drops.drop``) the reason it is dropped."""
    source, index, line = rec.get("source", "?"), rec.get("source_index"), rec.get("source_line")
    for field in ("question", "answer"):
        value = rec.get(field)
        if value is None:
            drops.drop(f"missing_{field}", source, index, "", line)
            return None
        if not isinstance(value, str):
            drops.drop(f"wrong_type_{field}", source, index, type(value).__name__, line)
            return None
        if not value.isascii():
            if SURROGATES.search(value):
                drops.drop("invalid_utf8", source, index, f"{field} holds bytes that are not UTF-8", line)
                return None
        if CONTROL_CHARS.search(value):
            drops.drop("control_characters", source, index, field, line)
            return None
        if not value.strip():
            drops.drop(f"empty_{field}", source, index, "", line)
            return None
    question, answer = normalise_text(rec["question"]), normalise_text(rec["answer"])
    longest = max(len(question), len(answer))
    if longest > max_chars:
        drops.drop("too_long", source, index, f"{longest} characters > --max_answer_chars {max_chars}", line)
        return None
    if max_tokens and max(approx_tokens(question), approx_tokens(answer)) > max_tokens:
        drops.drop("too_long", source, index, f"over --max_answer_tokens {max_tokens}", line)
        return None
    flags = content_flags(question, answer)
    if flags and not keep_flagged:
        reason = "placeholder_text" if flags[0] == "placeholder" else "missing_media"
        detail = "unfilled template slot ({{...}} or [SPECIFIC ...])" if reason == "placeholder_text" else \
            "an <image>-style token whose media is not in the record"
        drops.drop(reason, source, index, detail, line)
        return None
    domain, how = (resolver or DomainResolver()).resolve(rec.get("domain"), source)
    out = {"id": default_id(rec), "question": question, "answer": answer, "domain": domain,
           "source": source, "source_index": index, "has_code": has_code(answer) or has_code(question)}
    if how not in (None, "record"):
        out["domain_source"] = how
    if flags:
        out["flags"] = flags
    for key in KEPT_INPUT_FIELDS:
        value = rec.get(key)
        if value in (None, "") or (key == "context" and not isinstance(value, str)):
            continue  # a context that is not text cannot go into the prompt
        out[key] = normalise_text(value) if key == "context" else value
    if rec.get("synthetic") is True:
        out["synthetic"] = True
        if rec.get("origin") is not None:
            out["origin"] = str(rec["origin"])
    return out
