"""BANG and ELMER corruption on real shard samples: structure of the batch fields and statistics against the
configured rates (stated tolerances are about 4 standard deviations for the sample sizes used)."""
import math

import numpy as np
import pytest

from data_pipeline.config import CorruptionConfig
from data_pipeline.corruption import (CorruptionTables, PretrainCollator, bang_corrupt, choose_objective,
                                      elmer_corrupt, sample_rng, to_torch)
from data_pipeline.shards import load_manifest, read_piece
from data_pipeline.tokenizer import BOS_ID, EOS_ID, MASK_ID, Tokenizer


@pytest.fixture(scope="session")
def samples(tiny):
    """1500 real samples: the first 500 of three different shards (books, Wikipedia, WikiText)."""
    shard_dir = tiny.in_work("shards")
    m = load_manifest(shard_dir)
    out = []
    for s in (m["shards"][0], m["shards"][len(m["shards"]) // 2], m["shards"][-1]):
        out += [(i, x["tok"]) for i, x in read_piece(shard_dir / s["name"], s["first_id"], 0, 500, ["tok"], "uint16")]
    return out


@pytest.fixture(scope="session")
def tables(tiny):
    return CorruptionTables.from_tokenizer(Tokenizer.load(tiny.in_work("tokenizer")))


def test_bang_span_masking_structure_and_rates(samples, tables):
    cfg = CorruptionConfig()
    masked = unchanged = random = span_tokens = 0
    for sid, x in samples:
        out = bang_corrupt(x, sample_rng(0, 0, sid, "bang"), cfg, tables)
        pos = out["pos"] - 1
        # one contiguous span per 64-token block: 9 tokens for a full block, floor(0.15 * L) (>= 1) for a short one
        blocks = [min(64, len(x) - b) for b in range(0, len(x), 64)]
        spans = [max(1, math.floor(0.15 * L + 1e-9)) for L in blocks]
        assert len(pos) == sum(spans)
        assert out["span"].tolist() == [j for n in spans for j in range(n)]
        starts = np.cumsum([0] + spans[:-1])
        for b, (st, n) in enumerate(zip(starts, spans)):
            block_pos = pos[st: st + n]
            assert np.all(np.diff(block_pos) == 1) and block_pos[0] >= 64 * b and block_pos[-1] < 64 * b + blocks[b]
        assert np.array_equal(out["tgt"], x[pos])
        assert np.array_equal(out["prev"], np.where(pos > 0, x[np.maximum(pos - 1, 0)], BOS_ID))
        outside = np.ones(len(x), dtype=bool)
        outside[pos] = False
        assert np.array_equal(out["src"][outside], x[outside])  # only span tokens are touched
        src = out["src"][pos]
        masked += int((src == MASK_ID).sum())
        same = src == x[pos]
        unchanged += int(same.sum())
        random += int(((src != MASK_ID) & ~same).sum())
        span_tokens += len(pos)
    assert span_tokens > 20000
    assert abs(masked / span_tokens - 0.8) < 0.012
    assert abs(unchanged / span_tokens - 0.1) < 0.01  # a random draw equal to the original counts here (p=1/4000)
    assert abs(random / span_tokens - 0.1) < 0.01
    total = sum(len(x) for _, x in samples)
    assert 0.13 < span_tokens / total < 0.15  # floor(0.15 * 64) = 9 per full block; floor(0.15 * L) in short ones


def test_elmer_infilling_structure_and_rates(samples, tables):
    cfg = CorruptionConfig()
    spans = []
    random_spans = total_spans = words = covered = 0
    for sid, x in samples:
        info = {}
        out = elmer_corrupt(x, sample_rng(0, 0, sid, "elmer"), cfg, tables, info)
        assert np.array_equal(out["tgt"], np.append(x, EOS_ID))
        assert np.array_equal(out["prev"], np.concatenate([[BOS_ID], x]))
        assert out["pos"].tolist() == list(range(1, len(x) + 2)) and out["span"].tolist() == list(range(len(x) + 1))
        assert info["num_to_mask"] == math.ceil(0.3 * info["n_words"])  # 30% of word starts, exactly
        lengths = info["span_lengths"]
        assert lengths.sum() == info["num_to_mask"]
        # each span becomes one token; the covered words' tokens are deleted
        n_mask = int((out["src"] == MASK_ID).sum())
        assert n_mask + info["random_spans"] == len(lengths)
        assert len(out["src"]) == len(info["kept"]) + len(lengths)
        assert sorted(out["src"].tolist()) == sorted(info["kept"].tolist() + info["replacement"].tolist())
        assert sorted(info["permuted"].tolist()) == sorted(x.tolist())  # permutation keeps every token
        if len(lengths) > 1:
            # The first span is a plain Poisson draw; later ones are not (the draws stop once they cover
            # num_to_mask words, which favours a long last draw and short ones before it).
            spans.append(int(lengths[0]))
        random_spans += info["random_spans"]
        total_spans += len(lengths)
        words += info["n_words"]
        covered += info["num_to_mask"]
    spans = np.asarray(spans)
    assert abs(covered / words - 0.3) < 0.01
    n = len(spans)
    assert n > 1400
    assert abs(spans.mean() - 3.5) < 4 * math.sqrt(3.5 / n)  # Poisson(3.5): mean 3.5 ...
    assert abs(spans.var() - 3.5) < 0.7  # ... variance 3.5 ...
    p0 = math.exp(-3.5)
    assert abs((spans == 0).mean() - p0) < 4 * math.sqrt(p0 * (1 - p0) / n)  # ... and 3% zero-length (insertions)
    assert abs(random_spans / total_spans - 0.1) < 4 * math.sqrt(0.09 / total_spans)


def test_elmer_infilling_removes_30_percent_of_words_in_the_output(samples, tables):
    """The words actually missing from the corrupted source, counted on the output (not the planned span lengths):
    with random replacements off every span is one <mask>, so the source without its masks is the permuted text
    minus the covered words. Their count must be ceil(0.3 x words) in every sample."""
    cfg = CorruptionConfig(elmer_random_ratio=0.0)
    words = removed = 0
    for sid, x in samples:
        info = {}
        out = elmer_corrupt(x, sample_rng(0, 0, sid, "elmer"), cfg, tables, info)
        y, src = info["permuted"], out["src"]
        kept = src[src != MASK_ID]
        assert len(src) - len(kept) == len(info["span_lengths"])  # one <mask> per span, insertions included
        it = iter(y.tolist())
        assert all(t in it for t in kept.tolist())  # kept tokens: y in order, some tokens left out
        n_words = int(tables.word_start[y].sum()) + int(not tables.word_start[y[0]])  # y's first token starts one
        # Kept words are whole: each starts with a word-start piece, or is y's first word (kept iff src keeps y[0]
        # in front; when y[0] is itself a word-start piece the sum already counts it).
        first_kept = len(kept) > 0 and kept[0] == y[0] and not tables.word_start[y[0]]
        sample_removed = n_words - int(tables.word_start[kept].sum()) - int(first_kept)
        assert sample_removed == math.ceil(0.3 * n_words), sid
        words += n_words
        removed += sample_removed
    assert words > 50000
    assert abs(removed / words - 0.3) < 0.01


def test_sentence_permutation_keeps_sentences_whole(samples, tables):
    cfg = CorruptionConfig(elmer_mask_ratio=0.0)
    changed = 0
    for sid, x in samples[:300]:
        src = elmer_corrupt(x, sample_rng(0, 0, sid, "elmer"), cfg, tables)["src"]
        ends = np.flatnonzero(tables.sentence_end[x]) + 1
        bounds = np.concatenate([[0], ends[ends < len(x)], [len(x)]])
        sentences = sorted(tuple(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        ends2 = np.flatnonzero(tables.sentence_end[src]) + 1
        bounds2 = np.concatenate([[0], ends2[ends2 < len(src)], [len(src)]])
        pieces = [tuple(src[a:b]) for a, b in zip(bounds2[:-1], bounds2[1:])]
        # the output is the same sentences in another order (the unterminated last piece may join another one)
        assert sorted(src.tolist()) == sorted(x.tolist())
        if len(sentences) > 2 and tables.sentence_end[x[-1]]:
            assert sorted(pieces) == sentences
        changed += not np.array_equal(src, x)
    assert changed > 200


def test_corruption_is_reproducible_per_sample_and_epoch(samples, tables):
    cfg = CorruptionConfig()
    sid, x = samples[7]
    for fn, name in ((bang_corrupt, "bang"), (elmer_corrupt, "elmer")):
        a = fn(x, sample_rng(5, 2, sid, name), cfg, tables)
        b = fn(x, sample_rng(5, 2, sid, name), cfg, tables)
        c = fn(x, sample_rng(5, 3, sid, name), cfg, tables)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert not np.array_equal(a["src"], c["src"])  # a new epoch corrupts differently


def test_objective_mix_follows_the_weights(samples, tables):
    for weights, expect in (({"bang": 0.5, "elmer": 0.5}, 0.5), ({"bang": 0.8, "elmer": 0.2}, 0.8), ({"bang": 1.0}, 1.0)):
        picks = [choose_objective(weights, 3, 0, b) for b in range(4000)]
        frac = picks.count("bang") / len(picks)
        assert abs(frac - expect) < 4 * math.sqrt(expect * (1 - expect) / 4000) + 1e-9
    # seeded by (seed, epoch, batch index) only: a new seed or epoch changes the sequence
    mix = {"bang": 1, "elmer": 1}
    assert [choose_objective(mix, 3, 0, b) for b in range(50)] == [choose_objective(mix, 3, 0, b) for b in range(50)]
    assert [choose_objective(mix, 3, 0, b) for b in range(50)] != [choose_objective(mix, 4, 0, b) for b in range(50)]
    assert [choose_objective(mix, 3, 0, b) for b in range(50)] != [choose_objective(mix, 3, 1, b) for b in range(50)]


def test_the_collator_mixes_objectives_per_batch(samples, tables):
    """The objective depends on no rank (see choose_objective); test_data_stream checks it across real DP ranks."""
    mix = {"bang": 0.5, "elmer": 0.5}
    batch_samples = [(sid, {"tok": x}) for sid, x in samples[:4]]
    collate = PretrainCollator(CorruptionConfig(), tables, mix, seed=1)
    picks = [collate(batch_samples, 0, b)["objective"] for b in range(20)]
    assert set(picks) == {"bang", "elmer"}


def test_collated_pretraining_batch_contract(samples, tables):
    batch_samples = [(sid, {"tok": x}) for sid, x in samples[:8]]
    for weights in ({"bang": 1.0}, {"elmer": 1.0}):
        collate = PretrainCollator(CorruptionConfig(), tables, weights, seed=1)
        b = to_torch(collate(batch_samples, epoch=0, batch_index=0))
        B = len(batch_samples)
        assert b["objective"] == next(iter(weights))
        T = b["tgt_tokens"].shape[1]
        for k in ("tgt_tokens", "prev_tokens", "tgt_positions", "span_index"):
            assert b[k].shape == (B, T) and b[k].dtype.is_floating_point is False
        assert b["src_tokens"].shape[0] == B and b["sample_ids"].tolist() == [s for s, _ in batch_samples]
        pad = b["tgt_tokens"] == 0
        assert (b["tgt_positions"][pad] == 0).all() and (b["span_index"][pad] == -1).all()
        assert (b["prev_tokens"][pad] == 0).all()
        assert b["n_tokens"] == int((~pad).sum())
        # span counts on the host (a list, not a tensor): real targets per span index, as the tensor has them
        assert b["span_counts"] == np.bincount(b["span_index"][~pad].numpy()).tolist()
        assert isinstance(b["span_counts"], list) and sum(b["span_counts"]) == b["n_tokens"]
