"""A memory plan before renting GPUs: `python -m pretrain --plan --config ... [--world-size N] [key=value ...]`.

The job is validated as for a run (pretrain.run.prepare), then one micro-step of the real configuration (preset,
micro-batch, lengths, objectives, tensor parallelism, activation checkpointing, precision) runs forward and
backward over fake tensors (pretrain/core/dry_run.py: nothing is allocated, no GPU is needed) while torch's
MemTracker follows every storage the step creates. The plan prints the peak GPU memory of one rank and its parts:

    part         bytes per parameter of the rank's tensor-parallel shard          divided over data parallel
    weights      2 (bf16) or 4 (fp32)                                             at ZeRO-3
    gradients    bf16 + ZeRO: 4 (fp32 accumulation, data_types.grad_accum_dtype);  at ZeRO-2 and 3
                 otherwise the weights' size
    optimizer    AdamW's two moments, 8; under bf16 also the fp32 master copy, 4  at ZeRO-1, 2 and 3
    activations  measured: the step's peak less the weights and the gradients live at that moment

(pretrain.core.config.deepspeed_dict sets what these rules assume: bf16 with ZeRO accumulates gradients in
fp32.) The batch is the longest the loader can make: loader.batch_size samples of shard.seq_len tokens (+ EOS),
fewer when loader.max_tokens caps it, corrupted by each active objective; the activation peak is the largest over
the objectives. Attention runs as SDPA in the plan (FlexAttention cannot differentiate over fake tensors); it
keeps the same activations and adds the dense mask FlexAttention replaces with block masks. Not counted: the CUDA context and the caching allocator's rounding and fragmentation (a few
hundred MiB on a real GPU), communication buckets, and DeepSpeed's temporary flat copies at the optimizer step.
bench/gpu_check.sh compares the plan with torch.cuda.max_memory_allocated on a real GPU.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from pretrain import core

MiB = 1 << 20


@dataclasses.dataclass
class MemoryPlan:
    """One rank's planned peak GPU memory, in bytes, and what it was planned for."""

    layout: str  # "world 8 = TP 2 x DP 4, ZeRO-1, bf16"
    batch: str  # "32 x 512 tokens"
    parameters: int  # the rank's tensor-parallel shard, before any ZeRO partitioning
    weights: int
    gradients: int
    optimizer: int
    activations: int  # the largest over the active objectives
    per_objective: dict[str, int]  # each objective's activation peak

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def lines(self) -> list[str]:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations)]
        out = [f"memory plan: {self.layout}; micro-batch {self.batch}; {self.parameters:,} parameters per rank"]
        out += [f"  {name:<12} {size / MiB:10.1f} MiB" for name, size in parts]
        out += [f"    {name:<10} {size / MiB:10.1f} MiB" for name, size in sorted(self.per_objective.items())]
        out += [f"  {'peak':<12} {self.peak / MiB:10.1f} MiB per GPU (without the CUDA context)",
                f"peak_bytes={self.peak}"]
        return out


