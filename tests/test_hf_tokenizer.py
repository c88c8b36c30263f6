"""Tokenizers in Hugging Face's formats (data_pipeline/hf_tokenizer.py), with real components only: the tests'
sentencepiece model (tests/finetune_helpers.py builds it from ../shared/data), transformers' AutoTokenizer loading
offline, and a byte-level BPE trained with the `tokenizers` library on Gigaword text, numbered as BART is.

  * our sentencepiece model, written as a Hugging Face folder, gives our ids exactly on real text of every source in
    ../shared/data (Gigaword's literal "<unk>" included), and decodes back alike;
  * the tokenizer record's new name (tandem_tokenizer.json) and the old one (tokenizer.json) are both read;
  * a BART-numbered tokenizer (tokenizer.type=hf) gives the project's special ids through a permutation taken from
    the checkpoint's config.json, and refuses a config that disagrees with it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.artifacts import BOS_ID, EOS_ID, MASK_ID, PAD_ID, UNK_ID
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import MODEL_FILE, OLD_META_FILE, Tokenizer, load_tokenizer, meta_file
from finetune_helpers import CACHE, build_test_data
from hf_helpers import train_bart_style_tokenizer

LINES_PER_FILE = 1500
TEXT_FILES = ["glge/gigaword/valid.src", "glge/gigaword/valid.tgt", "wikitext-2/valid.txt", "iwslt14-de-en/valid.de",
              "books/gutenberg", *(f"glge/{task}" for task in ("cnndm", "xsum", "squadqg", "coqa", "personachat",
                                                               "msnews", "msqg"))]  # a folder: its first *.src or *.txt


@pytest.fixture(scope="module")
def sentencepiece_dir(shared_data) -> Path:
    build_test_data(shared_data)
    return CACHE / "tokenizer"


def real_lines(shared_data: Path) -> list[str]:
    """Non-empty lines from every kind of text in ../shared/data (one Gutenberg book); GLGE's "[SEP]" markers are
    the tokenizer's <sep> only through encode_with_sep, so lines holding them are left out."""
    lines = []
    for name in TEXT_FILES:
        path = shared_data / name
        if path.is_dir():
            path = sorted([*path.glob("*.src"), *path.glob("*.txt")])[0]
        text = path.read_text(encoding="utf-8", errors="replace")
        lines += [line for line in text.split("\n")[:LINES_PER_FILE] if line.strip() and "[SEP]" not in line]
    return lines


def test_sentencepiece_export_gives_our_ids_exactly(sentencepiece_dir, shared_data, tmp_path):
    from transformers import AutoTokenizer

    ours = load_tokenizer(sentencepiece_dir)
    assert isinstance(ours, Tokenizer) and ours.vocab_order is None
    ours.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id) == \
        (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID)
    lines = real_lines(shared_data)
    assert len(lines) > 7000 and sum("<unk>" in line for line in lines) > 100  # Gigaword writes "<unk>" as text
    theirs = hf(lines).input_ids
    mismatched = [line for line, ids in zip(lines, theirs) if ids != ours.encode(line)]
    assert mismatched == []
    sample = lines[:300]
    assert hf.batch_decode([ours.encode(line) for line in sample], skip_special_tokens=True) == \
        [ours.decode(ours.encode(line)) for line in sample]


def test_tokenizer_record_is_read_under_its_old_name(sentencepiece_dir, tmp_path):
    """Work folders and shards written before the rename hold `tokenizer.json`: still read (its pad_to_multiple
    decides the padded vocabulary); a Hugging Face tokenizer.json beside the model is not taken for it."""
    record = json.loads(meta_file(sentencepiece_dir).read_text())  # a cache built before the rename has the old
    assert record["checksum"] == Tokenizer.load(sentencepiece_dir).checksum
    old = tmp_path / "old"
    old.mkdir()
    shutil.copyfile(sentencepiece_dir / MODEL_FILE, old / MODEL_FILE)
    (old / OLD_META_FILE).write_text(json.dumps({**record, "pad_to_multiple": 768}))
    assert Tokenizer.load(old).padded_vocab_size == 1536  # lcm(128, 768) = 768: 1000 pieces -> 1536
    (old / OLD_META_FILE).write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {}}))  # an HF file
    assert Tokenizer.load(old).padded_vocab_size == 1024


def test_hf_tokenizer_maps_bart_numbering_onto_ours(shared_data, tmp_path):
    hf = train_bart_style_tokenizer(shared_data, tmp_path)
    n = len(hf)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "vocab_size": 1024, "pad_token_id": 1,
                                                      "bos_token_id": 0, "eos_token_id": 2}))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "hf" and (tok.vocab_size, tok.padded_vocab_size) == (n, 1024)
    assert tok.special == {"pad": 1, "unk": 3, "bos": 0, "eos": 2, "mask": n - 1}  # BART's sep is its eos: no own id
    assert tok.vocab_order[:5] == [1, 3, 0, 2, n - 1] and sorted(tok.vocab_order) == list(range(1024))
    assert tok.vocab_order[n - 1] == 4 and tok.vocab_order[5:n - 1] == list(range(5, n - 1))  # the rest stays put
    line = "the un security council met on monday in new york , diplomats said ."
    theirs = hf.encode(line, add_special_tokens=False)
    ours = tok.encode(line)
    assert ours == [tok.vocab_order.index(i) for i in theirs] and min(ours) > MASK_ID
    assert tok.decode([BOS_ID, *ours, EOS_ID, PAD_ID]) == line
    assert tok.encode_with_sep("a [SEP] b") == [*tok.encode("a"), EOS_ID, *tok.encode("b")]  # BART's sep is </s>
    assert tok.encode_many([line, "x"]) == [ours, tok.encode("x")]
    copy = tmp_path / "shard"
    copy.mkdir()
    assert load_tokenizer(copy / tok.copy_into(copy)).checksum == tok.checksum  # shards carry it

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1024, "pad_token_id": 0, "bos_token_id": 0,
                                                      "eos_token_id": 2}))
    with pytest.raises(DataError, match=r"config.json: pad_token_id=0, but the tokenizer's pad token '<pad>' has id 1"):
        load_tokenizer(tmp_path)


def test_hf_tokenizer_without_mask_is_refused(shared_data, tmp_path):
    hf = train_bart_style_tokenizer(shared_data, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("mask_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").unlink()
    assert hf.mask_token_id is not None
    with pytest.raises(DataError, match="the tokenizer has no mask_token"):
        load_tokenizer(tmp_path)
