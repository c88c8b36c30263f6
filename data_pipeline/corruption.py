"""Pretraining corruption (BANG span masking, ELMER/BART sentence permutation + span infilling) and the collator
that turns a planned batch of samples into the pretraining batch dict. Runs inside the loader workers.

Randomness is explicit: the objective of a batch comes from (seed, epoch, batch index) — the same on every
data-parallel rank, as ZeRO-3 needs — and each sample's
corruption from (seed, epoch, sample id, objective). Nothing uses a global RNG, so a resumed run reproduces every
batch exactly.

Batch dict (shapes: B samples, S source length, T target length; pad id 0 unless said otherwise):
  objective      "bang" or "elmer"
  src_tokens     Long[B, S]  encoder input (corrupted text)
  tgt_tokens     Long[B, T]  targets
  prev_tokens    Long[B, T]  main-stream decoder input: the original token before each target (BOS at position 0)
  tgt_positions  Long[B, T]  1-based position of each target in the original text (0 at pad)
  span_index     Long[B, T]  BANG: index inside its masked span (0..span_len-1); ELMER: 0..T-1; -1 at pad
  span_counts    list[int]   real targets per span_index value (span_counts[k]: how many have span_index k), on
                             the host: objectives size their gathers from it without asking the GPU (BANG)
  sample_ids     Long[B]     global, stable sample ids (manifest order)
  n_tokens       int         non-pad target tokens in the batch (the loss normaliser, fairseq's ntokens)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from data_pipeline.config import CorruptionConfig
from data_pipeline.tokenizer import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL

OBJECTIVES = ("bang", "elmer")
_OBJECTIVE_CODE = {"bang": 1, "elmer": 2}


@dataclass
class CorruptionTables:
    """What corruption needs to know about the vocabulary (computed once from the tokenizer, sent to workers)."""

    vocab_size: int  # real pieces: random replacements are drawn from [NUM_SPECIAL, vocab_size)
    word_start: np.ndarray  # bool[vocab_size]
    sentence_end: np.ndarray  # bool[vocab_size]

    @classmethod
    def from_tokenizer(cls, tok) -> "CorruptionTables":
        ends = np.zeros(tok.vocab_size, dtype=bool)
        ends[tok.sentence_end_ids] = True
        return cls(tok.vocab_size, tok.word_start_table.copy(), ends)


def sample_rng(seed: int, epoch: int, sample_id: int, objective: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, int(sample_id), _OBJECTIVE_CODE[objective]])


def choose_objective(weights: Mapping[str, float], seed: int, epoch: int, batch_index: int) -> str:
    """The objective of global step `batch_index`. Deliberately the same on every data-parallel rank: under ZeRO-3
    all ranks must run the same modules in the same order, since parameters are gathered module by module."""
    names = sorted(weights)
    if len(names) == 1:
        return names[0]
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch, batch_index, 0x0B])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def normalize_weights(weights: Mapping[str, float] | Sequence[str] | str) -> dict[str, float]:
    """{"bang": 0.5, "elmer": 0.5}, ["bang"] or "bang" -> validated weights (a single objective is weight 1)."""
    from data_pipeline.errors import ConfigError

    if isinstance(weights, str):
        weights = {weights: 1.0}
    elif not isinstance(weights, Mapping):
        weights = {w: 1.0 for w in weights}
    out = {}
    for name, w in dict(weights).items():
        if name not in OBJECTIVES:
            raise ConfigError(f"objective_weights: unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
        if not (float(w) >= 0.0 and math.isfinite(float(w))):
            raise ConfigError(f"objective_weights.{name}: weight must be a finite number >= 0, got {w!r}")
        if float(w) > 0:
            out[name] = float(w)
    if not out:
        raise ConfigError(f"objective_weights: at least one objective needs a weight > 0, got {dict(weights)}")
    return out


# ---- BANG (methods.md 1.4) -----------------------------------------------------------------------------------
def bang_corrupt(x: np.ndarray, rng: np.random.Generator, cfg: CorruptionConfig, tables: CorruptionTables) -> dict:
    """One contiguous span per block of `bang_block` tokens (floor(ratio * block) long, at least 1; shorter for a
    short final block); span tokens become <mask> / a random token / stay, with probabilities 0.8 / 0.1 / 0.1."""
    n = len(x)
    positions, span_index = [], []
    for b0 in range(0, n, cfg.bang_block):
        block = min(cfg.bang_block, n - b0)
        span = max(1, math.floor(cfg.bang_span_ratio * block + 1e-9))
        start = b0 + int(rng.integers(0, block - span + 1))
        positions.append(np.arange(start, start + span))
        span_index.append(np.arange(span))
    pos = np.concatenate(positions)
    src = x.copy()
    u = rng.random(len(pos))
    to_mask = u < cfg.bang_mask_prob
    to_random = (u >= cfg.bang_mask_prob) & (u < cfg.bang_mask_prob + cfg.bang_random_prob)
    src[pos[to_mask]] = MASK_ID
    src[pos[to_random]] = rng.integers(NUM_SPECIAL, tables.vocab_size, int(to_random.sum()))
    prev = np.where(pos > 0, x[np.maximum(pos - 1, 0)], BOS_ID)
    return {"src": src, "tgt": x[pos], "prev": prev, "pos": pos + 1, "span": np.concatenate(span_index)}


# ---- ELMER / BART (methods.md 2.2) ---------------------------------------------------------------------------
def permute_sentences(x: np.ndarray, rng: np.random.Generator, tables: CorruptionTables) -> np.ndarray:
    ends = np.flatnonzero(tables.sentence_end[x]) + 1  # a sentence ends after its end token
    bounds = np.concatenate([[0], ends[ends < len(x)], [len(x)]])
    sentences = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if len(sentences) < 2:
        return x.copy()
    return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])


def span_lengths(num_to_mask: int, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson(lam) span lengths whose sum is exactly num_to_mask (the last one truncated); zeros are insertions."""
    draws = rng.poisson(lam, size=max(4, int(2 * num_to_mask / lam) + 4))
    while draws.sum() < num_to_mask:
        draws = np.concatenate([draws, rng.poisson(lam, size=len(draws))])
    csum = draws.cumsum()
    last = int(np.searchsorted(csum, num_to_mask))  # first index where the running sum reaches num_to_mask
    lengths = draws[: last + 1].copy()
    lengths[last] = num_to_mask - (csum[last - 1] if last > 0 else 0)
    return lengths


