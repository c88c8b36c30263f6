"""Checkpoints that continue a run exactly.

Layout under `checkpoint.dir`:
    step_00000020/                  DeepSpeed's files (model, optimizer and ZeRO partitions, scheduler)
        rank_00000.pt ...           per-rank state DeepSpeed does not keep: data-stream position, RNG states
                                    (torch, numpy, python, megatron's TP tracker), the objectives' generators
        checkpoint.json             the tag's files with their sizes and sha256, the layout and the facts that say
                                    whether a job can continue it (checkpoint_manifest.py); written last
    latest                          the tag of the newest *complete* checkpoint

`latest` is replaced atomically (write a temporary file, fsync, os.replace) by rank 0 only after every rank has
written its files and the manifest is on disk, so a job killed mid-save leaves the previous pointer in place, and
the torn directory, which no pointer names, is never loaded. DeepSpeed's own `latest` file is switched off
(save_latest=False). A save that cannot write (a full disk, a file-size limit) stops with CheckpointWriteError
naming the tag's folder and the free space; `latest` still names the previous checkpoint.

Resuming (`resume_tag`) verifies the tag `latest` names against its manifest and falls back to the newest intact
one, naming what is broken; a tag that verifies and still fails to load is marked the same way (`load`). Either
way `latest` moves back past the broken tag, so no later start, and no supervisor restart, tries it again.

The layout (tag names, the pointer, atomic writes) costs no megatron-core import: model.parallel and the process
groups are imported only where a checkpoint is taken or resumed, so reading a checkpoint's files (finetune's
--init, the stage's --validate-only) stays quick.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from configs import ConfigError
from pretrain.core import checkpoint_manifest as manifest

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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, a lost mount); the previous one stands."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint that verified against its manifest failed to load; it is marked broken (`mark_broken`)."""


def _free_space(folder: Path) -> str:
    import resource

    try:
        text = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free on its file system"
    except OSError:
        text = "free space unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return text + (f", file-size limit {limit} bytes (ulimit -f)" if limit != resource.RLIM_INFINITY else "")


@contextlib.contextmanager
def _writing(tag_dir: Path, named: str | None, rank: int) -> Iterator[None]:
    """Turn a failed write into one error naming the folder, the space left and the checkpoint that stands.
    torch.save reports a short write as a RuntimeError without errno, so both kinds are caught."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        stands = (f"`latest` still names {named}, which is intact and what a restart resumes from" if named
                  else "there is no earlier complete checkpoint")
        raise CheckpointWriteError(
            f"writing checkpoint {tag_dir} failed on rank {rank}: {type(err).__name__}: {err} "
            f"({_free_space(tag_dir.parent)}). {stands}; {tag_dir} is incomplete and can be deleted") from err


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int = 0, facts: dict[str, Any] | None = None) -> str:
    """Collective: every rank calls it. client_state is shared (saved by DeepSpeed); rank_state is per rank;
    facts: JSON-able entries for the manifest (the objective's name, the resolved config)."""
    from model import parallel
    from pretrain.core import distributed

    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    pointer = ckpt_dir / POINTER
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named == tag:  # already complete at this step (a finished run resumed): never rewrite what `latest` names
        return tag
    if rank == 0 and tag_dir.is_dir():
        shutil.rmtree(tag_dir)  # left by a save that died (or a tag found broken) at this step: start it clean
    distributed.barrier()
    rank_file = f"rank_{rank:05d}.pt"
    with _writing(tag_dir, named, rank):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        manifest.pause_if_asked(tag_dir)
        _torch_save({"world_size": world, **rank_state}, tag_dir / rank_file)
        manifest.pause_if_asked(tag_dir, [rank_file])
    distributed.barrier()  # every rank's files are on disk: each hashes a share of them
    files = manifest.data_files(tag_dir)
    shares: list[Any] = [None] * world
    torch.distributed.all_gather_object(shares, manifest.describe_share(tag_dir, files, rank, world))
    if rank == 0:
        layout = {"world_size": world, "tensor_parallel": parallel.tp_size()}
        text = manifest.manifest_text(tag, step, layout, {k: v for share in shares for k, v in share.items()},
                                      {**(facts or {}), "loader": rank_state.get("loader")})
        with _writing(tag_dir, named, rank):
            write_atomically(tag_dir / manifest.MANIFEST, text)
            manifest.pause_if_asked(tag_dir, [manifest.MANIFEST])
            write_atomically(pointer, tag)
        if keep_last > 0:
            _prune(ckpt_dir, keep=keep_last, current=tag)
    distributed.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Remove complete checkpoints older than the newest `keep`; never the one `latest` names."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    older = [t for t in tags if t < current]
    for tag in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


# --- resuming ---------------------------------------------------------------------------------------------

def previous_complete(ckpt_dir: Path, tag: str) -> str | None:
    """The newest tag older than `tag` that has a manifest and is not marked broken."""
    older = sorted((p.name for p in Path(ckpt_dir).iterdir()
                    if p.is_dir() and TAG_PATTERN.match(p.name) and p.name < tag), reverse=True)
    return next((t for t in older if (Path(ckpt_dir) / t / manifest.MANIFEST).is_file()
                 and manifest.broken_note(Path(ckpt_dir) / t) is None), None)


def mark_broken(ckpt_dir: Path, tag: str, why: str) -> str | None:
    """Note in the tag why it is broken and move `latest` back to the newest complete tag before it (when `latest`
    names this one); returns that tag. Any rank may call it: the note is its own, the pointer the same for all."""
    ckpt_dir = Path(ckpt_dir)
    write_atomically(ckpt_dir / tag / manifest.BROKEN, why + "\n")
    previous = previous_complete(ckpt_dir, tag)
    pointer = ckpt_dir / POINTER
    if previous is not None and pointer.is_file() and pointer.read_text().strip() == tag:
        write_atomically(pointer, previous)
    return previous


def _verify(tag_dir: Path, rank: int, world: int) -> str | None:
    """Collective where the tag has a manifest: why it is broken, the same answer on every rank; None if intact."""
    note = manifest.broken_note(tag_dir)
    if note is not None:
        return f"marked broken earlier: {note}"
    try:
        recorded = manifest.read(tag_dir)
    except ValueError as err:
        return str(err)
    if recorded is None:  # written before manifests: nothing to check against
        return None
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, manifest.check_share(tag_dir, recorded, rank, world))
    return "; ".join(sorted(p for share in gathered for p in share)) or None


