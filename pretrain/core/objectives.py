"""The objective interface shared by pretraining and finetuning, and a registry by name.

An objective turns (model, batch) into a loss and the figures to log. The loss is a mean over the batch's
non-pad targets (`num_targets`); the engine rescales it so that a step's gradient is the mean over every target
of the global batch, however the batch is split over data-parallel ranks and accumulation micro-steps.

Metrics are {name: (sum, count)}: summing both over micro-steps and ranks and dividing once gives exact means.
Every name an objective can return is listed by `metric_names()`, so all ranks reduce the same vector. Their
entries stay on the device (tensors; a count may be a plain number): the engine sums them there and reads them
on the host once per log window.

Random draws (ELMER's exit layers, NAR and JANUS masks) are made on the host, before the batch moves to the
device (`prepare`), from the objective's own CPU generator, which is checkpointed: a resumed run draws the same,
the step reads nothing back from the device to draw, and what was drawn travels with the batch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from model.config import SPECIAL

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]

_REGISTRY: dict[str, Callable[..., "Objective"]] = {}


def register(name: str):
    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return wrap


def build(name: str, **kwargs) -> "Objective":
    if name not in _REGISTRY:
        raise ValueError(f"objective.name={name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def registered() -> list[str]:
    return sorted(_REGISTRY)


class Objective:
    name = "objective"

    def start_step(self, step: int) -> None:
        """Called by the engine once per optimizer step (`step`, 1-based), before that step's grad_accum
        micro-batches: a choice made here holds for the whole step (bang_mixed's AR/NAR draw), so one process
        accumulating micro-batches trains like data-parallel ranks each taking one. No-op by default."""

    def prepare(self, batch: dict[str, Any], evaluate: bool = False) -> dict[str, Any]:
        """Host side, on the batch before it moves to the device: the batch with this objective's random draws
        added (a new dict; the input is left alone). evaluate=True draws from a fixed-seed copy of the generator,
        so every evaluation sees the same draws and training's generator is untouched. The engine prepares every
        batch (pretrain.step.MicroBatch); loss() prepares a batch that was not. Default: nothing to draw."""
        return batch

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        """Training loss (mean over `num_targets(batch)`) and metrics."""
        raise NotImplementedError

    def eval_metrics(self, model, batch: dict[str, Any]) -> Metrics:
        """Held-out figures (called under torch.no_grad); defaults to the training metrics."""
        return self.loss(model, batch)[1]

    def metric_names(self) -> list[str]:
        raise NotImplementedError

    def eval_metric_names(self) -> list[str]:
        return self.metric_names()

    def num_targets(self, batch: dict[str, Any]) -> int:
        return int((batch["tgt_tokens"] != SPECIAL.pad).sum())

    # Objectives that draw random numbers keep their own generator; it is checkpointed with the run.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of values where mask, count of mask) as float tensors, detached: one metric entry."""
    mask = mask.to(values.dtype)
    return (values.detach() * mask).sum(), mask.sum()


def gather_rows(mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat indices of mask's True entries, in order, padded to a fixed `size` (at least their number), and
    which of the `size` slots hold one (the padding repeats index 0, to be weighted 0).

    The size comes from the host (counted where the batch was built, e.g. the data side's span counts), never
    from the device: mask.nonzero() or h[mask] would wait for the GPU to know the count (a host sync), while a
    stable sort of the flat mask puts the True entries first with a shape known in advance."""
    flat = mask.reshape(-1)
    size = min(size, flat.numel())
    index = torch.argsort((~flat).to(torch.uint8), stable=True)[:size]
    valid = torch.arange(size, device=flat.device) < flat.sum()
    return index, valid
