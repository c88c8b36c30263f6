"""The extracted-document format, shared by extract, tokenizer and shards: compressed JSONL files of
{"id", "source", "title", "text"} (paragraphs joined by "\\n"), written reproducibly, read back with bad lines
counted; overlong documents split at paragraph and sentence ends; bad UTF-8 decoded with counted replacements.
"""
from __future__ import annotations

import bz2
import codecs
import collections
import gzip
import io
import json
import logging
import re
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

# ---- bad UTF-8: decode with a counting replacement handler ---------------------------------------------------
_BAD_UTF8 = [0]


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _BAD_UTF8[0] += 1
    return "\ufffd", exc.end


codecs.register_error("tandem_count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode, replacing invalid sequences with U+FFFD; returns (text, number of invalid sequences)."""
    before = _BAD_UTF8[0]
    text = data.decode("utf-8", errors="tandem_count_replace")
    return text, _BAD_UTF8[0] - before


class RepairingUTF8Reader:
    """File-like wrapper for the XML parser: yields valid UTF-8 bytes and counts the invalid sequences it replaced."""

    def __init__(self, raw: io.BufferedIOBase, chunk: int = 1 << 16):
        self.raw = raw
        self.chunk = chunk
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="tandem_count_replace")
        self.bad = 0

    def read(self, n: int = -1) -> bytes:
        while True:
            data = self.raw.read(max(n, self.chunk) if n and n > 0 else self.chunk)
            before = _BAD_UTF8[0]
            text = self.decoder.decode(data, final=not data)
            self.bad += _BAD_UTF8[0] - before
            if text or not data:  # an empty result mid-file only means a split multi-byte character
                return text.encode("utf-8")


def open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


# ---- documents: writing, reading, splitting ------------------------------------------------------------------
class DocWriter:
    """Writes documents to `{prefix}-{k:04d}.jsonl.gz`, `per_file` documents per file (gzip mtime 0: reproducible)."""

    def __init__(self, out_dir: Path, prefix: str, per_file: int):
        self.out_dir, self.prefix, self.per_file = out_dir, prefix, per_file
        self.files: list[Path] = []
        self._fh: Any = None
        self._count = 0

    def write(self, doc: dict) -> None:
        if self._fh is None or self._count >= self.per_file:
            self.close()
            path = self.out_dir / f"{self.prefix}-{len(self.files):04d}.jsonl.gz"
            raw = open(path, "wb")
            self._fh = (raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
            self.files.append(path)
            self._count = 0
        self._fh[1].write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
        self._count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh[1].close()
            self._fh[0].close()
            self._fh = None


def read_docs(path: Path, stats: collections.Counter | None = None) -> Iterator[dict]:
    """Documents of one JSONL(.gz) file. Undecodable or malformed lines are counted and skipped, with a warning
    naming the file and line."""
    stats = stats if stats is not None else collections.Counter()
    try:
        with open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                text, bad = decode_utf8(raw)
                if bad:
                    stats["bad_utf8_lines"] += 1
                try:
                    doc = json.loads(text)
                    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                        raise ValueError("not an object with a 'text' string")
                except ValueError as exc:
                    stats["bad_json_lines"] += 1
                    log.warning("%s:%d: skipped malformed document line (%s)", path, lineno, exc)
                    continue
                yield doc
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read document file ({exc})") from None


def split_overlong(paragraphs: list[str], max_chars: int) -> list[list[str]]:
    """Group paragraphs into pieces of at most max_chars; a single paragraph that is too long is cut at sentence
    ends (or spaces). Nothing is dropped."""
    pieces: list[list[str]] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        for part in cut_paragraph(para, max_chars):
            if current and size + len(part) + 1 > max_chars:
                pieces.append(current)
                current, size = [], 0
            current.append(part)
            size += len(part) + 1
    if current:
        pieces.append(current)
    return pieces


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def cut_paragraph(para: str, max_chars: int) -> list[str]:
    if len(para) <= max_chars:
        return [para]
    out: list[str] = []
    current = ""
    for sent in _SENTENCE_END.split(para):
        while len(sent) > max_chars:  # one enormous "sentence": cut at the last space before the limit
            cut = sent.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if current:
                out.append(current)
                current = ""
            out.append(sent[:cut].strip())
            sent = sent[cut:].strip()
        if current and len(current) + 1 + len(sent) > max_chars:
            out.append(current)
            current = sent
        else:
            current = f"{current} {sent}" if current else sent
    if current:
        out.append(current)
    return [p for p in out if p]


def emit_document(writer: DocWriter, stats: collections.Counter, cfg: DataConfig, doc_id: str, source: str,
                  title: str, paragraphs: list[str]) -> None:
    """Write one document: empty ones are counted and skipped, overlong ones are split and counted."""
    paragraphs = [p for p in (q.strip() for q in paragraphs) if p]
    if sum(len(p) for p in paragraphs) < cfg.extract.min_doc_chars:
        stats["empty_docs"] += 1
        return
    pieces = split_overlong(paragraphs, cfg.extract.max_doc_chars)
    if len(pieces) > 1:
        stats["overlong_docs_split"] += 1
        stats["overlong_pieces"] += len(pieces)
    for i, piece in enumerate(pieces):
        piece_id = doc_id if len(pieces) == 1 else f"{doc_id}#{i}"
        writer.write({"id": piece_id, "source": source, "title": title, "text": "\n".join(piece)})
        stats["docs"] += 1
        stats["chars"] += sum(len(p) for p in piece)


def doc_files(docs_dir: Path) -> list[Path]:
    files = sorted(docs_dir.glob("*.jsonl.gz")) + sorted(docs_dir.glob("*.jsonl"))
    if not files:
        raise DataError(f"{docs_dir}: no extracted documents (*.jsonl.gz); run `python -m data_pipeline extract`")
    return files


def iter_all_docs(files: Iterable[Path], stats: collections.Counter | None = None) -> Iterator[dict]:
    for path in files:
        yield from read_docs(path, stats)
