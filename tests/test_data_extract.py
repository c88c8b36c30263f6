"""Extraction on the real files in ../shared/data: clean Wikipedia text, redirects skipped, books and WikiText
documents, and the bad-input cases (bad UTF-8, input files that are not text, empty documents, overlong documents,
truncated dump)."""
import bz2
import collections
import gzip
import json
import re
import shutil

import mwxml
import pytest

from data_pipeline.artifacts import STATS_FILE
from data_pipeline.config import REPO_ROOT, ExtractConfig, load_config
from data_pipeline.errors import ConfigError, DataError
from data_pipeline.documents import doc_files, iter_all_docs
from data_pipeline.extract import NotText, read_text_lines, run_extract

TINY = REPO_ROOT / "configs" / "data" / "tiny.yaml"
DUMP = "wikipedia/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _docs(cfg, source):
    return [d for d in iter_all_docs(doc_files(cfg.in_work(cfg.extract.out_dir))) if d["source"] == source]


def _only(cfg, tmp_path, **sources):
    """A config that extracts only the given sources into tmp_path."""
    overrides = [f"data_root={cfg.data_root}", f"work_dir={tmp_path}", "extract.num_workers=1"]
    for kind in ("wikipedia", "books", "wikitext"):
        overrides.append(f"sources.{kind}=[{','.join(sources.get(kind, []))}]")
    return load_config(TINY, overrides)


def test_wikipedia_text_is_clean_and_redirects_are_skipped(tiny, shared_data):
    # Independent count of what the dump holds, straight from mwxml.
    redirects, articles, other_ns = set(), set(), set()
    with bz2.open(shared_data / DUMP) as fh:
        for page in mwxml.Dump.from_file(fh):
            for _ in page:
                pass
            (redirects if page.redirect else articles if page.namespace == 0 else other_ns).add(page.id)
    assert len(redirects) == 100 and len(articles) == 106  # the one non-article page (ns 4) is a redirect too

    docs = _docs(tiny, "wikipedia")
    page_ids = {int(re.match(r"wiki:(\d+)", d["id"]).group(1)) for d in docs}
    assert not page_ids & redirects, "a redirect page was extracted"
    assert not page_ids & other_ns, "a non-article namespace page was extracted"
    assert len(page_ids) >= 100  # nearly every article has text left (a few are stubs of templates only)
    for d in docs:
        for markup in ("[[", "{{", "<ref", "|}"):
            assert markup not in d["text"], f"{markup!r} left in {d['id']}"
    stats = json.loads((tiny.in_work("docs") / STATS_FILE).read_text())["per_source"]["wikipedia"]
    assert stats["wiki_redirects_skipped"] == 100
    assert stats["wiki_pages"] == 206
    total_chars = sum(len(d["text"]) for d in docs)
    assert total_chars > 2_000_000  # the 105 articles are long: cleaning must not lose the prose
    anarchism = next(d for d in docs if d["title"] == "Anarchism")
    assert anarchism["text"].startswith("Anarchism is a political philosophy")


