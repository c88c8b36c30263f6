"""What a checkpoint holds, written down so it can be checked before anything is loaded.

Every tag gets `checkpoint.json`, written after all of its other files and before the `latest` pointer moves:

    {"format": 1, "tag": "step_00000020", "step": 20,
     "layout": {"world_size": 2, "tensor_parallel": 1},
     "files": {"mp_rank_00_model_states.pt": {"size": 1234, "sha256": "..."}, "rank_00000.pt": {...}, ...},
     "objective": "mix", "config": {...the run's resolved config...}, "loader": {...rank 0's loader state...}}

Resuming verifies a tag against it (sizes, then sha256: each rank hashes a share of the files, so checking costs
about what reading them costs, spread over the ranks) and passes over a broken one to the newest intact tag: the
broken tag gets a `BROKEN` note saying why and is kept for inspection, and `latest` moves back, so neither a later
start of the stage nor the launcher's supervisor (which reads `latest`) tries it again. A tag without a manifest
(written before manifests existed) is loaded unverified when `latest` names it and is never a fallback.

The layout, the config and the loader state answer, without a process group and without unpickling anything,
whether this job can continue the checkpoint exactly (`resume_problem`): the same world size and
parallel.tensor_parallel, the same objective and the same batches. `--validate-only --resume` asks before any
process starts; the engine asks again before it loads.

Test hook: TANDEM_TEST_PAUSE_IN_SAVE=<tag>/<file> makes the rank that has just written that file of that tag
(its own `rank_NNNNN.pt`; `checkpoint.json` on rank 0; a DeepSpeed file on every rank, once DeepSpeed's save
returns) print `TANDEM_TEST_PAUSE_IN_SAVE: paused after <path> (pid N)` and sleep until it is killed, so a test
can kill a rank at a known point inside a checkpoint write.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pretrain.core.tracking import flatten

MANIFEST = "checkpoint.json"
BROKEN = "BROKEN"  # a note in a tag found broken: why; the tag is passed over from then on
FORMAT = 1
PAUSE_VAR = "TANDEM_TEST_PAUSE_IN_SAVE"
_CHUNK = 1 << 22
# Config fields whose change since the checkpoint is named when it cannot be continued (the explanation only: what
# refuses a resume is the layout, the objective and the loader's own check).
EXPLAINING_FIELDS = ("parallel.", "train.seed", "train.grad_accum", "data.", "task.", "objective.")


# --- writing ------------------------------------------------------------------------------------------------

def data_files(tag_dir: Path) -> list[str]:
    """The tag's files (relative paths, sorted), less the manifest, the note and temporary files."""
    out = []
    for path in Path(tag_dir).rglob("*"):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel not in (MANIFEST, BROKEN) and not path.name.startswith("."):
            out.append(rel)
    return sorted(out)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_share(tag_dir: Path, files: list[str], rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Size and sha256 of this rank's share of `files` (every world-th one, from its rank on)."""
    return {rel: {"size": (tag_dir / rel).stat().st_size, "sha256": sha256(tag_dir / rel)}
            for rel in files[rank::world]}


def manifest_text(tag: str, step: int, layout: dict[str, int], files: dict[str, dict[str, Any]],
                  facts: dict[str, Any]) -> str:
    return json.dumps({"format": FORMAT, "tag": tag, "step": step, "layout": layout,
                       "files": dict(sorted(files.items())), **facts}, indent=1, default=str)


def pause_if_asked(tag_dir: Path, names: list[str] | None = None) -> None:
    """The test hook (module docstring): names, the files just written (None: every file now in the tag)."""
    wanted = os.environ.get(PAUSE_VAR, "").strip("/")
    if not wanted:
        return
    tag_dir = Path(tag_dir)
    for rel in data_files(tag_dir) if names is None else names:
        if f"{tag_dir.name}/{rel}" == wanted:
            print(f"{PAUSE_VAR}: paused after {tag_dir / rel} (pid {os.getpid()})", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


# --- reading ------------------------------------------------------------------------------------------------

def read(tag_dir: Path) -> dict[str, Any] | None:
    """The tag's manifest; None when it has none. ValueError when it cannot be read."""
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
        return manifest
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err})") from None


def broken_note(tag_dir: Path) -> str | None:
    path = Path(tag_dir) / BROKEN
    return path.read_text().strip() if path.is_file() else None


