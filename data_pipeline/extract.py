"""`extract`: raw corpora -> clean plain-text documents in compressed JSONL files.

Sources:
  * Wikipedia `pages-articles` XML dumps, streamed (bz2 or plain) with mwxml; wikitext is cleaned with
    mwparserfromhell (templates, tables, references, files, categories, interlanguage links, headings and the
    reference/link sections are removed). Redirects and non-article namespaces are skipped and counted.
  * Plain-text books (Project Gutenberg headers and licence footers stripped, paragraphs from blank lines,
    wrapped lines joined); a book is one document before overlong splitting.
  * WikiText files (one article per ` = Title = ` heading; ` @-@ ` style escapes undone).
Output (the format of data_pipeline/documents.py): `{out_dir}/{source}-{file stem}-{k:04d}.jsonl.gz`, one JSON
object per line (`id`, `source`, `title`, `text`; paragraphs separated by "\\n"), and `extract_stats.json` with the counts of
everything skipped or repaired. Re-running replaces the previous output (it never appends).

Input that is not text never becomes a document: a book or WikiText file with a NUL byte, or with more control
characters or undecodable UTF-8 than `extract.max_control_char_ratio` / `max_bad_utf8_ratio` of its characters,
stops the run with a DataError naming it (`extract.non_text_files=error`, the default) or is left out, counted
(`non_text_files_skipped`) and listed with the reason (`non_text_files` in extract_stats.json) with `skip`. A
Wikipedia dump that is not text fails as malformed XML.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import multiprocessing as mp
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import mwparserfromhell
from mwparserfromhell.nodes import Argument, Comment, Heading, Tag, Template, Wikilink
from mwparserfromhell.wikicode import Wikicode
import mwxml

from configs import progress
from data_pipeline.artifacts import STATS_FILE, fingerprint, read_record, staging_for, swap_in
from data_pipeline.config import SOURCE_KINDS, DataConfig, ExtractConfig, to_plain
from data_pipeline.documents import DocWriter, RepairingUTF8Reader, decode_utf8, emit_document, open_binary
from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

# ---- Wikipedia ------------------------------------------------------------------------------------------------
DROP_TAGS = {
    "ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source",
    "graph", "templatedata", "hiero", "chem", "ce", "mapframe", "maplink", "noinclude", "includeonly", "inputbox",
    "categorytree", "nowiki", "pre", "code",
}
DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "works cited", "gallery",
}
LINK_NAMESPACES = {
    "file", "image", "media", "category", "wikipedia", "wp", "template", "help", "portal", "special", "user",
    "talk", "wikt", "wiktionary", "commons", "s", "q", "n", "b", "v", "voy", "species", "meta", "mw", "wikisource",
}
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")  # interlanguage links: [[de:...]], [[zh-min-nan:...]]
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[;,]\s*)*\)")  # "( ; , )" left where pronunciation templates were
_LEADING_PUNCT_IN_PARENS = re.compile(r"\(\s*(?:[;,]\s*)+")
_SPACES = re.compile(r"[ \t\u00a0]+")
# Markup the parser could not pair up (broken tables, unclosed links) survives as text; such lines are dropped.
LEFTOVER_MARKUP = ("[[", "]]", "{{", "}}", "{|", "|}", "<ref", "</ref")


def _drop(node: Any) -> bool:
    if isinstance(node, (Template, Argument, Comment, Heading)):
        return True
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in DROP_TAGS
    if isinstance(node, Wikilink):
        title = str(node.title).strip()
        if ":" in title and not title.startswith(":"):
            prefix = title.split(":", 1)[0].strip().lower()
            return prefix in LINK_NAMESPACES or bool(_LANGUAGE_PREFIX.match(prefix))
    return False


def _filter(code: Wikicode, top: bool = False) -> None:
    """Remove unwanted nodes from the parse tree in one walk (Wikicode.remove searches the whole tree per call,
    which is quadratic on long articles). At the top level, whole reference/link sections are dropped."""
    kept, skip_level = [], 0
    for node in code.nodes:
        if top and isinstance(node, Heading):
            title = node.title.strip_code().strip().lower()
            if skip_level and node.level <= skip_level:
                skip_level = 0
            if not skip_level and node.level == 2 and title in DROP_SECTIONS:
                skip_level = 2
        if skip_level or _drop(node):
            continue
        for child in (getattr(node, "contents", None), getattr(node, "text", None), getattr(node, "title", None)):
            if isinstance(child, Wikicode) and not isinstance(node, Heading):
                _filter(child)
        kept.append(node)
    code.nodes = kept


def _strip_pass(text: str) -> str:
    code = mwparserfromhell.parse(text)
    _filter(code, top=True)
    return code.strip_code(normalize=True, collapse=True)


def clean_wikitext(text: str) -> tuple[list[str], int]:
    """Wikitext -> paragraphs of plain text, and the number of lines dropped for leftover markup.

    A second parser pass runs when markup is left: it catches constructs that only became parseable once their
    broken surroundings were gone (e.g. a <ref> after an unbalanced quote)."""
    plain = _strip_pass(text)
    if any(m in plain for m in LEFTOVER_MARKUP):
        plain = _strip_pass(plain)
    plain = _MAGIC_WORD.sub("", plain)
    paragraphs, dropped = [], 0
    for line in plain.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if not line:
            continue
        if line.startswith(("|", "!")) or any(m in line for m in LEFTOVER_MARKUP):
            dropped += 1
            continue
        line = _LEADING_PUNCT_IN_PARENS.sub("(", _EMPTY_PARENS.sub("", line))
        line = _SPACES.sub(" ", line).strip()
        if line:
            paragraphs.append(line)
    return paragraphs, dropped


def _clean_page(item: tuple[int, str, str]) -> tuple[int, str, list[str], int]:
    page_id, title, text = item
    paragraphs, dropped = clean_wikitext(text)
    return page_id, title, paragraphs, dropped


def iter_wiki_pages(path: Path, stats: collections.Counter) -> Iterator[tuple[int, str, str]]:
    """(page id, title, wikitext) of every article page, streamed; redirects and other namespaces are counted."""
    raw = open_binary(path)
    reader = RepairingUTF8Reader(raw)
    try:
        dump = mwxml.Dump.from_file(reader)
        for page in dump:
            revision = None
            for revision in page:  # the last revision is the current text; always drain the iterator
                pass
            stats["wiki_pages"] += 1
            if page.redirect:
                stats["wiki_redirects_skipped"] += 1
                continue
            if page.namespace != 0:
                stats["wiki_non_article_skipped"] += 1
                continue
            yield page.id, page.title, (revision.text if revision is not None and revision.text else "")
    except (EOFError, OSError) as exc:
        raise DataError(f"{path}: truncated or unreadable dump ({exc})") from None
    except Exception as exc:  # XML parse errors from a broken dump
        if type(exc).__name__ in ("ParseError", "MalformedXMLException"):
            raise DataError(f"{path}: malformed XML ({exc})") from None
        raise
    finally:
        stats["bad_utf8_sequences"] += reader.bad
        raw.close()


def extract_wikipedia(path: Path, cfg: DataConfig, out_dir: Path, stats: collections.Counter, pool: Any) -> list[Path]:
    writer = DocWriter(out_dir, f"wikipedia-{_stem(path)}", cfg.extract.docs_per_file)
    pages = iter_wiki_pages(path, stats)
    batch_size = max(1, cfg.extract.pages_per_task) * max(1, cfg.extract.num_workers)
    shown = progress.bar(desc=f"extract {path.name}", unit="page")  # a dump's page count is unknown until read
    while True:  # bounded batches: Pool.imap would read the whole dump ahead of the workers
        batch = list(itertools.islice(pages, batch_size))
        if not batch:
            break
        results = pool.map(_clean_page, batch, chunksize=max(1, cfg.extract.pages_per_task // 4)) if pool \
            else map(_clean_page, batch)
        for page_id, title, paragraphs, dropped in results:
            stats["markup_lines_dropped"] += dropped
            emit_document(writer, stats, cfg, f"wiki:{page_id}", "wikipedia", title, paragraphs)
        shown.update(len(batch))
    shown.close()
    writer.close()
    return writer.files


# ---- books ---------------------------------------------------------------------------------------------------
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)
_NLTK_TITLE = re.compile(r"^\[ .* \]$")  # NLTK's copies start with "[ Title by Author Year ]"


# C0 and C1 control characters other than tab, newline, form feed and carriage return, which text does contain.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


class NotText(DataError):
    """An input file that is not text: an executable or archive saved as .txt, a file in another encoding."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: not a text file ({why}); extract.non_text_files=skip leaves such files out and "
                         f"counts them in {STATS_FILE}")
        self.path, self.why = path, why


