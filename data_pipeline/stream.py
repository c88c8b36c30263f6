"""The training-side reader: webdataset shards -> planned, corrupted batches, with exact mid-epoch resume.

Entry points (what pretrain/ and finetune/ call):

    build_pretrain_loader(cfg, *, dp_rank: int, dp_world_size: int, seed: int,
                          objective_weights: Mapping[str, float] | Sequence[str] | str,
                          num_workers: int, pin_memory: bool = False) -> ShardLoader
        cfg: a DataConfig (its `loader` section; relative paths against its work_dir), a LoaderConfig (relative
             paths against the repository root), a path to a data YAML, or a mapping/DictConfig of either.
        objective_weights: e.g. {"bang": 0.5, "elmer": 0.5}; "bang" or ["bang"] means weight 1.
        Yields the batch dicts documented in corruption.py (objective, src_tokens, tgt_tokens, prev_tokens,
        tgt_positions, span_index, span_counts, sample_ids, n_tokens).
        pin_memory: tensors in page-locked memory (a CUDA trainer: its host-to-device copy is then asynchronous).

    build_task_loader(shard_dir, *, dp_rank, dp_world_size, seed, num_workers, batch_size=32, max_tokens=0,
                      shuffle=True, bucket_window=64, shuffle_buffer=512, max_source_len=0, tokenizer="",
                      verify="sha256", on_corrupt_shard="error", prefetch_factor=2, pin_memory=False) -> ShardLoader
        Reads shards written by `python -m data_pipeline tasks` (see tasks.py); batch dicts: src_tokens,
        tgt_tokens (y + eos), prev_tokens ([bos] + y), tgt_positions (1..T, 0 at pad), sample_ids (line index in
        the split), n_tokens.

ShardLoader:
    for batch in loader: ...        # the rest of the current epoch; when it runs out the epoch counter advances
    loader.infinite()               # epoch after epoch, forever
    len(loader)                     # batches in the current epoch (identical on every dp rank; may differ by a
    loader.batches_per_epoch(e)     # few between epochs)
    loader.epoch, loader.batches_in_epoch
    loader.set_epoch(e)             # jump to the start of epoch e
    sd = loader.state_dict()        # {"epoch", "batches_in_epoch", "seed", "dp_world_size", "num_workers",
    loader.load_state_dict(sd)      #  "plan_key", "plan_facts", ...}: the same on every dp rank at the same step
    loader.resume_mismatch(sd)      # what differs from the loader that saved sd (`name: saved -> now`), [] if none
    loader.vocab_size, loader.padded_vocab_size, loader.tokenizer, loader.skipped_shards
    loader.counters()               # {"samples_skipped", "shards_skipped"} for the trainer's log (see below)

How it works (details in batching.py): every process computes the same epoch plan from manifest.json and
lengths.npy: shards split by the dp rank passed in (never by the global RANK, so tensor-parallel peers read
identical data), then by DataLoader worker; a seeded shuffle buffer and length-bucketed token-budget batches per
shard piece; equal batch counts on every rank and worker. torch's DataLoader hands out worker batches round robin,
so global batch b of an epoch is batch b // W of stream b % W (W workers). Resuming after k batches starts
DataLoader worker i on stream (i + k) % W, skips whole pieces that lie before k without opening them, and replays
only the current piece (seeking inside its shard by tar headers). Samples are read with webdataset's tar
iterators (tar_file_expander + group_by_keys) from that position; wds.WebDataset itself is not used because it can
neither start mid-shard nor follow a plan, and its node splitter reads the global RANK. Corruption and the per-batch objective are
seeded from (seed, epoch, sample id / batch index), so the resumed stream is identical batch for batch.

Nothing corrupt is trained on silently. Checks, from the cheapest:
  * at construction: the manifest, every shard's presence and size, lengths.npy's checksum, the tokenizer's
    checksum (a different tokenizer would make every id meaningless);
  * shard sha256 (verify="sha256", the default): with on_corrupt_shard="error", each shard is hashed the first
    time it is opened in a run (once per process and file version, see artifacts.verify_sha256: a loader built
    again, e.g. for every evaluation, does not hash again); with "skip", every shard is hashed at construction,
    so that every process leaves the same shards out of the plan. verify="size" skips hashing;
  * every sample as it is read (in the worker): each field's length against lengths.npy, and its token ids
    inside [1, vocab_size) — vocab_size passed in explicitly from the tokenizer whose checksum the manifest
    records — one vectorized min and max per field (shards.sample_problem); plus the tar structure and member
    keys (shards.read_piece).
on_corrupt_shard="error" (default) stops with a DataError naming the shard (and the sample id for a sample
check). "skip" leaves a bad shard out of every epoch's plan (logged, listed in `skipped_shards`) and drops a bad
sample from its batch: the batch is yielded smaller, never left out, so every data-parallel rank still yields the
planned number of batches, and tensor-parallel peers (same dp rank, same bytes) drop the same samples. A sample
that is dropped is logged and counted where its batch is yielded, so the count is exact across a resume (the
replayed part of a piece is read again but not counted). A planned batch whose samples are all bad cannot be
yielded smaller: it stops with a DataError naming the shard. `counters()` returns the counts for the trainer to
log: "samples_skipped", this dp rank's over the run (part of the loader state; sum it over the data-parallel
group, not the tensor-parallel one, whose peers hold the same count), and "shards_skipped", the same on every rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.artifacts import (MANIFEST, SHA256_MISMATCH, check_shards, file_version, hashed_so_far,
                                     load_lengths, load_manifest, remember_hashed, verify_sha256)
from data_pipeline.batching import BatchingSpec, Piece, StreamPlan, plan_epoch, plan_key
from data_pipeline.config import REPO_ROOT, CorruptionConfig, LoaderConfig, loader_config_from, resolve, validate_loader
from data_pipeline.corruption import CorruptionTables, PretrainCollator, normalize_weights, to_torch
from data_pipeline.errors import ConfigError, DataError
from data_pipeline.shards import read_piece, sample_problem
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

Collator = Callable[[Sequence[tuple[int, dict[str, np.ndarray]]], int, int], dict]

# Keys a worker adds to a batch for the loader (popped before the batch reaches the trainer).
_SKIPPED_KEY = "_skipped_samples"  # [(shard name, sample id, why)] dropped from this batch
_HASHED_KEY = "_hashed_shards"  # {file version: sha256} of shards found intact when this batch's piece was opened
_LOGGED_SKIPS = 20  # skipped samples logged one by one; after that every 1000th


def _as_is(batch: dict) -> dict:
    """DataLoader collate_fn: keep the worker's numpy arrays (pickled through the pipe; see corruption.pad_stack)."""
    return batch