def size_problems(tag_dir: Path, files: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    problems = []
    for rel in names:
        path = Path(tag_dir) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != files[rel]["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, {MANIFEST} says {files[rel]['size']} (truncated "
                            "or rewritten)")
    return problems


def check_share(tag_dir: Path, manifest: dict[str, Any], rank: int, world: int) -> list[str]:
    """What is wrong with this rank's share of the tag's files: missing, another size, another sha256."""
    names = sorted(manifest["files"])[rank::world]
    problems = size_problems(tag_dir, manifest["files"], names)
    bad = {p.split(":")[0] for p in problems}
    for rel in names:
        if rel not in bad and sha256(Path(tag_dir) / rel) != manifest["files"][rel]["sha256"]:
            problems.append(f"{rel}: sha256 differs from {MANIFEST}")
    return problems


def cheap_problem(tag_dir: Path) -> str | None:
    """Why the tag is broken as far as a look without reading its files can tell (the note, the manifest, sizes);
    None when it looks intact or has no manifest to check against."""
    note = broken_note(tag_dir)
    if note:
        return f"marked broken earlier: {note}"
    try:
        manifest = read(tag_dir)
    except ValueError as err:
        return str(err)
    if manifest is None:
        return None
    problems = size_problems(tag_dir, manifest["files"], sorted(manifest["files"]))
    return "; ".join(problems) or None


# --- can this job continue it? ------------------------------------------------------------------------------

def layout_of(tag_dir: Path, manifest: dict[str, Any] | None) -> dict[str, int] | None:
    """World size and tensor-parallel size of the job that wrote the tag: from its manifest, else from the file
    names (one rank_NNNNN.pt per process, one mp_rank_NN_model_states.pt per tensor-parallel rank)."""
    if manifest is not None and "layout" in manifest:
        return manifest["layout"]
    ranks = len(list(Path(tag_dir).glob("rank_*.pt")))
    tp = len(list(Path(tag_dir).glob("mp_rank_*_model_states.pt")))
    return {"world_size": ranks, "tensor_parallel": tp} if ranks and tp else None


def config_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """`field: old -> new` for the fields (EXPLAINING_FIELDS) that differ between the checkpoint's config and this
    job's."""
    if not saved:
        return []
    old, new = flatten(saved), flatten(now)
    keys = sorted(k for k in set(old) | set(new) if k.startswith(EXPLAINING_FIELDS) and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def resume_problem(ckpt_dir: Path, tag: str, *, world_size: int, tensor_parallel: int, config: dict[str, Any],
                   objective: str | None = None, loader_mismatch: Callable[[Any], list[str]] | None = None
                   ) -> str | None:
    """Why this job cannot continue checkpoint `tag` exactly, in one line naming the field; None when it can.
    loader_mismatch(saved loader state) -> what differs in the batches (the loader's own check)."""
    tag_dir = Path(ckpt_dir) / tag
    manifest = read(tag_dir)
    where = f"--resume: {tag_dir} was written"
    layout = layout_of(tag_dir, manifest)
    if layout is not None:
        old_tp, old_world = layout["tensor_parallel"], layout["world_size"]
        if old_tp != tensor_parallel:
            return (f"{where} with parallel.tensor_parallel={old_tp} (world size {old_world}), and this job has "
                    f"parallel.tensor_parallel={tensor_parallel}: a checkpoint continues only with the layout that "
                    f"wrote it (set parallel.tensor_parallel={old_tp}, or start a new run)")
        if old_world != world_size:
            return (f"{where} by {old_world} processes (tensor parallel {old_tp} x data parallel "
                    f"{old_world // max(old_tp, 1)}), and this job has {world_size} (the world size): a checkpoint "
                    f"continues only with the world size that wrote it (launch {old_world} processes, or start a "
                    "new run)")
    if manifest is None:
        return None
    changed = config_changes(manifest.get("config"), config)
    because = f" (changed since: {'; '.join(changed)})" if changed else ""
    saved_objective = manifest.get("objective")
    if objective is not None and saved_objective is not None and saved_objective != objective:
        return (f"{where} training objective {saved_objective!r}, and this job trains {objective!r}: a checkpoint "
                f"continues only with its own objective{because}")
    differ = loader_mismatch(manifest["loader"]) if loader_mismatch and manifest.get("loader") is not None else []
    if differ:
        return (f"{where} with other training batches than this job's config gives: {'; '.join(differ)}{because}. "
                "Resume with the config that wrote it, or start a new run (another output_dir or checkpoint.dir)")
    return None
