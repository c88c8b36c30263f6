"""Process groups: torch.distributed through DeepSpeed, then megatron-core's tensor/data-parallel groups.

Order matters (stack-notes): deepspeed.init_distributed -> model.parallel.initialize (megatron groups and the
CPU RNG tracker) -> deepspeed.initialize(..., mpu=MegatronMpu()). DeepSpeed asks its `mpu` for
get_model_parallel_* and get_data_parallel_*; megatron names them tensor_model_parallel_*, so the adapter maps them.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from model import parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_build() -> None:
    """DeepSpeed JIT-builds its shared-memory all-reduce op (~22 s) at init_distributed on CPU; only inference
    uses it. Marking it incompatible makes DeepSpeed skip the build and use plain gloo collectives."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # probed once and cached in the module, so the edit persists
    for name in ("deepspeed_shm_comm", "deepspeed_ccl_comm"):
        compatible[name] = False


def uses_gpu() -> bool:
    return torch.cuda.is_available()


def init(tp_size: int, seed: int, timeout_minutes: int = 30) -> "MegatronMpu":
    """Start torch.distributed (gloo on CPU, nccl on GPU) and megatron's groups; returns DeepSpeed's mpu."""
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m pretrain`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if uses_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        _skip_shm_comm_build()
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    parallel.initialize(tp_size, seed)
    return MegatronMpu()


def shutdown() -> None:
    parallel.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMpu:
    """DeepSpeed's `mpu` interface over megatron-core's parallel_state (model parallel = tensor parallel here;
    pipeline parallelism is out of scope)."""

    def get_model_parallel_world_size(self) -> int:
        return parallel.tp_size()

    def get_model_parallel_rank(self) -> int:
        return parallel.tp_rank()

    def get_model_parallel_group(self):
        return parallel.tp_group()

    def get_data_parallel_world_size(self) -> int:
        return parallel.dp_size()

    def get_data_parallel_rank(self) -> int:
        return parallel.dp_rank()

    def get_data_parallel_group(self):
        return parallel.dp_group()

    # DeepSpeed also asks for the tensor_* names in a few places (gradient norms, checkpoint names).
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel.tp_src_rank()

    def get_data_parallel_group_ranks(self) -> list[int]:
        group = parallel.dp_group()
        return [0] if group is None else dist.get_process_group_ranks(group)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over `group` (in place, also returned); a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
