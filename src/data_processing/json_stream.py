"""Stream JSON and JSON Lines files one record at a time, with exact line/column positions for every error.

Memory stays flat however big a file is: JSON Lines are read line by line, and a JSON array is decoded element by
element with ``json.JSONDecoder.raw_decode`` over a sliding text buffer (no extra dependency). The buffer only
grows when one element is larger than a chunk.

    from src.data_processing.json_stream import iter_file_items
    for item in iter_file_items(Path("Datasets/programming.json")):
        print(item.index, item.line, item.value if item.error is None else item.error)

Bytes that are not UTF-8 are decoded with ``surrogateescape``: the record that contains them is reported as
invalid UTF-8 by validation, and the other records of the file still come through.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

CHUNK_CHARS = 1 << 20  # 1 Mi characters per read: large enough to amortise, small enough to stay flat
WRAPPER_KEYS = ("qa_pairs", "records", "data", "examples")  # {"qa_pairs": [...]} and friends
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


@dataclass
class Item:
    """One top-level record-like value of a file, or one problem found while reading it.

    ``index`` counts values in the file (0-based; for JSON Lines it is the line index), ``line`` is 1-based.
    ``error`` is set for a problem: then ``value`` is None and ``fatal`` says whether the rest of the file was lost.
    """
    index: int | None
    line: int
    value: object = None
    error: str | None = None
    reason: str = ""
    fatal: bool = False


class _TextBuffer:
    """A window over a text stream that knows the line and column of every position in it."""

    def __init__(self, fh: IO[bytes], chunk_chars: int) -> None:
        self.fh = fh
        self.chunk_bytes = chunk_chars  # bytes per read (about that many characters)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.lines_before = 0  # newlines in the text already discarded
        self.col_before = 0  # characters after the last discarded newline
        self._mark, self._mark_lines, self._mark_nl = 0, 0, -1  # line_col() cache: position, newlines, last one

    def fill(self, grow: bool = False) -> bool:
        """Drop consumed text and read one more chunk (a doubled one when ``grow``); False when nothing was added."""
        if self.eof:
            return False
        consumed = self.buf[:self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self.lines_before += newlines
            self.col_before = len(consumed) - consumed.rfind("\n") - 1
        else:
            self.col_before += len(consumed)
        self.buf = self.buf[self.pos:]
        self.pos = 0
        self._mark, self._mark_lines, self._mark_nl = 0, 0, -1
        if grow:
            self.chunk_bytes *= 2  # one huge element: double the reads so that the retries stay linear overall
        data = self.fh.read(self.chunk_bytes)
        if not data:
            self.eof = True
            tail = self.decoder.decode(b"", final=True)
            self.buf += tail
            return bool(tail)
        self.buf += self.decoder.decode(data)
        return True

    def skip_ws(self) -> str:
        """The next non-whitespace character ('' at end of file), without consuming it."""
        while True:
            buf, n = self.buf, len(self.buf)
            pos = self.pos
            while pos < n and buf[pos] in _WHITESPACE:
                pos += 1
            self.pos = pos
            if pos < n:
                return buf[pos]
            if not self.fill():
                return ""

    def line_col(self, pos: int | None = None) -> tuple[int, int]:
        """1-based line and column of a buffer position. Positions are usually asked in increasing order, so the
        newline count continues from the last answer (a rescan per record would be quadratic in the chunk)."""
        pos = self.pos if pos is None else pos
        if pos < self._mark:
            self._mark, self._mark_lines, self._mark_nl = 0, 0, -1
        newlines = self.buf.count("\n", self._mark, pos)
        if newlines:
            self._mark_nl = self.buf.rfind("\n", self._mark, pos)
            self._mark_lines += newlines
        self._mark = pos
        if self._mark_nl >= 0:
            return self.lines_before + self._mark_lines + 1, pos - self._mark_nl
        return self.lines_before + 1, self.col_before + pos + 1

    def decode_value(self) -> object:
        """Decode the JSON value at the cursor, reading more text as needed; raises JSONDecodeError (position in
        the buffer) when the value is broken."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self.fill(grow=True):
                    continue
                _DECODER.raw_decode(self.buf, self.pos)  # fill() moved the text: raise again with fresh positions
                raise
            # A number or literal that ends exactly at the buffer end may go on in the next chunk.
            if end == len(self.buf) and self.fill():
                continue
            self.pos = end
            return value


class StreamError(Exception):
    def __init__(self, message: str, line: int, col: int) -> None:
        super().__init__(f"line {line}, column {col}: {message}")
        self.line, self.col, self.message = line, col, message


