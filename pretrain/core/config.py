"""The engine's typed config: omegaconf structured dataclasses, a YAML file, `key=value` overrides, validation.

`EngineConfig` holds what the training engine reads (train loop, optimizer, schedule, DeepSpeed, parallel
layout, checkpoints, evaluation, tracking); each recipe's config extends it (pretrain.pretrain_config.PretrainConfig
adds the model, the data and the objective; finetune.config.FinetuneConfig the task). Relative paths are relative
to the working directory (the repository root). The command line both recipes share is here too (`cli_parser`).

`validate_engine()` runs before any process group starts and raises ConfigError naming the field (and file) at fault.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from configs import ConfigError, config_path, load_typed, not_found
from pretrain.core.schedule import DECAYS


# --- engine sections (shared with finetuning) ------------------------------------------------------------

@dataclass
class TrainSection:
    steps: int = 100  # optimizer updates in the whole run
    grad_accum: int = 1  # micro-batches per update on each data-parallel rank
    log_every: int = 10
    seed: int = 1234
    activation_checkpointing: bool = False  # recompute each encoder/decoder layer in backward
    record_sample_ids: bool = False  # write <output_dir>/samples/rank_N.jsonl: which samples each step saw
    progress_bar: bool = True
    # > 0: stop after this many evaluations in a row without a new best of checkpoint.keep_best (fairseq --patience)
    early_stop_patience: int = 0


@dataclass
class OptimSection:
    # "torch": torch.optim.AdamW, its fused kernel on CUDA or CPU (part of torch: nothing to build). "deepspeed":
    # DeepSpeed's FusedAdam (CPUAdam under optimizer offload), accepted only where that op was prebuilt at install
    # (DS_BUILD_FUSED_ADAM=1 / DS_BUILD_CPU_ADAM=1): otherwise DeepSpeed JIT-compiles it at the first step, which
    # needs nvcc and CUDA_HOME on every node.
    impl: str = "torch"
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases, norms or the mask vector (1-d parameters)
    clip_grad: float = 1.0  # global gradient-norm clipping (0 = off)


@dataclass
class ScheduleSection:
    decay: str = "linear"  # one of constant, linear, cosine, inverse_sqrt
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # floor of linear/cosine decay, as a fraction of the peak


@dataclass
class DeepSpeedSection:
    config: str = "configs/deepspeed/zero1.json"  # ZeRO stage, offload, bucket sizes
    precision: str = "auto"  # fp32, bf16, or auto (bf16 where the hardware supports it)


@dataclass
class ParallelSection:
    tensor_parallel: int = 1  # megatron-core TP size; data parallel = world size / tensor_parallel


EXPORT_SOURCES = ("last", "best")  # checkpoint.export_from (pretrain.core.averaging)


@dataclass
class CheckpointSection:
    dir: str = ""  # empty: <output_dir>/checkpoints
    every_steps: int = 0  # 0: only at the end of the run
    keep_last: int = 2  # complete checkpoints kept (0 = all)
    resume: bool = False  # continue from the checkpoint `latest` names (the --resume flag)
    save_at_end: bool = True
    # Full (TP-merged, ZeRO-gathered) model weights + model config at the end, <output_dir>/final_model.pt:
    # what finetuning starts from, at any TP size or ZeRO stage (model.sharding.load_full_state_dict).
    export_final: bool = True
    # ... and beside it <output_dir>/hf, the Hugging Face folder of those weights with the tokenizer, logged as the
    # run's MLflow model (pretrain/core/hf_export.py): a second copy of the weights, and some seconds.
    export_hf: bool = True
    # A validation metric (as evaluation logs it: nar/loss, gen/rouge1, ...; direction from pretrain.core.directions)
    # ranking checkpoints: a step among the keep_best_count best is saved and never pruned. "": off.
    keep_best: str = ""
    keep_best_count: int = 1
    # one of EXPORT_SOURCES: final_model.pt holds the last weights, or (best) the best checkpoint's
    export_from: str = "last"
    average: int = 1  # > 1: the mean of that many: the last weights and the newest checkpoints, or the best ones


@dataclass
class EvalSection:
    every_steps: int = 0  # 0: only at the end of the run
    batches: int = 4  # held-out batches per objective and data-parallel rank
    at_end: bool = True


@dataclass
class TrackingSection:
    mlflow: bool = True
    # empty: $MLFLOW_TRACKING_URI, else the project's one store sqlite:///<repo>/runs/mlflow.db (pretraining,
    # finetuning and evaluation side by side; pretrain.core.tracking.resolve_uri)
    uri: str = ""
    experiment: str = "tandem-pretrain"
    run_name: str = ""  # empty: the config name
    # at the end of a job, how long rank 0 waits for an MLflow server that is away to come back and take the rest
    # of the run; after that `python -m pretrain.core backfill <output_dir>` sends it (pretrain.core.tracking)
    finish_wait_s: float = 60.0


@dataclass
class EngineConfig:
    name: str = "run"
    output_dir: str = "runs/pretrain/run"
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    config_file: str = ""  # filled by load_config(); used in error messages

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"


# --- loading --------------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: Sequence[str], schema: type):
    """YAML file + `key=value` overrides (the command line's) -> a typed config object of `schema` (an EngineConfig;
    not yet validated)."""
    return load_typed(schema, path, overrides, overrides_from="command-line override")


def to_dict(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --- validation of the engine sections -----------------------------------------------------------------

def _fail(cfg: EngineConfig, field_name: str, why: str):
    where = f"{cfg.config_file}: " if cfg.config_file else ""
    raise ConfigError(f"{where}{field_name}: {why}")


DS_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler", "data_types")
# ZeRO-3 keeps parameters of at most this many elements whole on every rank instead of gathering them for each
# module: "auto" in the JSON means PERSISTENCE_PER_D_MODEL x d_model (as Hugging Face's integration resolves it),
# so norms and biases stay resident while every weight matrix, at any model size, is partitioned.
PERSISTENCE_PER_D_MODEL = 10


def read_deepspeed_json(cfg: EngineConfig) -> dict[str, Any]:
    path = config_path(cfg.deepspeed.config)
    if not path.is_file():
        _fail(cfg, "deepspeed.config", not_found(path))
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        _fail(cfg, "deepspeed.config", f"{path} is not valid JSON: {err}")
    owned = [k for k in DS_OWNED_KEYS if k in ds]
    if owned:
        _fail(cfg, "deepspeed.config", f"{path} sets {owned}; batch sizes, clipping, precision, optimizer and "
                                       "schedule come from the typed config (train/optim/schedule/deepspeed.precision)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        _fail(cfg, "deepspeed.config", f"{path}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    return ds


def zero_stage(cfg: EngineConfig) -> int:
    return int(read_deepspeed_json(cfg).get("zero_optimization", {}).get("stage", 0))


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: EngineConfig) -> str:
    import torch

    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def validate_engine(cfg: EngineConfig, world_size: int) -> None:
    t, o, s, c, e = cfg.train, cfg.optim, cfg.schedule, cfg.checkpoint, cfg.eval
    if t.steps < 1:
        _fail(cfg, "train.steps", f"must be >= 1, got {t.steps}")
    if t.grad_accum < 1:
        _fail(cfg, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    if t.log_every < 1:
        _fail(cfg, "train.log_every", f"must be >= 1, got {t.log_every}")
    if not 0 <= t.seed < 2**32:  # numpy's legacy seeding (np.random.seed) takes 32 bits
        _fail(cfg, "train.seed", f"must be in [0, 2**32), got {t.seed}")
    if o.impl not in ("torch", "deepspeed"):
        _fail(cfg, "optim.impl", f"must be 'torch' or 'deepspeed', got {o.impl!r}")
    if o.impl == "deepspeed":
        op = deepspeed_adam_op(cfg)
        if not deepspeed_op_prebuilt(op):
            _fail(cfg, "optim.impl", f"'deepspeed' uses DeepSpeed's {op} op, which this DeepSpeed install does not "
                                     "have prebuilt: DeepSpeed would JIT-compile it at the first step, which needs "
                                     "nvcc and CUDA_HOME on every node. Use optim.impl=torch (torch's fused AdamW, "
                                     f"shipped with torch), or install DeepSpeed with DS_BUILD_{op.upper()}=1")
    if not o.lr > 0:
        _fail(cfg, "optim.lr", f"must be > 0, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail(cfg, "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    if o.weight_decay < 0 or o.clip_grad < 0:
        _fail(cfg, "optim.weight_decay" if o.weight_decay < 0 else "optim.clip_grad", "must be >= 0")
    if s.decay not in DECAYS:
        _fail(cfg, "schedule.decay", f"must be one of {DECAYS}, got {s.decay!r}")
    if not 0 <= s.warmup_steps <= t.steps:
        _fail(cfg, "schedule.warmup_steps", f"must be in [0, train.steps={t.steps}], got {s.warmup_steps}")
    if not 0 <= s.min_lr_ratio <= 1:
        _fail(cfg, "schedule.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")
    if cfg.deepspeed.precision not in ("fp32", "bf16", "auto"):
        _fail(cfg, "deepspeed.precision", f"must be fp32, bf16 or auto, got {cfg.deepspeed.precision!r} "
                                          "(fp16 is not supported: it needs loss scaling and fails on CPU)")
    tp = cfg.parallel.tensor_parallel
    if tp < 1:
        _fail(cfg, "parallel.tensor_parallel", f"must be >= 1, got {tp}")
    if world_size % tp:
        _fail(cfg, "parallel.tensor_parallel", f"={tp} does not divide the world size {world_size} (WORLD_SIZE "
                                               "from the launcher): data parallel = world size / tensor_parallel")
    stage = zero_stage(cfg)
    if stage == 3 and tp > 1:
        _fail(cfg, "deepspeed.config", f"{cfg.deepspeed.config} selects ZeRO stage 3, which this project runs only "
                                       f"with parallel.tensor_parallel=1 (got {tp}); use ZeRO-1 or ZeRO-2 with tensor "
                                       "parallelism")
    if c.every_steps < 0 or c.keep_last < 0:
        _fail(cfg, "checkpoint.every_steps" if c.every_steps < 0 else "checkpoint.keep_last", "must be >= 0")
    _validate_keep_best(cfg)
    if e.every_steps < 0 or e.batches < 0:
        _fail(cfg, "eval.every_steps" if e.every_steps < 0 else "eval.batches", "must be >= 0")
    if not cfg.tracking.finish_wait_s >= 0:
        _fail(cfg, "tracking.finish_wait_s", f"must be >= 0 seconds, got {cfg.tracking.finish_wait_s}")


def _validate_keep_best(cfg: EngineConfig) -> None:
    """checkpoint.keep_best / keep_best_count / export_from / average and train.early_stop_patience."""
    from pretrain.core.directions import direction

    c, e = cfg.checkpoint, cfg.eval
    if c.keep_best:
        try:
            direction(c.keep_best)
        except ValueError as err:
            _fail(cfg, "checkpoint.keep_best", str(err))
        if not (e.every_steps or e.at_end):
            _fail(cfg, "checkpoint.keep_best", "needs evaluations to rank checkpoints: set eval.every_steps")
    if c.keep_best_count < 1:
        _fail(cfg, "checkpoint.keep_best_count", f"must be >= 1, got {c.keep_best_count}")
    if cfg.train.early_stop_patience < 0:
        _fail(cfg, "train.early_stop_patience", f"must be >= 0, got {cfg.train.early_stop_patience}")
    if cfg.train.early_stop_patience and not (c.keep_best and e.every_steps):
        _fail(cfg, "train.early_stop_patience", "watches the metric checkpoint.keep_best names, at every "
                                                "eval.every_steps: set both")
    if c.export_from not in EXPORT_SOURCES:
        _fail(cfg, "checkpoint.export_from", f"must be one of {EXPORT_SOURCES}, got {c.export_from!r}")
    if c.export_from == "best" and not c.keep_best:
        _fail(cfg, "checkpoint.export_from", "best needs checkpoint.keep_best (the metric that ranks checkpoints)")
    if c.average < 1:
        _fail(cfg, "checkpoint.average", f"must be >= 1, got {c.average}")
    if c.average > 1 and c.export_from == "best" and c.average > c.keep_best_count:
        _fail(cfg, "checkpoint.average", f"={c.average} averages the best checkpoints, but only "
                                         f"checkpoint.keep_best_count={c.keep_best_count} are kept")
    if c.average > 1 and c.export_from == "last":
        if not c.every_steps:
            _fail(cfg, "checkpoint.average", f"={c.average} averages the last checkpoints, but checkpoint.every_steps "
                                             "is 0 (only the end of the run is saved)")
        if c.keep_last and c.keep_last < c.average:
            _fail(cfg, "checkpoint.average", f"={c.average} averages the last checkpoints, but "
                                             f"checkpoint.keep_last={c.keep_last} keeps fewer")


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (None, "none")


def deepspeed_adam_op(cfg: EngineConfig) -> str:
    """The DeepSpeed op that optim.impl=deepspeed runs: CPUAdam on offloaded optimizer states, else FusedAdam."""
    return "cpu_adam" if offloads_optimizer(read_deepspeed_json(cfg)) else "fused_adam"


def deepspeed_op_prebuilt(op: str) -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(op, False))


def deepspeed_dict(cfg: EngineConfig, dp_size: int, micro_batch_size: int, d_model: int = 0) -> dict[str, Any]:
    """The DeepSpeed config: the JSON file's ZeRO/communication settings plus the fields the typed config owns.

    The JSON files in configs/deepspeed/ are the reference for ZeRO settings; batch sizes, clipping, precision
    and the optimizer are filled in here so they have one source of truth. Under bf16 with ZeRO, gradients are
    accumulated over micro-batches in fp32 (data_types.grad_accum_dtype): bf16 sums keep 8 bits of mantissa, so
    grad_accum micro-batches would lose the small ones (ZeRO-1 then runs DeepSpeed's BF16_Optimizer; without
    ZeRO DeepSpeed has no fp32 accumulation for bf16 weights). d_model resolves a ZeRO-3
    stage3_param_persistence_threshold of "auto" (PERSISTENCE_PER_D_MODEL x d_model)."""
    ds = read_deepspeed_json(cfg)
    precision = resolve_precision(cfg)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold") == "auto":
        if d_model < 1:
            _fail(cfg, "deepspeed.config", f"{cfg.deepspeed.config}: stage3_param_persistence_threshold=auto needs "
                                           "the model's d_model")
        zero["stage3_param_persistence_threshold"] = PERSISTENCE_PER_D_MODEL * d_model
    ds.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro_batch_size * cfg.train.grad_accum * dp_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,  # the engine logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    })
    if precision == "bf16" and zero.get("stage", 0) >= 1:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.optim.impl == "deepspeed":
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas),
                                                       "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}}
    elif offloads_optimizer(ds):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on offloaded states: slower, but no JIT build
    return ds


def launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cli_parser(prog: str, description: str, config_help: str):
    """The options `python -m pretrain` and `python -m finetune` share (finetune adds --init):
    --config PATH [--resume] [--validate-only [--world-size N] [--json]] [key=value ...]."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint `latest` names")
    parser.add_argument("--validate-only", action="store_true",
                        help="check the whole job for --world-size processes without starting any (no process "
                             "group, no output); print `config ok: ...` and exit 0, or `error: ...` and exit 2")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --validate-only or --plan: the number of processes to check for (default: $WORLD_SIZE "
                             "or 1)")
    parser.add_argument("--json", action="store_true",
                        help="with --validate-only: print one JSON object instead, the stage's facts for the launcher "
                             "(folders, checkpoint pointer, parallel layout, MLflow store, shards) and the verdict; "
                             "also when the config is refused (exit 2)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=50 parallel.tensor_parallel=2")
    return parser


def parse_args(parser, argv: Sequence[str]):
    """Parse and check the shared options (argparse exits with code 2 and `error: ...` on a bad command line)."""
    args = parser.parse_intermixed_args(list(argv))  # options anywhere, also after the key=value overrides
    if args.json and not args.validate_only:
        parser.error("--json goes with --validate-only")
    if args.world_size is not None:
        if not (args.validate_only or getattr(args, "plan", False)):
            parser.error("--world-size goes with --validate-only or --plan (a training job takes its world size "
                         "from the launcher)")
        if args.world_size < 1:
            parser.error(f"--world-size must be >= 1, got {args.world_size}")
    return args