def resume_tag(ckpt_dir: Path, say: Callable[[str], None] = print) -> str | None:
    """Collective. The tag to resume from: the one `latest` names if it verifies, else the newest intact one before
    it (each broken one named through `say`, marked and passed over); None when there is no checkpoint yet.
    ConfigError when there are checkpoints but none is intact (a restart cannot help)."""
    ckpt_dir = Path(ckpt_dir)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    tag = read_pointer(ckpt_dir)
    broken = []
    while tag is not None:
        why = _verify(ckpt_dir / tag, rank, world)
        if why is None:
            if not (ckpt_dir / tag / manifest.MANIFEST).is_file():
                say(f"{ckpt_dir / tag} has no {manifest.MANIFEST} (written before checkpoints recorded their "
                    "files): loading it unverified")
            return tag
        previous = mark_broken(ckpt_dir, tag, why) if rank == 0 else previous_complete(ckpt_dir, tag)
        broken.append(f"{tag} ({why})")
        say(f"WARNING: checkpoint {ckpt_dir / tag} is broken: {why}; "
            + (f"falling back to {ckpt_dir / previous}" if previous else "no earlier intact checkpoint"))
        tag = previous
    if broken:
        raise ConfigError(f"--resume: no intact checkpoint in {ckpt_dir}: {'; '.join(broken)}. Start without "
                          "--resume (or with another checkpoint.dir) to train from step 0")
    return None


def check_continues(ckpt_dir: Path, tag: str, cfg, world_size: int, objective: str | None,
                    loader_mismatch: Callable[[Any], list[str]] | None) -> None:
    """ConfigError, in one line naming the field, when this job cannot continue checkpoint `tag` exactly (another
    layout, objective or batch sequence). loader_mismatch: the training loader's resume_mismatch, if it has one."""
    from pretrain.core.config import to_dict

    problem = manifest.resume_problem(ckpt_dir, tag, world_size=world_size,
                                      tensor_parallel=cfg.parallel.tensor_parallel, config=to_dict(cfg),
                                      objective=objective, loader_mismatch=loader_mismatch)
    if problem:
        raise ConfigError(problem)


def check_resume(cfg, world_size: int, objective: str | None = None, make_loader: Callable[[], Any] | None = None
                 ) -> None:
    """`--validate-only --resume`, without a process group: ConfigError when the checkpoint a resume would load
    (the newest from `latest` down that looks intact without reading it: note, manifest, sizes) cannot be
    continued by this job, or when none is intact. make_loader() builds the training loader, only when the
    checkpoint records a loader state to compare with."""
    ckpt_dir = cfg.checkpoint_dir()
    try:
        tag = read_pointer(ckpt_dir)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"--resume: {err}") from None
    broken = []
    while tag is not None and (why := manifest.cheap_problem(ckpt_dir / tag)):
        broken.append(f"{tag} ({why})")
        tag = previous_complete(ckpt_dir, tag)
    if tag is None:
        if broken:
            raise ConfigError(f"--resume: no intact checkpoint in {ckpt_dir}: {'; '.join(broken)}")
        return
    mismatch = (lambda state: make_loader().resume_mismatch(state)) if make_loader is not None else None
    check_continues(ckpt_dir, tag, cfg, world_size, objective, mismatch)


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores DeepSpeed's state (model, optimizer, scheduler) and returns (client_state, this rank's
    state). A failure marks the tag broken (`mark_broken`) before it is raised as CheckpointLoadError, so the next
    start resumes from the checkpoint before it."""
    rank = torch.distributed.get_rank()
    tag_dir = Path(ckpt_dir) / tag
    try:
        rank_state = torch.load(tag_dir / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint at {tag_dir}")
    except Exception as err:  # what fails here is reading the files (DeepSpeed's ZeRO-1/2 load runs no collective)
        why = f"failed to load on rank {rank}: {type(err).__name__}: {err}"
        previous = mark_broken(ckpt_dir, tag, why)
        then = (f"`latest` now names {previous}, which the next start resumes from" if previous
                else "there is no earlier intact checkpoint")
        raise CheckpointLoadError(f"{tag_dir} {why}. Marked broken ({tag_dir / manifest.BROKEN}); {then}") from err
    torch.distributed.barrier()  # every rank has loaded: only then is the run resumed
    return client_state or {}, rank_state
