"""Hugging Face tokenizers, both ways: a Hugging Face tokenizer folder as the pipeline's tokenizer (tokenizer.type=hf),
and our sentencepiece model written as a folder AutoTokenizer loads.

In: `HfTokenizer` opens a folder such as a BART or mBART checkpoint's (tokenizer files + config.json) behind the
sentencepiece Tokenizer's interface. The project keeps one fact about special ids: pad=0, unk=1, bos=2, eos=3,
mask=4, sep=5 (artifacts.py), which the model, objectives, collators and decoding rely on. A checkpoint numbers them
its own way (BART: bos 0, pad 1, eos 2, unk 3, mask 50264), so the folder's ids are permuted onto ours:
`vocab_order[our id]` is the checkpoint's id. The checkpoint's config.json is the source of truth for pad, bos and
eos (its pad_token_id / bos_token_id / eos_token_id; the tokenizer must agree), the tokenizer's own special tokens
give unk, mask and (when it has a separate one) sep. The permutation swaps those ids into slots 0..5 and leaves
every other id where it is. Token ids leave this class as ours; model/hf.py permutes the embedding rows with the
same `vocab_order` on import and back on export, so the checkpoint's logits are reproduced exactly (the rest of
the code never sees the checkpoint's numbering). Sources and targets are encoded without the tokenizer's own
special tokens (add_special_tokens=False), as the sentencepiece tokenizer does: the collators add bos/eos.

Out: `save_sentencepiece_as_hf` writes our .model with a transformers slow tokenizer class that runs the
sentencepiece model itself (BertGenerationTokenizer: sentencepiece encode, piece -> id, no special tokens added),
so AutoTokenizer gives our ids exactly. A fast `tokenizers` Unigram built from the pieces cannot: its lattice
matches control pieces such as "<unk>" inside text (Gigaword's sources are full of the literal "<unk>", which
sentencepiece spells out as characters), so the result would differ on real data. split_special_tokens keeps the
tokenizer from matching "<s>", "<unk>" ... in text as well; "<mask>" and "<sep>" are sentencepiece user symbols,
matched by the model as our tokenizer does.
"""
from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from data_pipeline.artifacts import NUM_SPECIAL, SPECIAL_NAMES, fingerprint, sha256_file
from data_pipeline.errors import DataError

MODEL_CONFIG = "config.json"  # the checkpoint's config beside its tokenizer: pad/bos/eos ids and vocab_size
SEP_TEXT = "[SEP]"  # as data_pipeline.tokenizer: GLGE's segment marker in dialogue/QA sources
REQUIRED = ("pad", "bos", "eos", "mask")  # what the model, objectives and decoding use; unk and sep are optional
WORD_START = ("\u2581", "\u0120")  # sentencepiece's "▁" and byte-level BPE's "Ġ" begin a word


def vocab_order(special: dict[str, int], size: int) -> list[int]:
    """our id -> checkpoint id: the checkpoint's id of each special (by name) moved to ours (SPECIAL_NAMES order) by
    swaps; every other id stays where it is unless a swap moved it."""
    order, where = list(range(size)), list(range(size))  # where[checkpoint id] = our id
    for ours, name in enumerate(SPECIAL_NAMES):
        theirs = special.get(name)
        if theirs is None:
            continue
        other = where[theirs]
        order[ours], order[other] = order[other], order[ours]
        where[order[ours]], where[order[other]] = ours, other
    return order


