"""The sentencepiece tokenizer trained on the tiny corpus: fixed special ids, padded vocab, round trip on real text."""
import hashlib
import unicodedata

import pytest

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import (BOS_ID, EOS_ID, MASK_ID, META_FILE, PAD_ID, SEP_ID, UNK_ID, Tokenizer,
                                     train_tokenizer)


@pytest.fixture(scope="session")
def tok(tiny):
    return Tokenizer.load(tiny.in_work(tiny.tokenizer.out_dir))


def _normalized(text: str) -> str:
    # sentencepiece's default normalisation (nmt_nfkc) is NFKC plus whitespace collapsing
    return " ".join(unicodedata.normalize("NFKC", text).split())


def test_special_ids_sizes_and_checksum(tok):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID) == (0, 1, 2, 3, 4, 5)
    assert [tok.piece(i) for i in range(6)] == ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>"]
    assert tok.vocab_size == 4000
    assert tok.padded_vocab_size == 4096 and tok.padded_vocab_size % 128 == 0
    assert tok.checksum == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    assert Tokenizer.load(tok.path).checksum == tok.checksum  # a folder or the .model file
    # the record is not named tokenizer.json, which is Hugging Face's fast-tokenizer file
    assert META_FILE == "tandem_tokenizer.json" and (tok.path.parent / META_FILE).is_file()
    assert not (tok.path.parent / "tokenizer.json").exists()


@pytest.mark.parametrize("rel,limit", [("iwslt14-de-en/valid.de", 2000), ("iwslt14-de-en/valid.en", 2000),
                                       ("glge/gigaword/valid.src", 1000), ("wikitext-2/valid.txt", 1000)])
def test_round_trip_on_real_text(tok, shared_data, rel, limit):
    lines = [l for l in (shared_data / rel).read_text(encoding="utf-8").split("\n") if l.strip()][:limit]
    mismatches = [l for l in lines if tok.decode(tok.encode(l)) != _normalized(l)]
    assert mismatches == []  # byte fallback: even characters unseen in training (German umlauts) come back
    ids = [i for l in lines for i in tok.encode(l)]
    assert all(6 <= i < tok.vocab_size for i in ids)  # plain text never produces special ids
    assert ids.count(UNK_ID) == 0


def test_decode_skips_special_ids_and_padding_slots(tok):
    text = "Achilles was the son of the Nereid Thetis."
    ids = tok.encode(text)
    noisy = [BOS_ID] + ids[:3] + [MASK_ID, SEP_ID] + ids[3:] + [EOS_ID, PAD_ID, PAD_ID, tok.vocab_size + 5]
    assert tok.decode(noisy) == text
    assert tok.decode([]) == ""


def test_sep_markers_become_the_sep_id(tok):
    ids = tok.encode_with_sep("i like dogs . [SEP] hello , how are you ?")
    assert ids == tok.encode("i like dogs .") + [SEP_ID] + tok.encode("hello , how are you ?")
    assert tok.decode(ids) == "i like dogs . hello , how are you ?"


def test_rerun_is_a_no_op_and_missing_model_is_an_error(tiny, tok, tmp_path):
    before = tok.path.stat().st_mtime_ns
    train_tokenizer(tiny)
    assert tok.path.stat().st_mtime_ns == before
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer.load(tmp_path / "nothing")
