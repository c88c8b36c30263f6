"""Optional activation checkpointing: each encoder/decoder layer keeps only its inputs and recomputes in backward.

torch.utils.checkpoint restores the default generator for the recomputation, but dropout inside tensor-parallel
regions draws from megatron's RNG tracker, whose states have moved on by then. The recompute context puts the
tracker back to the states it had when the layer first ran, so the recomputed dropout masks are the same.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import checkpoint

from model import parallel


def _snapshot() -> dict[str, torch.Tensor]:
    # Generator states are host byte tensors: copied outside any tensor mode (a fake dry run's included).
    with _disable_current_modes():
        return {k: v.clone() for k, v in parallel.rng_tracker().get_states().items()}


@contextlib.contextmanager
def _tracker_states(states: dict[str, torch.Tensor]):
    tracker = parallel.rng_tracker()
    current = _snapshot()
    with _disable_current_modes():
        tracker.set_states({k: v.clone() for k, v in states.items()})
    try:
        yield
    finally:
        tracker.set_states(current)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        states = _snapshot()
        contexts = lambda: (contextlib.nullcontext(), _tracker_states(states))  # noqa: E731
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


def apply(model: nn.Module, layer_lists: tuple[str, ...] = ("encoder_layers", "decoder_layers")) -> int:
    """Wrap the forward of every layer in the named ModuleLists; returns how many were wrapped."""
    count = 0
    for name in layer_lists:
        for layer in getattr(model, name):
            layer.forward = _checkpointed(layer.forward)
            count += 1
    if count == 0:
        raise ValueError(f"activation checkpointing found no layers in {layer_lists}")
    return count