class HfTokenizer:
    """A Hugging Face tokenizer folder with its ids mapped onto the project's (see the module docstring)."""

    kind = "hf"

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(folder).resolve()
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path}: cannot load as a Hugging Face tokenizer ({err})") from None
        config = self.path / MODEL_CONFIG
        model_config = json.loads(config.read_text()) if config.is_file() else {}
        self.special = self._special_ids(model_config)
        self.vocab_size = len(self.hf)
        self.padded_vocab_size = int(model_config.get("vocab_size") or -(-self.vocab_size // 128) * 128)
        if self.padded_vocab_size < self.vocab_size:
            raise DataError(f"{config}: vocab_size={self.padded_vocab_size} is smaller than the tokenizer's "
                            f"{self.vocab_size} ids")
        self.vocab_order = vocab_order(self.special, self.padded_vocab_size)
        self._to_ours = np.argsort(np.asarray(self.vocab_order))
        hf_sep = self.hf.sep_token_id  # BART's is </s>: then "[SEP]" becomes our eos, as BART would write it
        self.sep_id = None if hf_sep is None else int(self._to_ours[hf_sep])
        files = {name: sha256_file(self.path / name) for name in self.files() if name != MODEL_CONFIG}
        self.checksum = fingerprint({"files": files, "special": self.special, "vocab": self.padded_vocab_size})

    def _special_ids(self, model_config: dict) -> dict[str, int]:
        """The checkpoint's special ids by our names: pad/bos/eos from its config.json (checked against the
        tokenizer), unk/mask/sep from the tokenizer."""
        hf = self.hf
        special = {"pad": hf.pad_token_id, "unk": hf.unk_token_id, "bos": hf.bos_token_id, "eos": hf.eos_token_id,
                   "mask": hf.mask_token_id}
        for name in ("pad", "bos", "eos"):
            configured = model_config.get(f"{name}_token_id")
            if configured is None:
                continue
            if special[name] is not None and special[name] != configured:
                raise DataError(f"{self.path / MODEL_CONFIG}: {name}_token_id={configured}, but the tokenizer's "
                                f"{name} token {getattr(hf, f'{name}_token')!r} has id {special[name]}")
            special[name] = int(configured)
        missing = [name for name in REQUIRED if special[name] is None]
        if missing:
            raise DataError(f"{self.path}: the tokenizer has no {' / '.join(f'{n}_token' for n in missing)}; the "
                            "project's model, objectives and decoding need pad, bos, eos and mask tokens")
        if hf.sep_token_id is not None and hf.sep_token_id not in special.values():
            special["sep"] = hf.sep_token_id
        special = {name: int(i) for name, i in special.items() if i is not None}
        if len(set(special.values())) != len(special):
            raise DataError(f"{self.path}: special tokens share ids ({special}); each must have its own id")
        return special

    def files(self) -> list[str]:
        """The tokenizer's files in its folder (what save_pretrained writes), and the model config when present."""
        names = [*self.hf.vocab_files_names.values(), "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", MODEL_CONFIG]
        return sorted({name for name in names if (self.path / name).is_file()})

    def encode(self, text: str) -> list[int]:
        return self._to_ours[self.hf.encode(text, add_special_tokens=False)].tolist()

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        batch = self.hf(list(texts), add_special_tokens=False)["input_ids"]
        return [self._to_ours[ids].tolist() for ids in batch]

    def encode_with_sep(self, text: str) -> list[int]:
        """Encode, turning each literal "[SEP]" into the tokenizer's separator (kept as text when it has none)."""
        if SEP_TEXT not in text or self.sep_id is None:
            return self.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SEP_TEXT)):
            if i:
                ids.append(self.sep_id)
            ids.extend(self.encode(part.strip()))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        theirs = [self.vocab_order[int(i)] for i in ids if 0 <= int(i) < self.padded_vocab_size]
        return self.hf.decode([i for i in theirs if i < self.vocab_size], skip_special_tokens=True)

    def piece(self, i: int) -> str:
        return self.hf.convert_ids_to_tokens(self.vocab_order[int(i)])

    @cached_property
    def word_start_table(self) -> np.ndarray:
        """bool[vocab_size] by our ids: pieces that begin a word ("▁..." or byte-level "Ġ...")."""
        pieces = self.hf.convert_ids_to_tokens([self.vocab_order[i] for i in range(self.vocab_size)])
        table = np.asarray([str(p).startswith(WORD_START) for p in pieces], dtype=bool)
        table[:NUM_SPECIAL] = True
        return table

    @cached_property
    def sentence_end_ids(self) -> np.ndarray:
        ends = [i for i in range(NUM_SPECIAL, self.vocab_size)
                if self.piece(i).rstrip("\"')»”’").endswith((".", "!", "?"))]
        return np.asarray(ends, dtype=np.int64)

    def copy_into(self, folder: Path) -> str:
        """Copy the tokenizer (and the config holding its special ids) into folder/hf_tokenizer; returns that name."""
        target = Path(folder) / "hf_tokenizer"
        target.mkdir(parents=True, exist_ok=True)
        for name in self.files():
            shutil.copyfile(self.path / name, target / name)
        return target.name

    def save_hf(self, folder: Path) -> None:
        """The tokenizer files as they are (an export writes its own config.json, with these special ids)."""
        for name in self.files():
            if name != MODEL_CONFIG:
                shutil.copyfile(self.path / name, Path(folder) / name)


def save_sentencepiece_as_hf(model_file: Path, folder: Path) -> None:
    """Our sentencepiece model as a Hugging Face tokenizer folder (see the module docstring for the class)."""
    from transformers import BertGenerationTokenizer

    tokenizer = BertGenerationTokenizer(str(model_file), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", sep_token="<sep>", mask_token="<mask>",
                                        split_special_tokens=True)
    tokenizer.save_pretrained(str(folder))
