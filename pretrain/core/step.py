"""The training step's logic and the evaluation's, apart from DeepSpeed: pretrain.core.engine.Engine runs them
with DeepSpeed's forward, backward and optimizer step; pretrain/core/dry_run.py runs them under a fake CUDA device.

Host and device work are kept apart. On the host, before anything reaches the device, `MicroBatch.prepare`
checks the batch against the model, lets the objective draw its random numbers (Objective.prepare: ELMER's
exit layers, NAR and JANUS masks, from the objective's checkpointed CPU generator) and counts
what the step's figures need (targets, tokens, samples). On the device, `train_step` moves each micro-batch
(the one host-to-device copy), runs forward and backward, and accumulates the figures in `MetricSums` on the
device. The step's loss scaling uses the targets of every data-parallel rank, summed by one all-reduce of a
device tensor and kept on the device: a micro-step reads nothing back to the host. Figures reach the host once
per log window (MetricSums.reduce).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable

import torch

from model.config import SPECIAL
from pretrain.core import distributed
from pretrain.core.metrics import MetricSums
from pretrain.core.objectives import Metrics, Objective

Batch = dict[str, Any]
ToDevice = Callable[[Batch], Batch]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def real_tokens(batch: Batch) -> int:
    """Non-pad source and target tokens: what the model actually processed."""
    return int((batch["src_tokens"] != SPECIAL.pad).sum() + (batch["tgt_tokens"] != SPECIAL.pad).sum())


def check_positions(batch: Batch, max_source_positions: int, max_target_positions: int) -> None:
    """Refuse a host batch that would index past the model's position tables (on a GPU that is a device-side
    assert far from its cause). Host tensors: no device sync."""
    if batch["src_tokens"].shape[1] > max_source_positions:
        raise ValueError(f"batch source length {batch['src_tokens'].shape[1]} exceeds model.max_source_positions="
                         f"{max_source_positions}")
    positions = batch.get("tgt_positions")
    if positions is not None and positions.numel() and int(positions.max()) > max_target_positions:
        raise ValueError(f"batch target position {int(positions.max())} exceeds model.max_target_positions="
                         f"{max_target_positions}")


@dataclasses.dataclass
class MicroBatch:
    """One prepared host batch and the counts the step needs from it."""

    batch: Batch
    targets: int  # the objective's loss denominator (objective.num_targets)
    tokens: int
    samples: int

    @classmethod
    def prepare(cls, batch: Batch, objective: Objective, model_cfg=None, evaluate: bool = False) -> "MicroBatch":
        """Host work only (batch tensors on the CPU). model_cfg: checks positions against its tables."""
        if model_cfg is not None:
            check_positions(batch, model_cfg.max_source_positions, model_cfg.max_target_positions)
        batch = objective.prepare(batch, evaluate=evaluate)
        samples = batch["sample_ids"].numel() if "sample_ids" in batch else batch["tgt_tokens"].shape[0]
        return cls(batch, objective.num_targets(batch), real_tokens(batch), samples)


def step_scale(micro_batches: list[MicroBatch], device: torch.device, dp_size: int, dp_group) -> torch.Tensor:
    """dp x accum / (targets of the step over all data-parallel ranks), a float64 device scalar: each micro-batch
    loss (a mean over its own targets) times its targets times this gives the gradient of the mean over every
    target of the global batch, once DeepSpeed divides by accum and averages over dp (pretrain/engine.py)."""
    local = float(sum(m.targets for m in micro_batches))
    total = distributed.all_reduce_sum(torch.full((1,), local, dtype=torch.float64, device=device), group=dp_group)
    return (dp_size * len(micro_batches) / total.clamp(min=1.0)).reshape(())


def train_step(micro_batches: list[MicroBatch], *, forward: Callable[[Batch], tuple[torch.Tensor, Metrics]],
               backward: Callable[[torch.Tensor], None], optimizer_step: Callable[[], None], to_device: ToDevice,
               device: torch.device, stats: MetricSums, dp_size: int, dp_group) -> None:
    """One optimizer update over the prepared micro-batches (DeepSpeed counts them: optimizer_step is called
    after each backward and steps at the last). Adds the step's figures to `stats`, on the device."""
    scale = step_scale(micro_batches, device, dp_size, dp_group)
    for micro in micro_batches:
        loss, metrics = forward(to_device(micro.batch))
        backward(loss * (micro.targets * scale).to(loss.dtype))
        optimizer_step()
        stats.add(metrics)
        stats.add({"loss": (loss.detach().double() * micro.targets, micro.targets)})
        stats.add_extra("tokens", micro.tokens)
        stats.add_extra("samples", micro.samples)


def eval_batches(objective: Objective, loaders: dict[str, Callable[[], Iterable[Batch]]], n_batches: int,
                 model_cfg=None) -> dict[str, list[MicroBatch]]:
    """The first n_batches of a fresh iterator of every held-out loader, prepared on the host (evaluation draws
    come from a fixed-seed copy of the objective's generator: every evaluation sees the same masks)."""
    return {name: [MicroBatch.prepare(b, objective, model_cfg, evaluate=True)
                   for b in itertools.islice(iter(make_loader()), n_batches)]
            for name, make_loader in loaders.items()}


def evaluate(batches: dict[str, list[MicroBatch]], names: list[str], *,
             forward: Callable[[Batch], Metrics], to_device: ToDevice, device: torch.device) -> dict[str, float]:
    """Loss figures over prepared held-out batches: means over every rank's batches. Every rank runs the same
    number of forwards (ZeRO-3 gathers parameters collectively): the smallest count over all ranks, agreed by one
    all-reduce of a device tensor, read once on the host per loader."""
    sums = MetricSums(names, device=device)
    for prepared in batches.values():
        count = torch.full((1,), len(prepared), dtype=torch.int64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        for micro in prepared[:int(count)]:
            sums.add(forward(to_device(micro.batch)))
    means, _ = sums.reduce()
    return means