@dataclass
class SampleChecks:
    """What every sample read is checked against (module docstring), and what a failed check does."""

    lengths: np.ndarray  # [num_samples, num_fields]: the lengths file, row = sample id
    vocab_size: int  # token ids must lie in [1, vocab_size)
    hash_on_open: bool  # hash each shard the first time it is opened in this run (verify=sha256 with "error")
    skip: bool  # on_corrupt_shard == "skip": drop bad samples from their batch instead of stopping


class _EpochStream(IterableDataset):
    """One epoch of one dp rank from global batch `start` on; each DataLoader worker plays one planned stream."""

    def __init__(self, shard_dir: Path, shards: list[dict], fields: list[str], dtype: str, checks: SampleChecks,
                 streams: list[StreamPlan], start: int, epoch: int, collate: Collator, hashed: dict):
        self.shard_dir, self.shards, self.fields, self.dtype = shard_dir, shards, fields, dtype
        self.checks, self.hashed = checks, hashed
        self.streams, self.start, self.epoch, self.collate = streams, start, epoch, collate

    def __iter__(self) -> Iterator[dict]:
        remember_hashed(self.hashed)  # shards hashed earlier in this run, also where workers are not forked
        workers = len(self.streams)
        info = get_worker_info()
        if info is None:  # num_workers=0: interleave the streams here exactly as the DataLoader would
            its = [self._stream((self.start + i) % workers) for i in range(workers)]
            while its:
                alive = []
                for it in its:
                    batch = next(it, None)
                    if batch is not None:
                        alive.append(it)
                        yield batch
                its = alive
            return
        yield from self._stream((info.id + self.start) % workers)

    def _stream(self, s: int) -> Iterator[dict]:
        workers = len(self.streams)
        local = 0  # local batch counter inside stream s; global index = local * workers + s
        for piece in self.streams[s].pieces:
            first_global = local * workers + s
            local += len(piece.batches)
            if (local - 1) * workers + s < self.start:
                continue  # the whole piece lies before the resume point: never opened
            entry = self.shards[piece.shard]
            path = self.shard_dir / entry["name"]
            hashed = self._check_sha256(path, entry)
            reader = self._checked_samples(path, entry, piece)
            pending: dict[int, tuple[dict[str, np.ndarray] | None, str]] = {}
            for j, batch_ids in enumerate(piece.batches):
                for sid in batch_ids:
                    while sid not in pending:
                        try:
                            got_id, sample, why = next(reader)
                        except StopIteration:
                            raise DataError(f"{path}: sample {sid} planned from {MANIFEST} was not found in its "
                                            "piece") from None
                        pending[got_id] = (sample, why)
                global_index = first_global + j * workers
                taken = [(int(sid), *pending.pop(int(sid))) for sid in batch_ids]
                if global_index < self.start:
                    continue  # replayed to reach the resume point: neither yielded nor counted
                good = [(sid, sample) for sid, sample, _ in taken if sample is not None]
                if not good:
                    raise DataError(f"{path}: all {len(taken)} samples of a planned batch are corrupt (sample "
                                    f"{taken[0][0]}: {taken[0][2]}); a batch cannot be skipped whole without "
                                    "leaving this data-parallel rank with fewer batches than the others. Rebuild the "
                                    "shard, or keep loader.verify=sha256, which with on_corrupt_shard=skip leaves a "
                                    "corrupt shard out at start")
                batch = self.collate(good, self.epoch, global_index)
                batch[_SKIPPED_KEY] = [(entry["name"], sid, why) for sid, sample, why in taken if sample is None]
                batch[_HASHED_KEY], hashed = hashed, {}
                yield batch
            reader.close()

    def _check_sha256(self, path: Path, entry: dict) -> dict:
        """Hash a shard the first time it is opened in this run (verify=sha256 with on_corrupt_shard=error);
        returns {file version: sha256} for the loader to remember, {} when not hashing."""
        if not self.checks.hash_on_open:
            return {}
        try:
            intact = verify_sha256(path, entry["sha256"])
            version = file_version(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read shard ({exc})") from None
        if not intact:
            raise DataError(f"{path}: {SHA256_MISMATCH}; found when the shard was first opened in this run "
                            "(loader.verify=sha256). loader.on_corrupt_shard=skip hashes every shard at start and "
                            "leaves corrupt ones out")
        return {version: entry["sha256"]}

    def _checked_samples(self, path: Path, entry: dict,
                         piece: Piece) -> Iterator[tuple[int, dict[str, np.ndarray] | None, str]]:
        """(sample id, sample or None, why it is bad) for every sample of the piece, in file order. A bad sample
        stops with a DataError naming shard and sample id, or (skip) comes as None; with skip, a shard that
        becomes unreadable part-way gives None for the rest of the piece."""
        first = entry["first_id"] + piece.start
        end, next_id = first + piece.count, first
        reader = read_piece(path, entry["first_id"], piece.start, piece.count, self.fields, self.dtype)
        try:
            for sid, sample in reader:
                why = sample_problem(sample, self.checks.lengths[sid], self.checks.vocab_size)
                if why and not self.checks.skip:
                    raise DataError(f"{path}: sample {sid}: {why}; the shard is corrupt or does not match "
                                    f"{MANIFEST} (loader.on_corrupt_shard=skip drops such samples and counts them)")
                next_id = sid + 1
                yield sid, (None if why else sample), why
        except DataError as exc:
            if not self.checks.skip or next_id >= end:
                raise
            why = f"unreadable ({exc})"
            for sid in range(next_id, end):
                yield sid, None, why
        finally:
            reader.close()


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`name: saved -> now` for the plan facts that differ; a mapping with the same keys is compared key by key."""
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if key == "shards" and old != new:
            out.append(f"shards: manifest fingerprint {str(old)[:12]}... -> {str(new)[:12]}... (the shards were "
                       "rebuilt from other inputs or settings)")
        elif isinstance(old, Mapping) and isinstance(new, Mapping) and set(old) == set(new):
            out += [f"{key}.{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old) if old[k] != new[k]]
        elif old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


class ShardLoader:
    """Epoch-aware, resumable loader over one shard folder (see the module docstring)."""

    def __init__(self, shard_dir: Path, manifest: dict, cost: np.ndarray, collate: Collator, *, spec: BatchingSpec,
                 checks: SampleChecks, dp_rank: int, dp_world_size: int, seed: int, num_workers: int,
                 prefetch_factor: int, tokenizer: Tokenizer, skipped_shards: list[str],
                 plan_facts: Mapping[str, Any] | None = None, pin_memory: bool = False):
        """plan_facts: what else the batches depend on ({"weights": ..., "corruption": ...} for pretraining),
        JSON-able; with the manifest fingerprint, the batching spec and the skipped shards they form `plan_facts`."""
        self.shard_dir, self.manifest, self.cost, self.collate, self.spec = shard_dir, manifest, cost, collate, spec
        self.checks = checks
        self.pin_memory = pin_memory
        self.dp_rank, self.dp_world_size, self.seed = dp_rank, dp_world_size, seed
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.tokenizer, self.skipped_shards = tokenizer, skipped_shards
        self.samples_skipped = 0  # over the run, in yielded batches of this dp rank (restored on resume)
        self.shards = [s for s in manifest["shards"] if s["name"] not in skipped_shards]
        if not self.shards:
            raise DataError(f"{shard_dir / MANIFEST}: no usable shards left (skipped: {skipped_shards})")
        facts = dict(plan_facts or {})
        extra = "|".join(f"{k}={sorted(v.items()) if isinstance(v, Mapping) else v}" for k, v in facts.items())
        self.plan_key = plan_key(manifest.get("fingerprint", ""), spec, f"{extra}|skip={sorted(skipped_shards)}")
        # the same facts, readable: a resume that cannot continue says which one changed
        self.plan_facts = {"shards": manifest.get("fingerprint", ""), "batching": dict(spec.__dict__), **facts,
                           "skipped_shards": sorted(skipped_shards)}
        self.epoch = 0
        self.batches_in_epoch = 0
        self._plans: dict[int, list[StreamPlan]] = {}
        self._rank_plan(0)  # plan now: a data problem shows at construction, not at the first batch

    # ---- planning --------------------------------------------------------------------------------------------
    def _rank_plan(self, epoch: int) -> list[StreamPlan]:
        if epoch not in self._plans:
            plans = plan_epoch(self.shards, self.cost, spec=self.spec, seed=self.seed, epoch=epoch,
                               dp_world_size=self.dp_world_size, num_workers=self.num_workers,
                               where=str(self.shard_dir / MANIFEST))
            self._plans = {epoch: plans[self.dp_rank]}  # keep one epoch: plans can be large
        return self._plans[epoch]

    def plan(self, epoch: int | None = None) -> list[StreamPlan]:
        """This rank's streams for an epoch (for tests and tools)."""
        return self._rank_plan(self.epoch if epoch is None else epoch)

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Batches of an epoch on this rank (the same on every rank). It can differ by a few between epochs: the
        shard order changes where the rank/worker ranges cut the shards."""
        return self._rank_plan(self.epoch if epoch is None else epoch)[0].num_batches * max(1, self.num_workers)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    # ---- iteration -------------------------------------------------------------------------------------------
    def _roll_epoch(self) -> None:
        if self.batches_in_epoch >= len(self):
            self.epoch += 1
            self.batches_in_epoch = 0

    def __iter__(self) -> Iterator[dict]:
        self._roll_epoch()
        streams = self._rank_plan(self.epoch)
        dataset = _EpochStream(self.shard_dir, self.shards, self.manifest["fields"], self.manifest["token_dtype"],
                               self.checks, streams, self.batches_in_epoch, self.epoch, self.collate,
                               hashed_so_far())
        if self.num_workers > 0:
            loader: Any = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                                     prefetch_factor=self.prefetch_factor, persistent_workers=False)
        else:
            loader = dataset
        for batch in loader:
            self._account(batch)
            self.batches_in_epoch += 1
            yield to_torch(batch, pin_memory=self.pin_memory)
        self._roll_epoch()

    def _account(self, batch: dict) -> None:
        """Take the worker's notes off a batch: shards it hashed (not hashed again in this run) and samples it
        dropped (logged and counted)."""
        remember_hashed(batch.pop(_HASHED_KEY))
        for name, sid, why in batch.pop(_SKIPPED_KEY):
            self.samples_skipped += 1
            if self.samples_skipped <= _LOGGED_SKIPS or self.samples_skipped % 1000 == 0:
                log.warning("%s: sample %d skipped: %s (loader.on_corrupt_shard=skip; %d skipped so far on this "
                            "data-parallel rank)", self.shard_dir / name, sid, why, self.samples_skipped)

    def counters(self) -> dict[str, int]:
        """What was left out so far in the run, for the trainer's log and MLflow: samples dropped from this dp
        rank's batches (sum over the data-parallel group; tensor-parallel peers hold the same count) and shards
        left out of the plan (the same on every rank)."""
        return {"samples_skipped": self.samples_skipped, "shards_skipped": len(self.skipped_shards)}

    def infinite(self) -> Iterator[dict]:
        while True:
            yield from self

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_in_epoch = int(epoch), 0

    # ---- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, done = self.epoch, self.batches_in_epoch
        if done >= len(self):
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_in_epoch": done, "seed": self.seed, "dp_world_size": self.dp_world_size,
                "num_workers": self.num_workers, "plan_key": self.plan_key, "plan_facts": self.plan_facts,
                "dp_rank": self.dp_rank, "samples_skipped": self.samples_skipped}

    def resume_mismatch(self, state: Mapping[str, Any]) -> list[str]:
        """What differs between the loader that saved `state` and this one, as `name: saved -> now` (empty: this
        loader continues it exactly). A state saved without the readable plan names only its key."""
        problems = [f"{k}: {state[k]!r} -> {getattr(self, k)!r}" for k in ("seed", "dp_world_size", "num_workers")
                    if k in state and state[k] != getattr(self, k)]
        if state.get("plan_key", self.plan_key) != self.plan_key:
            saved = state.get("plan_facts")
            if not isinstance(saved, Mapping):
                problems.append(f"plan_key: {state['plan_key']!r} -> {self.plan_key!r} (the shards, batching, "
                                "objective weights or corruption changed)")
            else:
                problems += _differences(saved, self.plan_facts)
        return problems

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume. The state of any dp rank works on every rank (all ranks are at the same batch); only the
        skip count is per rank."""
        problems = self.resume_mismatch(state)
        if problems:
            raise ConfigError(f"the loader state cannot be resumed exactly, the batches would differ: "
                              f"{'; '.join(problems)} (the same shards, batching, objective weights, corruption, "
                              "seed, data-parallel size and workers are needed)")
        epoch, done = int(state["epoch"]), int(state["batches_in_epoch"])
        if epoch < 0 or not 0 <= done <= self.batches_per_epoch(epoch):
            raise ConfigError(f"loader state epoch={epoch} batches_in_epoch={done} is outside this data's epoch "
                              f"(0..{self.batches_per_epoch(max(epoch, 0))} batches)")
        self.epoch, self.batches_in_epoch = epoch, done
        self.samples_skipped = int(state.get("samples_skipped", 0))

    # ---- facts for the trainer -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.tokenizer.padded_vocab_size


# ---- construction --------------------------------------------------------------------------------------------
def _check_rank(dp_rank: int, dp_world_size: int, num_workers: int, seed: int) -> None:
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0 (it seeds numpy SeedSequences)")
    if dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
        raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_world_size={dp_world_size})")
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} must be >= 0")