def not_text(chars: int, nul_bytes: int, control_chars: int, bad_utf8: int, ec: ExtractConfig) -> str:
    """Why a file with these counts is not text ("" when it is): any NUL byte, or more than the configured shares
    of control characters or undecodable UTF-8 sequences among its characters."""
    if nul_bytes:
        return f"{nul_bytes} NUL bytes"
    if chars and control_chars / chars > ec.max_control_char_ratio:
        return (f"{control_chars / chars:.1%} of its characters are control characters, more than "
                f"extract.max_control_char_ratio={ec.max_control_char_ratio}")
    if chars and bad_utf8 / chars > ec.max_bad_utf8_ratio:
        return (f"{bad_utf8 / chars:.1%} of its characters are undecodable UTF-8, more than "
                f"extract.max_bad_utf8_ratio={ec.max_bad_utf8_ratio}")
    return ""


def read_text_lines(path: Path, stats: collections.Counter, ec: ExtractConfig) -> list[str]:
    """Lines of a text input file; invalid UTF-8 is replaced and counted per line. A file that is not text
    (`not_text`) raises NotText naming it, before anything of it is counted or written."""
    lines = []
    chars = nul_bytes = control_chars = bad_utf8 = bad_lines = 0
    with open_binary(path) as fh:
        for raw in fh:
            nul_bytes += raw.count(b"\0")
            text, bad = decode_utf8(raw)
            chars += len(text)
            control_chars += len(_CONTROL.findall(text))
            bad_utf8 += bad
            bad_lines += bool(bad)
            lines.append(text.rstrip("\r\n"))
    why = not_text(chars, nul_bytes, control_chars, bad_utf8, ec)
    if why:
        raise NotText(path, why)
    stats["bad_utf8_lines"] += bad_lines
    return lines


