"""`shard`: tokenize extracted documents and pack them into webdataset `.tar` shards plus `manifest.json`.

A pretraining sample is up to `shard.seq_len` tokens of one document: a longer document is split into
ceil(n / seq_len) near-equal samples (counted as `docs_split_into_samples`, never dropped); a document shorter
than `shard.min_sample_tokens` is counted (`too_short_docs`) and skipped. Each sample is one tar member
`{id:012d}.tok` holding little-endian token ids (`token_dtype` in the manifest). Sample ids are global and stable:
shard i holds ids first_id .. first_id + samples - 1, in file order. Task shards (see tasks.py) hold `src.tok` and
`tgt.tok` members instead.

Mixing: the reader shuffles only inside a window of one shard, so the shards themselves must be mixed, or a batch
would hold consecutive pieces of one book. The input files are visited in a seeded random order and the samples
pass through a seeded shuffle buffer of `shard.shuffle_buffer` samples (webdataset-style) on their way to the
writer; sample ids number the shuffled order. A buffer larger than the corpus gives a uniform permutation;
`shard.shuffle_buffer=0` keeps document order. The manifest's `sample_order` says which was used.

manifest.json records: shard names, sample and token counts, bytes and sha256 per shard, the lengths file
(`lengths.npy`: one row per sample id, used to plan batches without reading shards), the tokenizer checksum, the
creating config, the input fingerprint (a copy of the tokenizer, tokenizer.model + tandem_tokenizer.json or a Hugging
Face tokenizer folder, sits beside the shards so the folder can move), and the counts of everything skipped or
repaired (bad UTF-8, empty docs, overlong docs split...). Re-running with the same inputs and config is a no-op; otherwise the folder is rebuilt in a
staging folder and swapped in, so shards are never duplicated or mixed.
"""
from __future__ import annotations

import collections
import json
import logging
import multiprocessing as mp
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds

from configs import progress
from data_pipeline.artifacts import (FORMAT, LENGTHS, MANIFEST, check_shards, extract_stats, fingerprint,
                                     load_lengths, load_manifest, sha256_file, shards_up_to_date, staging_for,
                                     swap_in)
from data_pipeline.config import DataConfig, to_plain
from data_pipeline.documents import doc_files, read_docs
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import PAD_ID, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"


def token_dtype(padded_vocab_size: int) -> str:
    return "uint16" if padded_vocab_size <= 1 << 16 else "uint32"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:012d}"


# ---- writing -------------------------------------------------------------------------------------------------
@dataclass
class WrittenShards:
    shards: list[dict]
    lengths: np.ndarray  # [num_samples, num_fields] token counts


def write_shards(samples: Iterable[dict[str, np.ndarray]], out_dir: Path, fields: Sequence[str], dtype: str,
                 maxcount: int, maxsize: int) -> WrittenShards:
    """Write samples ({field: token array}) with webdataset's ShardWriter; sample ids are assigned 0, 1, 2, ..."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    lengths: list[list[int]] = []
    writer = wds.ShardWriter(str(out_dir / SHARD_PATTERN), maxcount=maxcount, maxsize=maxsize, verbose=0,
                             encoder=False, mtime=0)  # mtime 0: identical input gives identical bytes
    try:
        for sample_id, sample in enumerate(samples):
            writer.write({"__key__": sample_key(sample_id),
                          **{f"{f}.tok" if len(fields) > 1 else "tok": sample[f].astype(dtype, copy=False).tobytes()
                             for f in fields}})
            index = writer.shard - 1  # ShardWriter has already advanced `shard` past the open file
            if index == len(shards):
                shards.append({"name": SHARD_PATTERN % index, "samples": 0, "tokens": 0, "first_id": sample_id})
            shards[-1]["samples"] += 1
            shards[-1]["tokens"] += int(sum(len(sample[f]) for f in fields))
            lengths.append([len(sample[f]) for f in fields])
    finally:
        writer.close()
    for extra in sorted(out_dir.glob("shard-*.tar"))[len(shards):]:  # ShardWriter opens a file before any write
        extra.unlink()
    for s in shards:
        path = out_dir / s["name"]
        s["bytes"] = path.stat().st_size
        s["sha256"] = sha256_file(path)
    arr = np.asarray(lengths, dtype=np.int32).reshape(-1, len(fields))
    return WrittenShards(shards, arr)


def write_manifest(out_dir: Path, kind: str, fields: Sequence[str], dtype: str, written: WrittenShards,
                   tokenizer: Tokenizer, stats: dict, config: dict, fingerprint: str, extra: dict | None = None) -> dict:
    np.save(out_dir / LENGTHS, written.lengths)
    # A copy of the tokenizer travels with the shards (the folder can be moved); the checksum ties them together.
    copy = tokenizer.copy_into(out_dir)
    manifest = {
        "format": FORMAT, "kind": kind, "fields": list(fields), "token_dtype": dtype,
        "num_samples": int(len(written.lengths)), "num_tokens": int(written.lengths.sum()),
        "shards": written.shards,
        "lengths_file": LENGTHS, "lengths_sha256": sha256_file(out_dir / LENGTHS),
        "tokenizer": {"path": copy, "source": str(tokenizer.path), "checksum": tokenizer.checksum,
                      "vocab_size": tokenizer.vocab_size, "padded_vocab_size": tokenizer.padded_vocab_size},
        "stats": stats, "config": config, "fingerprint": fingerprint, **(extra or {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


# ---- the `shard` command -------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(model_path)


def split_into_samples(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """ceil(n / seq_len) near-equal consecutive pieces (no tiny tail piece)."""
    k = -(-len(ids) // seq_len)
    return np.array_split(ids, k) if k > 1 else [ids]


def shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Streaming shuffle buffer: hold up to `size` items, emit a random one as each new item arrives, then the rest
    in random order. Deterministic for a given rng state; uses memory for `size` items only."""
    buf: list[Any] = []
    picks = np.empty(0, dtype=np.int64)
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        if not len(picks):
            picks = rng.integers(0, size, 1 << 14)  # drawn in blocks: one numpy call per item would be slow
        j, picks = int(picks[0]), picks[1:]
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def _tokenize_file(task: tuple[str, int, int]) -> tuple[list[np.ndarray], dict]:
    path, seq_len, min_tokens = task
    assert _WORKER_TOKENIZER is not None
    stats: collections.Counter = collections.Counter()
    samples: list[np.ndarray] = []
    docs = list(read_docs(Path(path), stats))
    for doc, ids in zip(docs, _WORKER_TOKENIZER.encode_many([d["text"] for d in docs])):
        stats["docs_in"] += 1
        if len(ids) < min_tokens:
            stats["too_short_docs"] += 1
            continue
        pieces = split_into_samples(np.asarray(ids, dtype=np.int64), seq_len)
        if len(pieces) > 1:
            stats["docs_split_into_samples"] += 1
        samples.extend(pieces)
    return samples, dict(stats)


