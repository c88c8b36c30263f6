"""The formats of what the pipeline's stages leave behind, and the rules for trusting them, in one place.

Every stage (extract, tokenizer, shard, tasks) writes its output folder the same way: it builds it in a staging
folder `<out_dir>.tmp` and swaps it in whole (`swap_in`), so an output folder is never half old, half new; and it
records a `fingerprint` (the sha256 of its inputs and settings) beside the output, so a rerun with nothing changed
is a no-op. The records:
  * extract: `extract_stats.json` (STATS_FILE) beside the documents: counts, files written, fingerprint;
  * tokenizer: `tandem_tokenizer.json` beside `tokenizer.model` (the tokenizer module owns that format); every
    tokenizer gives the project's fixed special ids (below);
  * shard / tasks: `manifest.json` (MANIFEST) beside the shards: per shard its samples, bytes and sha256, the
    per-sample lengths file (LENGTHS), the tokenizer checksum, the fingerprint. `load_manifest`, `check_shards`
    and `load_lengths` are the reader's side.
Artifacts are identified by `sha256_file`. The stage modules import these facts from here and never from one
another, so the stages form no import circle (tests/test_data_imports.py checks it).

Shard checksums are verified at most once per process and file version (`verify_sha256`): the loader checks a
shard the first time it opens it in a run, and a loader built again later (held-out evaluation builds one at every
evaluation) does not hash the same file again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataError

MANIFEST = "manifest.json"
LENGTHS = "lengths.npy"
FORMAT = "tandem-shards-v1"
STATS_FILE = "extract_stats.json"

# The project's fixed special ids, in id order: the sentencepiece model the `tokenizer` step trains holds them as
# pieces 0..5; a Hugging Face tokenizer's own ids are mapped onto them (data_pipeline/hf_tokenizer.py).
SPECIAL_NAMES = ("pad", "unk", "bos", "eos", "mask", "sep")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID = range(len(SPECIAL_NAMES))
NUM_SPECIAL = len(SPECIAL_NAMES)  # ids below this are special; random replacement tokens are drawn from above
SHA256_MISMATCH = f"sha256 differs from {MANIFEST} (corrupt or rewritten)"


# ---- identity ------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(parts: Any) -> str:
    """sha256 of a JSON-able description of a stage's inputs and settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


FileVersion = tuple[str, int, int, int, int]  # path, size, mtime, ctime (ns; any write changes it), inode
_HASHED: dict[FileVersion, str] = {}  # sha256 of the file versions this process has hashed


def file_version(path: Path) -> FileVersion:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def verify_sha256(path: Path, expected: str) -> bool:
    """Whether `path` hashes to `expected`. Each file version is hashed at most once per process;
    `remember_hashed` adds the versions other processes (the loader's workers) found intact."""
    version = file_version(path)
    if version not in _HASHED:
        _HASHED[version] = sha256_file(path)
    return _HASHED[version] == expected


def remember_hashed(versions: dict[FileVersion, str]) -> None:
    _HASHED.update(versions)


def hashed_so_far() -> dict[FileVersion, str]:
    """A copy of what this process has hashed (handed to worker processes, which add it with remember_hashed)."""
    return dict(_HASHED)


# ---- staging and up-to-date checks ---------------------------------------------------------------------------
def staging_for(out_dir: Path) -> Path:
    """A fresh, empty `<out_dir>.tmp` (a fixed path: sentencepiece stores its input path in the model, so a random
    one would change the tokenizer's checksum from run to run)."""
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replace out_dir by the finished staging folder (never appends to an old output)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out_dir)


def read_record(path: Path) -> dict:
    """A stage's JSON record ({} when missing or unreadable: the stage then simply runs again)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def extract_stats(docs_dir: Path) -> dict:
    """The extract stage's record beside its documents ({} when there is none)."""
    return read_record(Path(docs_dir) / STATS_FILE)


def shards_up_to_date(out_dir: Path, fp: str) -> bool:
    """True when out_dir already holds shards built from the same inputs and config, all present and intact."""
    manifest = read_record(out_dir / MANIFEST)
    return bool(manifest) and manifest.get("fingerprint") == fp and not check_shards(manifest, out_dir, "size")


# ---- the shard manifest --------------------------------------------------------------------------------------
def load_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run `python -m data_pipeline shard` or `tasks`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown manifest format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def check_shards(manifest: dict, shard_dir: Path, mode: str) -> dict[str, str]:
    """Problems per shard name ({} when all fine): missing file, wrong size, or (mode "sha256") wrong checksum."""
    problems: dict[str, str] = {}
    for s in manifest["shards"]:
        path = Path(shard_dir) / s["name"]
        if not path.is_file():
            problems[s["name"]] = "missing"
        elif path.stat().st_size != s["bytes"]:
            problems[s["name"]] = f"size {path.stat().st_size} bytes, manifest says {s['bytes']} (truncated or rewritten)"
        elif mode == "sha256" and not verify_sha256(path, s["sha256"]):
            problems[s["name"]] = SHA256_MISMATCH
    return problems


def load_lengths(manifest: dict, shard_dir: Path) -> np.ndarray:
    """The [num_samples, num_fields] token counts (int32), checked against the manifest."""
    path = Path(shard_dir) / manifest["lengths_file"]
    if not path.is_file():
        raise DataError(f"{path}: lengths file listed in {MANIFEST} is missing")
    if sha256_file(path) != manifest["lengths_sha256"]:
        raise DataError(f"{path}: sha256 differs from {Path(shard_dir) / MANIFEST}")
    lengths = np.load(path)
    if len(lengths) != manifest["num_samples"]:
        raise DataError(f"{path}: {len(lengths)} rows but {MANIFEST} lists {manifest['num_samples']} samples")
    return lengths