def open_shard_dir(shard_dir: Path, kind: str, tokenizer_path: str | Path, verify: str,
                   on_corrupt_shard: str) -> tuple[dict, np.ndarray, Tokenizer, list[str]]:
    """Load and check a shard folder: manifest, shards (size; sha256 too when verify=sha256 and
    on_corrupt_shard=skip, see the module docstring), lengths and the tokenizer checksum."""
    manifest = load_manifest(shard_dir)
    if manifest["kind"] != kind:
        raise DataError(f"{shard_dir / MANIFEST}: holds {manifest['kind']!r} shards, expected {kind!r}")
    tok_path = Path(tokenizer_path) if tokenizer_path else (shard_dir / manifest["tokenizer"]["path"]).resolve()
    tok = load_tokenizer(tok_path)
    if tok.checksum != manifest["tokenizer"]["checksum"]:
        raise DataError(f"tokenizer checksum mismatch: {tok.path} has {tok.checksum[:16]}..., but "
                        f"{shard_dir / MANIFEST} was written with {manifest['tokenizer']['checksum'][:16]}...")
    problems = check_shards(manifest, shard_dir, "sha256" if hash_at_start(verify, on_corrupt_shard) else "size")
    if problems and on_corrupt_shard == "error":
        name, why = next(iter(problems.items()))
        raise DataError(f"{shard_dir / name}: {why} (checked against {shard_dir / MANIFEST}; "
                        f"{len(problems)} bad shard(s) in total; loader.on_corrupt_shard=skip leaves them out)")
    for name, why in problems.items():
        log.warning("%s: %s -- skipped (loader.on_corrupt_shard=skip)", shard_dir / name, why)
    lengths = load_lengths(manifest, shard_dir)
    return manifest, lengths, tok, sorted(problems)