def book_paragraphs(lines: list[str], stats: collections.Counter) -> tuple[str, list[str]]:
    """Strip Gutenberg header/footer; paragraphs are blocks separated by blank lines, wrapped lines joined."""
    title = ""
    start = next((i + 1 for i, l in enumerate(lines) if _GUTENBERG_START.search(l)), 0)
    end = next((i for i, l in enumerate(lines) if i >= start and _GUTENBERG_END.search(l)), len(lines))
    if start or end < len(lines):
        stats["gutenberg_boilerplate_stripped"] += 1
    body = lines[start:end]
    if body and _NLTK_TITLE.match(body[0].strip()):
        title = body[0].strip()[2:-2]
        body = body[1:]
    paragraphs: list[str] = []
    current: list[str] = []
    for line in body + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return title, paragraphs


def extract_book(path: Path, cfg: DataConfig, out_dir: Path, stats: collections.Counter) -> list[Path]:
    writer = DocWriter(out_dir, f"books-{_stem(path)}", cfg.extract.docs_per_file)
    lines = read_text_lines(path, stats, cfg.extract)
    title, paragraphs = book_paragraphs(lines, stats)
    if len(paragraphs) == 1 and len(paragraphs[0]) > cfg.extract.max_doc_chars:
        # No blank lines at all (e.g. NLTK's one-sentence-per-line copies): keep line boundaries for splitting.
        start = next((i + 1 for i, l in enumerate(lines) if _GUTENBERG_START.search(l)), 0)
        end = next((i for i, l in enumerate(lines) if i >= start and _GUTENBERG_END.search(l)), len(lines))
        paragraphs = [l.strip() for l in lines[start:end] if l.strip() and not _NLTK_TITLE.match(l.strip())]
    emit_document(writer, stats, cfg, f"book:{_stem(path)}", "books", title or _stem(path), paragraphs)
    stats["books"] += 1
    writer.close()
    return writer.files