def state_bytes(parameters: int, precision: str, zero_stage: int, data_parallel: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes of one rank for `parameters` elements (the table in the docstring)."""
    low = 2 if precision == "bf16" else 4
    weights = parameters * low
    gradients = parameters * (4 if precision == "bf16" and zero_stage >= 1 else low)
    optimizer = parameters * (8 + (4 if precision == "bf16" else 0))
    return (weights // (data_parallel if zero_stage >= 3 else 1),
            gradients // (data_parallel if zero_stage >= 2 else 1),
            optimizer // (data_parallel if zero_stage >= 1 else 1))


def longest_batches(plan) -> dict[str, dict]:
    """Per active objective, the longest host batch the training loader can make, corrupted as it corrupts."""
    from data_pipeline.config import resolve
    from data_pipeline.corruption import CorruptionTables, PretrainCollator, to_torch
    from data_pipeline.tokenizer import NUM_SPECIAL
    from data_pipeline.stream import open_shard_dir

    lc = plan.data_cfg.loader
    _, _, tok, _ = open_shard_dir(resolve(lc.shard_dir, plan.data_cfg.work()), "pretrain",
                                  resolve(lc.tokenizer, plan.data_cfg.work()) if lc.tokenizer else "", "size",
                                  lc.on_corrupt_shard)
    seq_len = plan.data_cfg.shard.seq_len
    samples = lc.batch_size if lc.max_tokens <= 0 else max(1, min(lc.batch_size, lc.max_tokens // (seq_len + 1)))
    rng = np.random.default_rng(0)
    rows = [(i, {"tok": rng.integers(NUM_SPECIAL, tok.vocab_size, seq_len).astype(np.int64)}) for i in range(samples)]
    tables = CorruptionTables.from_tokenizer(tok)
    return {name: to_torch(PretrainCollator(lc.corruption, tables, {name: 1.0}, plan.cfg.train.seed)(rows, 0, 0))
            for name in plan.cfg.objective.active()}


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """What DeepSpeed's bf16 mode does to the module (module.to() cannot swap fake parameters in place)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)


def activation_peak(plan, objective, host_batch: dict, precision: str) -> tuple[int, int]:
    """(activation bytes, parameters of the rank): the peak of one forward + backward less the weights and the
    gradients live at that moment (MemTracker), and the rank's parameter count."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from model.seq2seq import Seq2SeqModel
    from pretrain.core import activation_checkpointing, dry_run
    from pretrain.core.engine import ObjectiveModule
    from pretrain.core.step import MicroBatch

    micro = MicroBatch.prepare(host_batch, objective, plan.model_cfg)
    _, device = dry_run.pass_devices()  # the device where backward runs on this build
    with dry_run.FakeDevice(device) as fd:
        # SDPA: FlexAttention's backward cannot run over fake tensors (dry_run._flex_without_compile)
        model_cfg = dataclasses.replace(plan.model_cfg, attention_backend="sdpa")
        model = fd.build(lambda: ObjectiveModule(Seq2SeqModel(model_cfg), objective))
        if precision == "bf16":
            with fd.mode:
                _cast_parameters(model, torch.bfloat16)
        if plan.cfg.train.activation_checkpointing:
            activation_checkpointing.apply(model.model)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            loss, _ = model.train()(fd.batch(micro.batch))
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[fd.device]
        parameters = sum(p.numel() for p in model.parameters())
    return peak["Total"] - peak[_MemRefType.PARAM] - peak[_MemRefType.GRAD], parameters


def memory_plan(plan, build_objective: Callable[[Any, int], Any]) -> MemoryPlan:
    """The memory plan of a validated pretraining job (pretrain.run.Plan, whose module passes its
    build_objective(plan, dp_rank): the objective as training builds it)."""
    from pretrain.core import dry_run

    cfg = plan.cfg
    tp, dp, stage = cfg.parallel.tensor_parallel, plan.data_parallel, core.zero_stage(cfg)
    precision = "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision  # GPUs: bf16
    batches = longest_batches(plan)
    per_objective, parameters = {}, 0
    with dry_run.fake_world(plan.world_size, tp, seed=cfg.train.seed):
        for name, batch in batches.items():
            objective = build_objective(plan, dp_rank=0)
            objective.start_step(1)
            per_objective[name], parameters = activation_peak(plan, objective, batch, precision)
    weights, gradients, optimizer = state_bytes(parameters, precision, stage, dp)
    any_batch = next(iter(batches.values()))
    return MemoryPlan(layout=f"world {plan.world_size} = TP {tp} x DP {dp}, ZeRO-{stage}, {precision}"
                             + (", activation checkpointing" if cfg.train.activation_checkpointing else ""),
                      batch=f"{any_batch['src_tokens'].shape[0]} x {plan.data_cfg.shard.seq_len} tokens",
                      parameters=parameters, weights=weights, gradients=gradients, optimizer=optimizer,
                      activations=max(per_objective.values()), per_objective=per_objective)