def run_shard(cfg: DataConfig, force: bool = False) -> dict:
    """Tokenize `extract.out_dir` with the trained tokenizer into `shard.out_dir`; returns the manifest."""
    s = cfg.shard
    docs_dir = cfg.in_work(cfg.extract.out_dir)
    out_dir = cfg.in_work(s.out_dir)
    tok = load_tokenizer(cfg.tokenizer_dir())
    files = doc_files(docs_dir)
    config = {"shard": to_plain(s), "tokenizer_config": to_plain(cfg.tokenizer), "config_file": cfg.config_file}
    fp = fingerprint({"shard": to_plain(s), "tokenizer": tok.checksum,
                      "inputs": [(f.name, sha256_file(f)) for f in files]})
    if not force and shards_up_to_date(out_dir, fp):
        log.info("shard: %s is up to date (same inputs, tokenizer and config); nothing to do", out_dir)
        return json.loads((out_dir / MANIFEST).read_text())
    staging = staging_for(out_dir)
    dtype = token_dtype(tok.padded_vocab_size)
    stats: collections.Counter = collections.Counter()
    tasks = [(str(f), s.seq_len, s.min_sample_tokens) for f in files]
    if s.shuffle_buffer > 0:  # books and Wikipedia files interleave even where the buffer is smaller than the corpus
        tasks = [tasks[i] for i in np.random.default_rng([s.seed, 0xF1]).permutation(len(tasks))]

    def samples() -> Iterator[dict[str, np.ndarray]]:
        if s.num_workers > 1:
            ctx = mp.get_context("fork")
            with ctx.Pool(s.num_workers, initializer=_init_worker, initargs=(str(tok.path),)) as pool:
                results: Iterable = pool.imap(_tokenize_file, tasks)  # ordered: shard contents are deterministic
                yield from _drain(results)
        else:
            _init_worker(str(tok.path))
            yield from _drain(map(_tokenize_file, tasks))

    def _drain(results: Iterable) -> Iterator[dict[str, np.ndarray]]:
        for file_samples, file_stats in progress.iterate(results, total=len(tasks), desc="shard", unit="file"):
            stats.update(file_stats)
            for ids in file_samples:
                yield {"tok": ids.astype(dtype)}  # the shuffle buffer holds the written dtype, not int64

    stream = samples()
    order = "document order: each document's samples consecutive, files in name order"
    if s.shuffle_buffer > 0:
        stream = shuffled(stream, s.shuffle_buffer, np.random.default_rng([s.seed, 0x5B]))
        order = (f"shuffled: files in a seeded random order, then a shuffle buffer of {s.shuffle_buffer} samples "
                 f"(seed {s.seed})")
    written = write_shards(stream, staging, ["tok"], dtype, s.samples_per_shard, s.max_shard_bytes)
    if not written.shards:
        raise DataError(f"{docs_dir}: no samples produced (all documents shorter than shard.min_sample_tokens?)")
    all_stats = {"extract": extract_stats(docs_dir).get("totals", {}), "shard": dict(stats)}
    manifest = write_manifest(staging, "pretrain", ["tok"], dtype, written, tok, all_stats, config, fp,
                              {"seq_len": s.seq_len, "sample_order": order})
    swap_in(staging, out_dir)
    # the tokenizer path is relative to the manifest's folder, which is the same after the swap
    log.info("shard: %d samples, %d tokens in %d shards -> %s", manifest["num_samples"], manifest["num_tokens"],
             len(manifest["shards"]), out_dir)
    return manifest