def hash_at_start(verify: str, on_corrupt_shard: str) -> bool:
    """Skipping needs every process to leave the same shards out of its plan, so it hashes them all up front."""
    return verify == "sha256" and on_corrupt_shard == "skip"


def sample_checks(lengths: np.ndarray, tok: Tokenizer, verify: str, on_corrupt_shard: str) -> SampleChecks:
    return SampleChecks(lengths, vocab_size=tok.vocab_size,
                        hash_on_open=verify == "sha256" and not hash_at_start(verify, on_corrupt_shard),
                        skip=on_corrupt_shard == "skip")


def build_pretrain_loader(cfg: Any, *, dp_rank: int, dp_world_size: int, seed: int,
                          objective_weights: Mapping[str, float] | Sequence[str] | str,
                          num_workers: int, pin_memory: bool = False) -> ShardLoader:
    lc, base = loader_config_from(cfg)
    _check_rank(dp_rank, dp_world_size, num_workers, seed)
    weights = normalize_weights(objective_weights)
    shard_dir = resolve(lc.shard_dir, base)
    tok_path = resolve(lc.tokenizer, base) if lc.tokenizer else ""
    manifest, lengths, tok, skipped = open_shard_dir(shard_dir, "pretrain", tok_path, lc.verify, lc.on_corrupt_shard)
    cost = lengths[:, 0].astype(np.int64) + 1  # + EOS for ELMER targets
    spec = BatchingSpec(lc.batch_size, lc.max_tokens, lc.shuffle, lc.shuffle_buffer, lc.bucket_window)
    collate = PretrainCollator(lc.corruption, CorruptionTables.from_tokenizer(tok), weights, seed)
    return ShardLoader(shard_dir, manifest, cost, collate, spec=spec,
                       checks=sample_checks(lengths, tok, lc.verify, lc.on_corrupt_shard), dp_rank=dp_rank,
                       dp_world_size=dp_world_size, seed=seed, num_workers=num_workers,
                       prefetch_factor=lc.prefetch_factor, tokenizer=tok, skipped_shards=skipped,
                       plan_facts={"weights": weights, "corruption": dict(lc.corruption.__dict__)},
                       pin_memory=pin_memory)


