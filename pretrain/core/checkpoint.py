"""Checkpoints that continue a run exactly.

Layout under `checkpoint.dir`:
    step_00000020/                  DeepSpeed's files (model, optimizer and ZeRO partitions, scheduler)
        rank_00000.pt ...           per-rank state DeepSpeed does not keep: data-stream position, RNG states
                                    (torch, numpy, python, megatron's TP tracker), the objectives' generators
    latest                          the tag of the newest *complete* checkpoint

`latest` is replaced atomically (write a temporary file, fsync, os.replace) by rank 0 only after every rank has
written its files, so a job killed mid-save leaves the previous pointer in place, and the torn directory, which
no pointer names, is never loaded. DeepSpeed's own `latest` file is switched off (save_latest=False).

The layout (tag names, the pointer, atomic writes) costs no megatron-core import: model.parallel and the process
groups are imported only where a checkpoint is taken or resumed, so reading a checkpoint's files (finetune's
--init, the stage's --validate-only) stays quick.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Collection

import numpy as np
import torch

POINTER = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    from model import parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tp_tracker": {k: v.clone() for k, v in parallel.rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from model import parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    parallel.rng_tracker().set_states({k: v.clone() for k, v in state["tp_tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_pointer(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, if it names a directory that exists; otherwise None."""
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not TAG_PATTERN.match(tag):
        raise ValueError(f"{pointer} holds {tag!r}, which is not a checkpoint tag")
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names {tag}, but {Path(ckpt_dir) / tag} does not exist")
    return tag


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int = 0, protected: Collection[str] = ()) -> str:
    """Collective: every rank calls it. client_state is shared (saved by DeepSpeed); rank_state is per rank.
    protected: tags pruning must keep (the best checkpoints, pretrain.core.best)."""
    from pretrain.core import distributed

    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    rank = torch.distributed.get_rank()
    pointer = ckpt_dir / POINTER
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named == tag:  # already complete at this step (a finished run resumed): never rewrite what `latest` names
        return tag
    if rank == 0 and (ckpt_dir / tag).is_dir():
        shutil.rmtree(ckpt_dir / tag)  # left by a save that died at this step: start it clean
    distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    world = torch.distributed.get_world_size()
    _torch_save({"world_size": world, **rank_state}, ckpt_dir / tag / f"rank_{rank:05d}.pt")
    distributed.barrier()  # every rank's files are on disk
    if rank == 0:
        write_atomically(ckpt_dir / POINTER, tag)
        if keep_last > 0:
            _prune(ckpt_dir, keep=keep_last, current=tag, protected=protected)
    distributed.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, current: str, protected: Collection[str] = ()) -> None:
    """Remove complete checkpoints older than the newest `keep`; never the one `latest` names, nor a protected one
    (which does not count towards `keep`)."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    older = [t for t in tags if t < current and t not in protected]
    for tag in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores DeepSpeed's state (model, optimizer, scheduler) and returns (client_state,
    this rank's state)."""
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {Path(ckpt_dir) / tag}")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    path = Path(ckpt_dir) / tag / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by a different world size or is torn")
    rank_state = torch.load(path, map_location="cpu", weights_only=False)
    if rank_state["world_size"] != world:
        raise ValueError(f"{path} was written by {rank_state['world_size']} processes; this job has {world}. "
                         "Exact resume needs the same world size and parallel layout.")
    return client_state or {}, rank_state