# ---- WikiText ------------------------------------------------------------------------------------------------
_WT_TITLE = re.compile(r"^ = ([^=].*[^=]) = $")
_WT_HEADING = re.compile(r"^ (= )+.*( =)+ $")
_WT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def extract_wikitext(path: Path, cfg: DataConfig, out_dir: Path, stats: collections.Counter) -> list[Path]:
    writer = DocWriter(out_dir, f"wikitext-{_stem(path)}", cfg.extract.docs_per_file)
    title, paragraphs, index = "", [], 0

    def flush() -> None:
        nonlocal index
        if title or paragraphs:
            emit_document(writer, stats, cfg, f"wikitext:{_stem(path)}:{index}", "wikitext", title, paragraphs)
            index += 1

    for line in read_text_lines(path, stats, cfg.extract):
        m = _WT_TITLE.match(line)
        if m:
            flush()
            title, paragraphs = m.group(1).strip(), []
            continue
        if _WT_HEADING.match(line) or not line.strip():
            continue
        for escaped, plain in _WT_ESCAPES:
            line = line.replace(escaped, plain)
        paragraphs.append(line.strip())
    flush()
    writer.close()
    return writer.files


# ---- driver --------------------------------------------------------------------------------------------------
def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".bz2", ".gz", ".xml", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def _extract_text_file(extract: Any, path: Path, cfg: DataConfig, out_dir: Path, stats: collections.Counter,
                       non_text: list[dict]) -> list[Path]:
    """A book or WikiText file; one that is not text stops the run or (extract.non_text_files=skip) is left out,
    counted and listed."""
    try:
        return extract(path, cfg, out_dir, stats)
    except NotText as exc:
        if cfg.extract.non_text_files != "skip":
            raise
        log.warning("%s -- skipped", exc)
        stats["non_text_files_skipped"] += 1
        non_text.append({"file": str(path), "why": exc.why})
        return []


def run_extract(cfg: DataConfig, force: bool = False) -> dict:
    """Extract every configured source into `extract.out_dir`; returns the stats written to extract_stats.json.
    Skipped (returns the previous stats) when the inputs and the config are unchanged, unless force."""
    out_dir = cfg.in_work(cfg.extract.out_dir)
    staging = staging_for(out_dir)
    per_source: dict[str, collections.Counter] = {}
    files: list[Path] = []
    inputs = {kind: cfg.source_files(kind) for kind in SOURCE_KINDS}
    if not any(inputs.values()):
        raise DataError(f"{cfg.config_file or 'data config'}: no sources configured (sources.wikipedia/books/wikitext)")
    fp = fingerprint({"extract": to_plain(cfg.extract), "inputs": [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for v in inputs.values() for p in v]})
    old = read_record(out_dir / STATS_FILE)
    if not force and old.get("fingerprint") == fp and all((out_dir / f).is_file() for f in old.get("files", [])):
        log.info("extract: %s is up to date (same inputs and config); nothing to do", out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        return old
    workers = cfg.extract.num_workers
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and inputs["wikipedia"] else None
    try:
        for path in inputs["wikipedia"]:
            stats = per_source.setdefault("wikipedia", collections.Counter())
            files += extract_wikipedia(path, cfg, staging, stats, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    non_text: list[dict] = []
    text_files = [(extract_book, "books", p) for p in inputs["books"]] + \
        [(extract_wikitext, "wikitext", p) for p in inputs["wikitext"]]
    for extract, kind, path in progress.iterate(text_files, desc="extract", unit="file"):
        files += _extract_text_file(extract, path, cfg, staging, per_source.setdefault(kind, collections.Counter()),
                                    non_text)
    totals: collections.Counter = collections.Counter()
    for c in per_source.values():
        totals.update(c)
    result = {
        "inputs": {k: [str(p) for p in v] for k, v in inputs.items()},
        "files": [p.name for p in files],
        "per_source": {k: dict(v) for k, v in per_source.items()},
        "totals": dict(totals),
        "non_text_files": non_text,
        "config": {"extract": to_plain(cfg.extract), "sources": to_plain(cfg.sources)},
        "fingerprint": fp,
    }
    (staging / STATS_FILE).write_text(json.dumps(result, indent=2))
    swap_in(staging, out_dir)  # replace, never append: re-running does not duplicate
    log.info("extract: %d documents in %d files -> %s (%s)", totals["docs"], len(files), out_dir, dict(totals))
    return result
