"""Full (TP=1) state dicts <-> this rank's tensor-parallel shards.

megatron-core marks each sharded parameter with `tensor_model_parallel=True` and its `partition_dim`; every
other parameter is replicated. Shards are contiguous slices, so gathering is a concatenation in rank order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model import parallel


def _partition_dim(param: torch.Tensor) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gets the full weights (a collective over the TP group: call it on all TP ranks)."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # megatron's `_extra_state` entries (None): pass through
            out[name] = tensor
            continue
        dim = _partition_dim(params[name]) if name in params else None
        if dim is None or parallel.tp_size() == 1:
            out[name] = tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(parallel.tp_size())]
        dist.all_gather(parts, tensor.detach().contiguous(), group=parallel.tp_group())
        out[name] = torch.cat(parts, dim=dim)
    return out


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full weights, keeping this rank's slice of each sharded parameter."""
    params = dict(model.named_parameters())
    local = {}
    for name, tensor in full.items():
        dim = _partition_dim(params[name]) if name in params else None
        if dim is not None and parallel.tp_size() > 1:
            tensor = tensor.chunk(parallel.tp_size(), dim=dim)[parallel.tp_rank()]
        local[name] = tensor
    expected = model.state_dict()
    for name, tensor in local.items():
        if name in expected and isinstance(tensor, torch.Tensor) and expected[name].shape != tensor.shape:
            raise ValueError(f"parameter {name}: checkpoint shape {tuple(full[name].shape)} does not match the "
                             f"model (local shard {tuple(expected[name].shape)} at TP={parallel.tp_size()})")
    model.load_state_dict(local, strict=strict)
