"""`tokenizer`: train a sentencepiece model on a sample of the extracted text, and the `Tokenizer` wrapper.

Fixed ids (shared by the whole system, data_pipeline/artifacts.py): pad=0, unk=1, bos=2, eos=3, mask=4 ("<mask>"),
sep=5 ("<sep>"). `vocab_size` is the real number of pieces; `padded_vocab_size` rounds it up to a multiple of 128
(tensor parallelism splits the embedding by rows). `checksum` is the sha256 of the .model file; shard manifests
record it. Files written to `tokenizer.out_dir`: tokenizer.model, tokenizer.vocab, tandem_tokenizer.json (sizes,
checksum, config; named `tokenizer.json` before, which is Hugging Face's fast-tokenizer file: that name is still read).

`load_tokenizer(folder)` opens either kind the data config's `tokenizer.type` names: this sentencepiece model, or a
Hugging Face tokenizer folder (data_pipeline/hf_tokenizer.py's HfTokenizer, same interface). `save_hf` writes either
as a folder that transformers' AutoTokenizer loads.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import random
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from configs import progress
from data_pipeline.artifacts import (BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, UNK_ID, extract_stats,
                                     fingerprint, read_record, sha256_file, staging_for, swap_in)
from data_pipeline.config import DataConfig, to_plain
from data_pipeline.documents import cut_paragraph, doc_files, iter_all_docs
from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID))  # skipped by decode (unk is kept)
MODEL_FILE, META_FILE = "tokenizer.model", "tandem_tokenizer.json"
OLD_META_FILE = "tokenizer.json"  # the record's name in work folders and shards written before; still read
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # what marks a Hugging Face tokenizer folder
SEP_TEXT = "[SEP]"  # how GLGE's dialogue/QA sources mark segment boundaries; encoded as <sep>


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def meta_file(folder: Path) -> Path:
    """The tokenizer record in `folder`: tandem_tokenizer.json, or the old tokenizer.json when only that exists (a
    Hugging Face tokenizer.json has no `checksum`, so it is never mistaken for ours)."""
    new, old = folder / META_FILE, folder / OLD_META_FILE
    if new.is_file() or not old.is_file() or "checksum" not in read_record(old):
        return new
    return old


def load_tokenizer(path: str | Path):
    """The tokenizer in `path`: a sentencepiece model (a folder with tokenizer.model, or the .model file) or a
    Hugging Face tokenizer folder (tokenizer_config.json, tokenizer.type=hf)."""
    path = Path(path)
    if path.is_dir() and not (path / MODEL_FILE).is_file() and (path / HF_TOKENIZER_CONFIG).is_file():
        from data_pipeline.hf_tokenizer import HfTokenizer

        return HfTokenizer(path)
    return Tokenizer.load(path)


class Tokenizer:
    """A trained sentencepiece model with the project's fixed special ids."""

    kind = "sentencepiece"
    vocab_order = None  # its ids are the project's (HfTokenizer maps a Hugging Face tokenizer's onto them)

    def __init__(self, model_path: Path, pad_to_multiple: int = 128):
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.pad_to_multiple = pad_to_multiple
        self.checksum = sha256_file(self.path)
        expected = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>", MASK_ID: "<mask>", SEP_ID: "<sep>"}
        got = {i: self.sp.id_to_piece(i) for i in expected}
        if got != expected:
            raise DataError(f"{self.path}: special pieces {got} differ from the fixed ids {expected}")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a tokenizer folder (containing tokenizer.model) or a .model file."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise DataError(f"{model}: tokenizer model not found (run `python -m data_pipeline tokenizer`, or "
                            f"tokenizer.type=hf with tokenizer.path=<a Hugging Face tokenizer folder>)")
        multiple = 128
        meta = meta_file(model.parent)
        if meta.is_file():
            multiple = int(json.loads(meta.read_text()).get("pad_to_multiple", 128))
        return cls(model, multiple)

    def copy_into(self, folder: Path) -> str:
        """Copy the model (and its record) into `folder`, as shards carry their tokenizer; returns the name to
        load it by, relative to `folder`."""
        shutil.copyfile(self.path, folder / MODEL_FILE)
        meta = meta_file(self.path.parent)
        if meta.is_file():
            shutil.copyfile(meta, folder / META_FILE)
        return MODEL_FILE

    def save_hf(self, folder: Path) -> None:
        """Write the model as a Hugging Face tokenizer AutoTokenizer loads, giving these ids exactly."""
        from data_pipeline.hf_tokenizer import save_sentencepiece_as_hf

        save_sentencepiece_as_hf(self.path, folder)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def padded_vocab_size(self) -> int:
        return round_up(self.vocab_size, math.lcm(128, self.pad_to_multiple))  # always a multiple of 128

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts)) if texts else []

    def encode_with_sep(self, text: str) -> list[int]:
        """Encode, turning each literal "[SEP]" into the <sep> id (GLGE dialogue and QA sources)."""
        if SEP_TEXT not in text:
            return self.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SEP_TEXT)):
            if i:
                ids.append(SEP_ID)
            ids.extend(self.encode(part.strip()))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, skipping pad/bos/eos/mask/sep and ids in the padded tail of the vocabulary."""
        n = self.vocab_size
        return self.sp.decode([int(i) for i in ids if int(i) not in SPECIAL_IDS and 0 <= int(i) < n])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @cached_property
    def word_start_table(self) -> np.ndarray:
        """bool[vocab_size]: True for pieces that begin a word ("▁..."); used by whole-word span masking."""
        table = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            table[i] = self.sp.id_to_piece(i).startswith("\u2581")
        table[:NUM_SPECIAL] = True
        return table

    @cached_property
    def sentence_end_ids(self) -> np.ndarray:
        """Ids of pieces that end a sentence (".", "!", "?" at the end); used by sentence permutation."""
        ends = [i for i in range(NUM_SPECIAL, self.vocab_size)
                if not self.sp.is_byte(i) and self.sp.id_to_piece(i).rstrip("\"')»”’").endswith((".", "!", "?"))]
        return np.asarray(ends, dtype=np.int64)


def _training_sample(cfg: DataConfig, docs_dir: Path, out_file: Path) -> dict:
    """Write a deterministic sample of about `tokenizer.sample_chars` characters, one sentence-sized line each
    (sentencepiece skips lines longer than max_sentence_length)."""
    totals = extract_stats(docs_dir).get("totals", {})
    total = totals.get("chars", 0)
    rate = 1.0 if total <= 0 else min(1.0, cfg.tokenizer.sample_chars / total)
    rng = random.Random(cfg.tokenizer.seed)
    counts: collections.Counter = collections.Counter()
    with open(out_file, "w", encoding="utf-8") as out:
        docs = iter_all_docs(doc_files(docs_dir), counts)
        for doc in progress.iterate(docs, desc="tokenizer sample", unit="doc", total=totals.get("docs")):
            for para in doc["text"].split("\n"):
                if rng.random() >= rate:
                    continue
                for line in cut_paragraph(para, 2000):
                    out.write(line + "\n")
                    counts["sample_lines"] += 1
                    counts["sample_chars"] += len(line)
    return dict(counts)


def train_tokenizer(cfg: DataConfig, force: bool = False) -> Path:
    """Train on a sample of `extract.out_dir`; returns the folder with tokenizer.model. Skipped when the
    extracted documents and the tokenizer config are unchanged, unless force."""
    t = cfg.tokenizer
    if t.type == "hf":  # nothing to train: check that the folder opens
        tok = load_tokenizer(cfg.tokenizer_dir())
        log.info("tokenizer: tokenizer.type=hf, %d ids from %s (checksum %s)", tok.vocab_size, tok.path,
                 tok.checksum[:12])
        return tok.path
    docs_dir = cfg.in_work(cfg.extract.out_dir)
    out_dir = cfg.in_work(t.out_dir)
    docs_fp = extract_stats(docs_dir).get("fingerprint", "")
    settings = {k: v for k, v in to_plain(t).items() if k not in ("type", "path")}  # as before those fields existed
    fp = fingerprint({"tokenizer": settings, "docs": docs_fp})
    if not force and docs_fp and (out_dir / MODEL_FILE).is_file() and \
            read_record(meta_file(out_dir)).get("fingerprint") == fp:
        log.info("tokenizer: %s is up to date (same documents and config); nothing to do", out_dir)
        return out_dir
    staging = staging_for(out_dir)
    try:
        sample = staging / "sample.txt"
        counts = _training_sample(cfg, docs_dir, sample)
        if counts.get("sample_lines", 0) == 0:
            raise DataError(f"{docs_dir}: no text to train the tokenizer on")
        log.info("tokenizer: training sentencepiece (%s, %d pieces) on %d sample lines", t.model_type,
                 t.vocab_size, counts["sample_lines"])
        spm.set_random_generator_seed(t.seed)
        try:
            spm.SentencePieceTrainer.train(
                input=str(sample), model_prefix=str(staging / "tokenizer"), model_type=t.model_type,
                vocab_size=t.vocab_size, character_coverage=t.character_coverage, byte_fallback=t.byte_fallback,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                user_defined_symbols=["<mask>", "<sep>"], num_threads=t.num_threads,
                input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192, minloglevel=2,
            )
        except RuntimeError as exc:  # e.g. "Vocabulary size too high": name the field to change
            raise DataError(f"tokenizer training failed (tokenizer.vocab_size={t.vocab_size}, "
                            f"{counts['sample_chars']} sample characters): {exc}") from None
        sample.unlink()
        tok = Tokenizer(staging / MODEL_FILE, t.pad_to_multiple)
        meta = {
            "vocab_size": tok.vocab_size, "pad_to_multiple": t.pad_to_multiple,
            "padded_vocab_size": tok.padded_vocab_size, "checksum": tok.checksum,
            "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "mask": MASK_ID, "sep": SEP_ID},
            "sample": counts, "config": settings, "fingerprint": fp,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tokenizer: %d pieces (padded %d), checksum %s -> %s", meta["vocab_size"], meta["padded_vocab_size"],
             meta["checksum"][:12], out_dir)
    return out_dir