def _error_at(buf: _TextBuffer, message: str, pos: int | None = None) -> StreamError:
    line, col = buf.line_col(pos)
    return StreamError(message, line, col)


def _decode_or_raise(buf: _TextBuffer) -> object:
    try:
        return buf.decode_value()
    except json.JSONDecodeError as err:
        raise _error_at(buf, err.msg, err.pos) from None


def _iter_array(buf: _TextBuffer, counter: list[int]) -> Iterator[Item]:
    """Elements of the array whose '[' is at the cursor."""
    buf.pos += 1
    if buf.skip_ws() == "]":
        buf.pos += 1
        return
    while True:
        line, _ = buf.line_col()
        value = _decode_or_raise(buf)
        yield Item(counter[0], line, value)
        counter[0] += 1
        nxt = buf.skip_ws()
        if nxt == ",":
            buf.pos += 1
            buf.skip_ws()
        elif nxt == "]":
            buf.pos += 1
            return
        else:
            raise _error_at(buf, "Expecting ',' delimiter or ']'" if nxt else "Unterminated array")


def _iter_object(buf: _TextBuffer, counter: list[int]) -> Iterator[Item]:
    """An object at the cursor: the elements of a wrapper list (``{"qa_pairs": [...]}``) are streamed; any other
    object is one record."""
    start_line, _ = buf.line_col()
    buf.pos += 1
    fields: dict = {}
    streamed = False
    nxt = buf.skip_ws()
    while nxt != "}":
        if nxt != '"':
            raise _error_at(buf, "Expecting property name enclosed in double quotes" if nxt else "Unterminated object")
        key = _decode_or_raise(buf)
        if buf.skip_ws() != ":":
            raise _error_at(buf, "Expecting ':' delimiter")
        buf.pos += 1
        if buf.skip_ws() == "[" and key in WRAPPER_KEYS and not streamed:
            streamed = True
            yield from _iter_array(buf, counter)
        else:
            fields[key] = _decode_or_raise(buf)
        nxt = buf.skip_ws()
        if nxt == ",":
            buf.pos += 1
            nxt = buf.skip_ws()
            if nxt == "}":
                raise _error_at(buf, "Expecting property name enclosed in double quotes")
        elif nxt != "}":
            raise _error_at(buf, "Expecting ',' delimiter" if nxt else "Unterminated object")
    buf.pos += 1
    if not streamed:
        yield Item(counter[0], start_line, fields)
        counter[0] += 1


def iter_json_items(fh: IO[bytes], chunk_chars: int = CHUNK_CHARS) -> Iterator[Item]:
    """Record-like values of a JSON document: array elements, wrapper-list elements, or a lone object.

    Several top-level values one after another (JSON Lines saved as ``.json``) are read in turn. A syntax error
    ends the file with one fatal ``Item`` that says where; everything before it has been yielded.
    """
    buf = _TextBuffer(fh, chunk_chars)
    counter = [0]
    try:
        first = True
        while True:
            nxt = buf.skip_ws()
            if nxt == "":
                if first:
                    yield Item(None, 1, error="empty file", reason="empty_file", fatal=True)
                return
            if first and nxt == "\ufeff":  # byte order mark
                buf.pos += 1
                continue
            first = False
            if nxt == "[":
                yield from _iter_array(buf, counter)
            elif nxt == "{":
                yield from _iter_object(buf, counter)
            else:
                line, _ = buf.line_col()
                value = _decode_or_raise(buf)
                yield Item(counter[0], line, value)
                counter[0] += 1
    except StreamError as err:
        yield Item(counter[0], err.line, error=str(err), reason="invalid_json", fatal=True)


def iter_jsonl_items(fh: IO[bytes]) -> Iterator[Item]:
    """One value per non-blank line; a broken line is reported (line and column) and the next one is read."""
    for index, raw in enumerate(fh):
        if not raw.strip():
            continue
        if index == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        text = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield Item(index, index + 1, error=f"line {index + 1}, column {err.colno}: {err.msg}",
                       reason="invalid_json")
            continue
        yield Item(index, index + 1, value)


def iter_file_items(path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[Item]:
    """Items of a ``.json`` or ``.jsonl`` file, streamed. Open errors become one fatal item."""
    try:
        fh = open(path, "rb")
    except OSError as err:
        yield Item(None, 1, error=f"cannot read: {err.strerror}", reason="unreadable_file", fatal=True)
        return
    with fh:
        if path.suffix == ".jsonl":
            yield from iter_jsonl_items(fh)
        else:
            yield from iter_json_items(fh, chunk_chars)