def elmer_corrupt(x: np.ndarray, rng: np.random.Generator, cfg: CorruptionConfig, tables: CorruptionTables,
                  info: dict | None = None) -> dict:
    """Sentence permutation, then whole-word span infilling: ceil(ratio * words) words are covered by spans with
    Poisson lengths, placed at random without overlap; each span becomes one <mask> (a random token for
    `elmer_random_ratio` of the spans); zero-length spans insert a <mask>. Target: the original text + EOS.
    `info`, when given, receives the drawn quantities (for the statistics tests)."""
    y = permute_sentences(x, rng, tables) if cfg.elmer_permute_sentences else x.copy()
    word_start = tables.word_start[y].copy()
    word_start[0] = True
    starts = np.flatnonzero(word_start)
    n_words = len(starts)
    num_to_mask = math.ceil(cfg.elmer_mask_ratio * n_words)
    if num_to_mask == 0:
        src = y
    else:
        lengths = span_lengths(num_to_mask, cfg.elmer_poisson_lambda, rng)
        k = len(lengths)
        slots = np.zeros(n_words - num_to_mask + k, dtype=bool)  # kept words and spans, interleaved at random
        slots[rng.choice(len(slots), size=k, replace=False)] = True
        replacement = np.where(rng.random(k) < cfg.elmer_random_ratio,
                               rng.integers(NUM_SPECIAL, tables.vocab_size, k), MASK_ID)
        advance = np.ones(len(slots), dtype=np.int64)  # words consumed by each slot: 1 for a kept word
        advance[slots] = lengths
        span_first_word = (advance.cumsum() - advance)[slots]
        # +1 at each span's first word, -1 after its last; the running sum is > 0 on covered words
        cover = np.bincount(span_first_word, minlength=n_words + 1) - \
            np.bincount(span_first_word + lengths, minlength=n_words + 1)
        covered_word = cover.cumsum()[:n_words] > 0
        keep = ~covered_word[word_start.astype(np.int64).cumsum() - 1]  # per token of y
        kept_before = np.concatenate([[0], keep.astype(np.int64).cumsum()])
        at_token = np.append(starts, len(y))[span_first_word]  # each span's <mask> goes where its words were
        src = np.insert(y[keep], kept_before[at_token], replacement)
        if info is not None:
            info.update(n_words=n_words, num_to_mask=num_to_mask, span_lengths=lengths, permuted=y,
                        kept=y[keep], replacement=replacement, random_spans=int((replacement != MASK_ID).sum()))
    src = src.astype(np.int64)
    tgt = np.append(x, EOS_ID)
    t = len(tgt)
    return {"src": src, "tgt": tgt, "prev": np.concatenate([[BOS_ID], tgt[:-1]]), "pos": np.arange(1, t + 1),
            "span": np.arange(t)}


CORRUPT = {"bang": bang_corrupt, "elmer": elmer_corrupt}


# ---- collation -----------------------------------------------------------------------------------------------
def pad_stack(rows: Sequence[np.ndarray], pad: int) -> np.ndarray:
    """int64 [len(rows), longest] (numpy: workers send numpy arrays, the loader makes tensors in the trainer
    process; tensors would each cross the process boundary through a shared-memory file, which costs more)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def to_torch(batch: dict, pin_memory: bool = False) -> dict:
    """numpy arrays -> torch tensors (zero copy; with pin_memory, one copy into page-locked memory, from which a
    CUDA copy runs asynchronously); other values unchanged."""
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if pin_memory:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


@dataclass
class PretrainCollator:
    """Planned samples -> one pretraining batch. The objective is drawn per batch, the corruption per sample."""

    cfg: CorruptionConfig
    tables: CorruptionTables
    weights: dict[str, float]
    seed: int

    def __call__(self, samples: Sequence[tuple[int, dict[str, np.ndarray]]], epoch: int, batch_index: int) -> dict:
        objective = choose_objective(self.weights, self.seed, epoch, batch_index)
        fn = CORRUPT[objective]
        out = [fn(s["tok"], sample_rng(self.seed, epoch, sid, objective), self.cfg, self.tables) for sid, s in samples]
        span = np.concatenate([o["span"] for o in out])
        return {
            "objective": objective,
            "src_tokens": pad_stack([o["src"] for o in out], 0),
            "tgt_tokens": pad_stack([o["tgt"] for o in out], 0),
            "prev_tokens": pad_stack([o["prev"] for o in out], 0),
            "tgt_positions": pad_stack([o["pos"] for o in out], 0),
            "span_index": pad_stack([o["span"] for o in out], -1),
            "span_counts": np.bincount(span).tolist(),
            "sample_ids": np.asarray([sid for sid, _ in samples], dtype=np.int64),
            "n_tokens": int(sum(len(o["tgt"]) for o in out)),
        }
