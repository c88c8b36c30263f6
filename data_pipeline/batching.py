"""Epoch planning: which samples each (data-parallel rank, loader worker) reads, in which order, in which batches.

The plan is computed from the manifest and the per-sample lengths alone (no shard is read), identically in every
process, so it is the single source of truth for
  * the split: the epoch's shard order (seeded shuffle) is laid end to end and cut into dp_world_size contiguous,
    equal ranges (by sample count), each cut again into one range per loader worker. A range covers whole shards
    plus at most a part of a shard at each end ("pieces"); ranks never share a sample.
  * the order: inside each piece a seeded shuffle buffer (webdataset-style: fill, then emit a random element and
    replace it) reorders the samples; the buffer restarts at every piece, so any piece can be replayed alone.
  * the batches: consecutive windows of max(bucket_window, batch_size) shuffled samples are sorted by length
    (bucket_window=1: not sorted) and cut into batches of at most `batch_size` samples and `max_tokens` padded
    tokens; the batch order inside a window is shuffled again.
  * equal batch counts: every stream (rank x worker) must yield the same number of batches, or a rank would
    wait forever at a collective. Streams with fewer batches split their largest batches in two until they
    match the longest stream. No sample is dropped or repeated.
Everything is seeded from (seed, epoch, shard, piece start), never from the rank or the worker id, so tensor-
parallel peers (same dp rank) get identical plans, and a resumed run gets the same plan as the first one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class BatchingSpec:
    batch_size: int  # max samples per batch
    max_tokens: int  # max padded tokens per batch (batch * longest cost); 0 = off
    shuffle: bool
    shuffle_buffer: int
    bucket_window: int

    def key(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


@dataclass
class Piece:
    """A contiguous run of one shard's samples, and the batches (sample-id arrays, in yield order) made from it."""

    shard: int  # index into the manifest's shard list
    start: int  # first sample index inside the shard
    count: int
    batches: list[np.ndarray] = field(default_factory=list)


@dataclass
class StreamPlan:
    pieces: list[Piece]

    @property
    def num_batches(self) -> int:
        return sum(len(p.batches) for p in self.pieces)

    @property
    def num_samples(self) -> int:
        return sum(p.count for p in self.pieces)


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    return [(total * i // parts, total * (i + 1) // parts) for i in range(parts)]


def _pieces(order: list[int], shards: list[dict], lo: int, hi: int) -> list[Piece]:
    """Pieces covering positions [lo, hi) of the shards laid end to end in `order`."""
    out, offset = [], 0
    for idx in order:
        n = shards[idx]["samples"]
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            out.append(Piece(idx, a - offset, b - a))
        offset += n
    return out


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 as a streaming shuffle buffer of `size` would emit them."""
    if n <= 1:
        return np.arange(n)
    size = min(size, n)
    buf = list(range(size))
    picks = rng.integers(0, size, n - size)
    out = np.empty(n, dtype=np.int64)
    for i, item in enumerate(range(size, n)):
        j = picks[i]
        out[i] = buf[j]
        buf[j] = item
    out[n - size:] = np.asarray(buf)[rng.permutation(size)]
    return out


def cut_batches(ids: np.ndarray, cost: np.ndarray, spec: BatchingSpec) -> list[np.ndarray]:
    """Greedy batches in order: at most batch_size samples and max_tokens padded tokens (size * longest cost)."""
    batches, start, longest = [], 0, 0
    for i in range(len(ids)):
        size, longer = i + 1 - start, max(longest, int(cost[i]))
        if i > start and (size > spec.batch_size or (spec.max_tokens > 0 and size * longer > spec.max_tokens)):
            batches.append(ids[start:i])
            start, longer = i, int(cost[i])
        longest = longer
    if len(ids):
        batches.append(ids[start:])
    return batches


def piece_batches(piece: Piece, first_id: int, cost: np.ndarray, spec: BatchingSpec, seed: int,
                  epoch: int) -> list[np.ndarray]:
    ids = first_id + piece.start + np.arange(piece.count, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, piece.shard, piece.start, 0x5A])
    if spec.shuffle:
        ids = ids[shuffle_buffer_order(len(ids), spec.shuffle_buffer, rng)]
    batches: list[np.ndarray] = []
    chunk = max(spec.bucket_window, spec.batch_size)
    for w in range(0, len(ids), chunk):
        window = ids[w: w + chunk]
        if spec.bucket_window > 1:
            window = window[np.argsort(cost[window], kind="stable")]
        window_batches = cut_batches(window, cost[window], spec)
        if spec.shuffle and len(window_batches) > 1:
            window_batches = [window_batches[i] for i in rng.permutation(len(window_batches))]
        batches.extend(window_batches)
    return batches


def equalize(stream: StreamPlan, target: int, where: str) -> None:
    """Split the largest batches (in place, halves kept in order) until the stream has `target` batches."""
    missing = target - stream.num_batches
    while missing > 0:
        best = None
        for piece in stream.pieces:
            for j, b in enumerate(piece.batches):
                if len(b) > 1 and (best is None or len(b) > len(best[0].batches[best[1]])):
                    best = (piece, j)
        if best is None:
            raise DataError(f"{where}: a loader stream has only {stream.num_samples} samples but must yield "
                            f"{target} batches like the others; use fewer data-parallel ranks or loader workers")
        piece, j = best
        b = piece.batches[j]
        piece.batches[j: j + 1] = [b[: len(b) // 2], b[len(b) // 2:]]
        missing -= 1


def plan_epoch(shards: list[dict], cost: np.ndarray, *, spec: BatchingSpec, seed: int, epoch: int,
               dp_world_size: int, num_workers: int, where: str = "") -> list[list[StreamPlan]]:
    """Plans for every rank and worker: result[dp_rank][worker]. `shards` are the manifest entries in use."""
    workers = max(1, num_workers)
    order = list(range(len(shards)))
    if spec.shuffle:
        order = [int(i) for i in np.random.default_rng([seed, epoch, 0x5D]).permutation(len(shards))]
    total = sum(s["samples"] for s in shards)
    if total < dp_world_size * workers:
        raise DataError(f"{where}: {total} samples cannot feed {dp_world_size} ranks x {workers} workers")
    plans: list[list[StreamPlan]] = []
    for r_lo, r_hi in _split(total, dp_world_size):
        rank_streams = []
        for w_lo, w_hi in _split(r_hi - r_lo, workers):
            pieces = _pieces(order, shards, r_lo + w_lo, r_lo + w_hi)
            for p in pieces:
                p.batches = piece_batches(p, shards[p.shard]["first_id"], cost, spec, seed, epoch)
            rank_streams.append(StreamPlan(pieces))
        plans.append(rank_streams)
    target = max(s.num_batches for rank in plans for s in rank)
    for rank in plans:
        for stream in rank:
            equalize(stream, target, where)
    return plans


def plan_key(manifest_fingerprint: str, spec: BatchingSpec, extra: str = "") -> str:
    """Identifies everything a plan depends on besides (seed, epoch, world, workers); stored in the loader state."""
    return hashlib.sha256(f"{manifest_fingerprint}|{spec.key()}|{extra}".encode()).hexdigest()[:16]