def test_books_and_wikitext_documents(tiny, shared_data):
    books = _docs(tiny, "books")
    text = "\n".join(d["text"] for d in books)
    assert "Project Gutenberg" not in text and "END OF THE PROJECT GUTENBERG" not in text
    assert not any(d["text"].startswith("[ ") for d in books)  # NLTK's "[ Title by Author ]" line is the title
    assert {d["id"].split("#")[0] for d in books} == {f"book:{p.stem}" for p in (shared_data / "books/gutenberg").glob("*.txt")}
    assert all(len(d["text"]) <= tiny.extract.max_doc_chars for d in books)

    wikitext = _docs(tiny, "wikitext")
    titles = {d["title"] for d in wikitext}
    lines = (shared_data / "wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines()
    expected = {l.strip()[2:-2].strip() for l in lines if re.match(r"^ = [^=].*[^=] = $", l)}
    assert titles == expected
    joined = "\n".join(d["text"] for d in wikitext)
    assert "@-@" not in joined and "\n = " not in joined


def test_bad_utf8_is_replaced_and_counted(tiny, shared_data, tmp_path):
    book = (shared_data / "books/gutenberg/carroll-alice.txt").read_bytes()
    lines = book.split(b"\n")
    for i in (10, 20, 30):
        lines[i] = lines[i][:5] + b"\xff\xfe\xc3" + lines[i][5:]
    (tmp_path / "in").mkdir()
    (tmp_path / "in/alice.txt").write_bytes(b"\n".join(lines))
    # A Wikipedia dump with an invalid byte inside an article: the real excerpt up to the end of "Anarchism".
    raw = bz2.decompress((shared_data / DUMP).read_bytes())
    cut = raw.index(b"</page>", raw.index(b"<title>Anarchism</title>")) + len(b"</page>")
    article = raw[:cut].replace(b"'''Anarchism''' is a [[political", b"'''Anarchism''' is a \xe9 [[political")
    (tmp_path / "in/dump.xml.bz2").write_bytes(bz2.compress(article + b"\n</mediawiki>\n"))
    cfg = _only(tiny, tmp_path / "out", books=[str(tmp_path / "in/alice.txt")], wikipedia=[str(tmp_path / "in/dump.xml.bz2")])
    stats = run_extract(cfg)
    assert stats["per_source"]["books"]["bad_utf8_lines"] == 3
    assert stats["per_source"]["wikipedia"]["bad_utf8_sequences"] == 1
    docs = list(iter_all_docs(doc_files(cfg.in_work("docs"))))
    anarchism = next(d for d in docs if d["title"] == "Anarchism")
    assert anarchism["text"].startswith("Anarchism is a \ufffd political philosophy")
    assert sum(d["text"].count("\ufffd") for d in docs if d["source"] == "books") >= 3


def test_binary_input_file_is_refused_or_skipped_and_counted(tiny, shared_data, tmp_path):
    """An executable saved as .txt among the books: refused naming it (default), or left out, counted and listed
    with extract.non_text_files=skip; it never becomes a document."""
    (tmp_path / "in").mkdir()
    shutil.copy(shared_data / "books/gutenberg/carroll-alice.txt", tmp_path / "in/alice.txt")
    shutil.copy(shutil.which("true"), tmp_path / "in/program.txt")
    cfg = _only(tiny, tmp_path / "out", books=[str(tmp_path / "in/*.txt")])
    with pytest.raises(DataError, match=r"program.txt: not a text file \(\d+ NUL bytes\); extract.non_text_files=skip"):
        run_extract(cfg)
    cfg.extract.non_text_files = "skip"
    stats = run_extract(cfg)
    assert stats["per_source"]["books"]["non_text_files_skipped"] == stats["totals"]["non_text_files_skipped"] == 1
    assert stats["per_source"]["books"]["books"] == 1
    assert [f["file"] for f in stats["non_text_files"]] == [str(tmp_path / "in/program.txt")]
    assert "NUL bytes" in stats["non_text_files"][0]["why"]
    docs = list(iter_all_docs(doc_files(cfg.in_work("docs"))))
    assert {d["id"].split("#")[0] for d in docs} == {"book:alice"}
    assert not any("\x00" in d["text"] for d in docs)


def test_control_characters_and_undecodable_bytes_over_their_thresholds(tmp_path):
    prose = ("It was the best of times, it was the worst of times. " * 40 + "\n").encode() * 10
    cases = {  # name: (bytes, refused with the default thresholds?)
        "controls.txt": (prose.replace(b"times", b"t\x1bmes", 300), True),  # ~1.4% ESC characters
        "few_controls.txt": (prose.replace(b"times", b"t\x1bmes", 50), False),  # ~0.2%
        "latin1.txt": (prose.replace(b"best", "b\u00e9st".encode("latin-1"), 400), False),  # ~1.9% bad: counted
        "garbled.txt": (prose.replace(b"times", b"\xff\xfe\xfd\xfc\xfb", 400), True),  # ~9% bad sequences
    }
    defaults = ExtractConfig()
    for name, (data, refused) in cases.items():
        (tmp_path / name).write_bytes(data)
        stats = collections.Counter()
        if refused:
            with pytest.raises(NotText, match=rf"{name}: not a text file \(\d+\.\d% of its characters are "):
                read_text_lines(tmp_path / name, stats, defaults)
            assert not stats  # nothing of a refused file is counted as text
        else:
            assert len(read_text_lines(tmp_path / name, stats, defaults)) == 10
            assert stats["bad_utf8_lines"] == (10 if name == "latin1.txt" else 0)
    loose = ExtractConfig(max_control_char_ratio=0.05, max_bad_utf8_ratio=0.2)
    for name in ("controls.txt", "garbled.txt"):
        assert len(read_text_lines(tmp_path / name, collections.Counter(), loose)) == 10
    with pytest.raises(ConfigError, match="extract.max_bad_utf8_ratio"):
        load_config(TINY, ["extract.max_bad_utf8_ratio=1.5"])
    with pytest.raises(ConfigError, match="extract.non_text_files"):
        load_config(TINY, ["extract.non_text_files=ignore"])


def test_empty_documents_are_counted_and_skipped(tiny, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/empty.txt").write_text("")
    (tmp_path / "in/blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "in/short.txt").write_text("Hi.\n")
    (tmp_path / "in/real.txt").write_text("A real paragraph of a book, long enough to keep.\n")
    cfg = _only(tiny, tmp_path / "out", books=[str(tmp_path / "in/*.txt")])
    stats = run_extract(cfg)["per_source"]["books"]
    assert stats["empty_docs"] == 3 and stats["docs"] == 1 and stats["books"] == 4


def test_overlong_documents_are_split_not_dropped(tiny, shared_data, tmp_path):
    cfg = _only(tiny, tmp_path, books=[str(shared_data / "books/gutenberg/carroll-alice.txt")])
    cfg.extract.max_doc_chars = 3000
    stats = run_extract(cfg)["per_source"]["books"]
    docs = list(iter_all_docs(doc_files(cfg.in_work("docs"))))
    assert stats["overlong_docs_split"] == 1 and stats["docs"] == len(docs) > 40
    assert all(len(d["text"]) <= 3000 for d in docs)
    # every line of the book survives, in order
    lines = [l.strip() for l in (shared_data / "books/gutenberg/carroll-alice.txt").read_text().splitlines()[1:] if l.strip()]
    assert [l for d in docs for l in d["text"].split("\n")] == lines


def test_rerun_replaces_output_instead_of_appending(tiny, tmp_path, shared_data):
    cfg = _only(tiny, tmp_path, wikitext=[str(shared_data / "wikitext-2/valid.txt")])
    first = run_extract(cfg)
    second = run_extract(cfg)  # up to date: nothing redone
    third = run_extract(cfg, force=True)
    assert first["files"] == second["files"] == third["files"]
    assert sum(1 for _ in iter_all_docs(doc_files(cfg.in_work("docs")))) == first["totals"]["docs"]


def test_truncated_dump_stops_with_an_error_naming_it(tiny, shared_data, tmp_path):
    data = (shared_data / DUMP).read_bytes()
    bad = tmp_path / "truncated.xml.bz2"
    bad.write_bytes(data[: len(data) // 3])
    cfg = _only(tiny, tmp_path / "out", wikipedia=[str(bad)])
    with pytest.raises(DataError, match="truncated.xml.bz2"):
        run_extract(cfg)


def test_malformed_document_lines_are_counted(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'{"id": "a", "source": "x", "title": "", "text": "fine"}\n{not json\n\xff\xfe\n')
        fh.write(b'{"id": "b", "source": "x", "title": "", "text": "also fine"}\n')
    stats = collections.Counter()
    docs = list(iter_all_docs([path], stats))
    assert [d["id"] for d in docs] == ["a", "b"]
    assert stats["bad_json_lines"] == 2 and stats["bad_utf8_lines"] == 1


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.model_type"):
        load_config(TINY, ["tokenizer.model_type=wordpiece"])
    with pytest.raises(ConfigError, match="loader.corruption.bang_mask_prob"):
        load_config(TINY, ["loader.corruption.bang_mask_prob=1.5"])
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(TINY, ["shard.no_such_key=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard:\n  seq_len: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*shard.seq_len"):
        load_config(bad)
    cfg = load_config(TINY, ["sources.books=[no/such/*.txt]"])
    with pytest.raises(ConfigError, match="sources.books"):
        cfg.source_files("books")