def build_task_loader(shard_dir: str | Path, *, dp_rank: int, dp_world_size: int, seed: int, num_workers: int,
                      batch_size: int = 32, max_tokens: int = 0, shuffle: bool = True, bucket_window: int = 64,
                      shuffle_buffer: int = 512, max_source_len: int = 0, tokenizer: str | Path = "",
                      verify: str = "sha256", on_corrupt_shard: str = "error", prefetch_factor: int = 2,
                      pin_memory: bool = False) -> ShardLoader:
    from data_pipeline.tasks import TaskCollator

    lc = LoaderConfig(shard_dir=str(shard_dir), tokenizer=str(tokenizer), batch_size=batch_size,
                      max_tokens=max_tokens, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                      bucket_window=bucket_window, verify=verify, on_corrupt_shard=on_corrupt_shard,
                      prefetch_factor=prefetch_factor, corruption=CorruptionConfig())
    validate_loader(lc, prefix="task loader")
    _check_rank(dp_rank, dp_world_size, num_workers, seed)
    sdir = resolve(shard_dir, REPO_ROOT)
    manifest, lengths, tok, skipped = open_shard_dir(sdir, "task", resolve(tokenizer, REPO_ROOT) if tokenizer else "",
                                                     verify, on_corrupt_shard)
    src_len = lengths[:, 0].astype(np.int64)
    if max_source_len > 0:
        src_len = np.minimum(src_len, max_source_len)
    cost = np.maximum(src_len, lengths[:, 1].astype(np.int64) + 1)
    spec = BatchingSpec(batch_size, max_tokens, shuffle, shuffle_buffer, bucket_window)
    return ShardLoader(sdir, manifest, cost, TaskCollator(max_source_len), spec=spec,
                       checks=sample_checks(lengths, tok, verify, on_corrupt_shard), dp_rank=dp_rank,
                       dp_world_size=dp_world_size, seed=seed, num_workers=num_workers,
                       prefetch_factor=prefetch_factor, tokenizer=tok, skipped_shards=skipped,
                       plan_facts={"max_source_len": max_source_len}, pin_memory=pin_memory)
