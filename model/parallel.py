"""Tensor-parallel state in one place: megatron-core's parallel_state, plus what it only does on CUDA.

megatron-core 0.16 assumes CUDA in a few places we use (see docs/stack-notes): its RNG tracker keeps CUDA
generator states, and `gather_output=True` allocates on the current CUDA device. On a CPU (gloo) run we install
a tracker that keeps CPU generator states and gather logits with our own autograd function. On a GPU run
megatron's own tracker is used; torch itself is never patched.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import random as megatron_random

_TP_RNG = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if is_initialized() else 1


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank() if is_initialized() else 0


def tp_group():
    return parallel_state.get_tensor_model_parallel_group() if is_initialized() else None


def tp_src_rank() -> int:
    """The global rank of this tensor-parallel group's first member (0 before initialization)."""
    return parallel_state.get_tensor_model_parallel_src_rank() if is_initialized() else 0


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size() if is_initialized() else 1


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank() if is_initialized() else 0


def dp_group():
    return parallel_state.get_data_parallel_group() if is_initialized() else None


def megatron_config(params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """The config megatron-core layers read. CPU initialization builds the full master weight from the
    default generator and slices it, so every TP size yields the same full weights from one seed."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size(),
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


class CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron's tracker, keeping CPU generator states: dropout inside TP regions differs per TP rank."""

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=_TP_RNG):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def seed_everything(seed: int) -> None:
    """Seed python, torch and the TP-region tracker the way megatron does: the default generator gets
    `seed` (equal across TP peers, so dropout outside TP regions agrees), the TP tracker seed + 2718 + tp_rank."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        megatron_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank(), ep_rank=0, etp_rank=0,
                                                        force_reset_rng=True)
        return
    tracker = CpuRNGStatesTracker()
    tracker.add(_TP_RNG, seed + 2718 + tp_rank())
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def rng_tracker():
    return megatron_random.get_cuda_rng_tracker()


def initialize(tp_size: int = 1, seed: int = 1234, *, gloo_groups: bool = True) -> None:
    """Set up tensor/data-parallel groups on an initialized torch.distributed world and seed the RNGs.
    gloo_groups=False: without megatron's CPU-side gloo groups (the fake process group of the dry run has no
    store gloo could use, and nothing of ours runs collectives on them)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialized before model.parallel.initialize")
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"parallel.tp_size={tp_size} must divide the world size {world}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                                 create_gloo_process_groups=gloo_groups)
    seed_everything(seed)


def ensure_initialized(seed: int | None = None) -> None:
    """megatron-core layers need a tensor-parallel group even at TP=1. A plain single process (a test, a
    decoding script) gets a world of one over gloo, rendezvous through a file so no port is taken."""
    if is_initialized():
        return
    if not dist.is_initialized():
        store_dir = tempfile.mkdtemp(prefix="tandem-pg-")
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(store_dir, 'store')}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    if seed is not None or megatron_random._CUDA_RNG_STATE_TRACKER is None:
        seed_everything(torch.initial_seed() % 2**31 if seed is None else seed)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


class _GatherLastDim(torch.autograd.Function):
    """All-gather the vocab shards of logits (forward); keep this rank's slice of the gradient (backward)."""

    @staticmethod
    def forward(ctx, x):
        group, world = tp_group(), tp_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(tp_size(), dim=-1)[tp_rank()].contiguous()


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if tp_size() == 1 else _GatherLastDim.apply(x)


class _SumOverTP(torch.autograd.Function):
    """Sum a per-rank partial (e.g. a reduction over this rank's vocabulary shard) across TP ranks (forward);
    each rank's partial contributed once to the sum, so its gradient is the sum's gradient unchanged (backward)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()  # a fresh buffer: all_reduce works in place and x may be needed by autograd elsewhere
        dist.all_reduce(out, group=tp_group())
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


def sum_over_tp(x: torch.Tensor) -> torch.Tensor:
    return x if tp_size() == 1 else _SumOverTP.apply(x.contiguous())


def pick_over_tp(local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """local [..., V/tp] (this rank's vocabulary shard of a [..., V] tensor), targets [...] full-vocabulary ids ->
    the [...] values at the targets, equal on every TP rank (each target lives in one shard; the others add 0).
    Indexing, not gather: its backward keeps only the shape of `local`, which megatron's cross entropy may then
    overwrite in place (Seq2SeqModel.token_loss)."""
    shard = local.shape[-1]
    index = targets - tp_rank() * shard  # the target's index in this rank's shard
    in_shard = (index >= 0) & (index < shard)
    rows = local.reshape(-1, shard)
    picked = rows[torch.arange(rows.shape[0], device=rows.device), index.clamp(0, shard - 1).reshape(-1)]
    picked = picked.view_as(targets)
    return sum_over_tp(torch.where(in_shard, picked, torch.zeros_like(picked)))


class _LogSoftmaxOverTP(torch.autograd.Function):
    """log_softmax over a vocabulary split across TP ranks: logits [..., V/tp] -> log-probabilities [..., V/tp]
    normalised over the full V (forward: the row max and the sum of exponentials all-reduced). Backward:
    d logits = g - softmax * (sum of g over the full V), the sum all-reduced: every rank's log-probabilities
    depend on every shard through the normaliser."""

    @staticmethod
    def forward(ctx, logits):
        top = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group())
        shifted = logits - top
        total = shifted.exp().sum(dim=-1, keepdim=True)
        dist.all_reduce(total, group=tp_group())
        log_probs = shifted - total.log()
        ctx.save_for_backward(log_probs)
        return log_probs

    @staticmethod
    def backward(ctx, grad):
        (log_probs,) = ctx.saved_tensors
        total = grad.sum(dim=-1, keepdim=True)
        dist.all_reduce(total, group=tp_group())
        return grad - log_probs.exp() * total


def log_softmax_over_tp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1) if tp_size() == 1 else _LogSoftmaxOverTP.apply(logits.contiguous())