# ---- reading and checking samples (used by the training-side reader) -----------------------------------------
def _member_offset(fh: Any, path: Path, member_index: int) -> int:
    """Byte offset of the header of the member_index-th tar member (headers only: data blocks are seeked over)."""
    fh.seek(0)
    with tarfile.open(fileobj=fh, mode="r:") as tf:
        for i in range(member_index + 1):
            info = tf.next()
            if info is None:
                raise DataError(f"{path}: ends before member {member_index} (truncated, or does not match {MANIFEST})")
        return info.offset


def read_piece(path: Path, first_id: int, start: int, count: int, fields: Sequence[str],
               dtype: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Samples start .. start+count-1 of one shard, as (sample id, {field: tokens}), read with webdataset's tar
    iterators. Seeks to `start` by reading tar headers only. Any mismatch or read error stops with a DataError
    naming the shard."""
    names = [f"{f}.tok" if len(fields) > 1 else "tok" for f in fields]
    got = 0
    try:
        with open(path, "rb") as fh:
            if start:
                fh.seek(_member_offset(fh, path, start * len(fields)))
            files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": fh}])
            for sample in wds.tariterators.group_by_keys(files):
                if got == count:
                    break
                expected = first_id + start + got
                if sample["__key__"] != sample_key(expected) or any(n not in sample for n in names):
                    raise DataError(f"{path}: sample {start + got} has key {sample['__key__']!r} and members "
                                    f"{sorted(k for k in sample if not k.startswith('__'))}, expected "
                                    f"{sample_key(expected)} with {names}: the shard does not match {MANIFEST}")
                yield expected, {f: np.frombuffer(sample[n], dtype=dtype).astype(np.int64) for f, n in zip(fields, names)}
                got += 1
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated shard at sample {start + got} ({exc})") from None
    if got < count:
        raise DataError(f"{path}: ended after {start + got} samples, {MANIFEST} promises at least {start + count} "
                        f"(truncated shard)")


def sample_problem(sample: dict[str, np.ndarray], lengths: np.ndarray, vocab_size: int) -> str:
    """Why a sample read from a shard must not be trained on, "" when it is fine: a field whose length differs
    from its row of the lengths file (a truncated, emptied or rewritten member), or a token id outside
    [1, vocab_size) (the tokenizer never writes the pad id 0 into a sample, and every other id is a real piece).
    One vectorized min and max per field: cheap next to the corruption the worker applies anyway."""
    for (name, ids), expected in zip(sample.items(), lengths):
        if len(ids) != expected:
            return f"{name} has {len(ids)} tokens, {LENGTHS} says {expected}"
        if len(ids) and (ids.max() >= vocab_size or ids.min() <= PAD_ID):
            return f"{name} has token ids {ids.min()}..{ids.max()}, outside [1, {vocab_size}) (the vocabulary)"
    return ""


# ---- the `inspect` command -----------------------------------------------------------------------------------
def inspect_shards(shard_dir: Path, shard: str | None, n: int, verify: str = "size", tokenizer: str = "") -> str:
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    tok = load_tokenizer(tokenizer or (shard_dir / manifest["tokenizer"]["path"]))
    lines = [f"{shard_dir / MANIFEST}: {manifest['kind']} shards, {len(manifest['shards'])} shards, "
             f"{manifest['num_samples']} samples, {manifest['num_tokens']} tokens, fields {manifest['fields']}",
             f"tokenizer {tok.path} vocab {tok.vocab_size} (padded {tok.padded_vocab_size}) checksum "
             f"{'matches' if tok.checksum == manifest['tokenizer']['checksum'] else 'DIFFERS'}"]
    lengths = load_lengths(manifest, shard_dir)
    for i, f in enumerate(manifest["fields"]):
        col = lengths[:, i]
        lines.append(f"{f} length: min {col.min()} mean {col.mean():.1f} max {col.max()}")
    lines.append("stats: " + json.dumps(manifest.get("stats", {})))
    problems = check_shards(manifest, shard_dir, verify)
    for s in manifest["shards"]:
        lines.append(f"  {s['name']}: {s['samples']} samples, {s['tokens']} tokens, {s['bytes']} bytes "
                     f"[{problems.get(s['name'], 'ok')}]")
    entry = next((s for s in manifest["shards"] if s["name"] == shard), manifest["shards"][0]) if shard else manifest["shards"][0]
    lines.append(f"first {n} samples of {entry['name']}:")
    for sample_id, sample in read_piece(shard_dir / entry["name"], entry["first_id"], 0, min(n, entry["samples"]),
                                        manifest["fields"], manifest["token_dtype"]):
        for f in manifest["fields"]:
            lines.append(f"  [{sample_id}] {f} ({len(sample[f])} tokens): {tok.decode(sample[f].tolist())}")
    return "\n".join(lines)
