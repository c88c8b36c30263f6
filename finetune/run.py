"""Build a finetuning job from its config and run it on the training core's engine (pretrain.core.Engine).

`prepare()` checks everything that needs no process group: config fields, task name, the data config, the task
shards and their tokenizer, the model shape and the tokenizer against the init checkpoint, decoding options
(`python -m finetune --validate-only [--world-size N] [--json] ...` runs just that; `stage_facts`: what --json adds
for the launcher). The resolution generate and evaluate share is finetune.resolve's. `train()` starts the process
groups (pretrain.core.started, shared with pretraining), loads the pretrained weights and hands model + objective +
task loaders to the engine, whose export writes <output_dir>/final_model.pt (full weights, model config, run
record); beside it finetune_meta.json records the task, objective, decoding mode, MLflow runs (finetune and
pretraining), tokenizer and the resolved config: `generate` reads the pair. Last, <output_dir>/hf holds the Hugging
Face export (model, tokenizer, the task's generation settings; pretrain.core.publish_hf), logged as the run's MLflow
model. `--init` also takes a Hugging Face BART/mBART folder (finetune.init_checkpoint.HfCheckpoint).

`data.distilled` trains on a distilled set (finetune.distill) instead of the gold training targets; validation
stays gold. The run then carries the tags training_targets=distilled, teacher_run_id (the AR teacher's MLflow run),
distilled_set and distilled_digest, in MLflow and in finetune_meta.json; every run says training_targets.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from configs import ConfigError, config_path
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.stream import open_shard_dir
from data_pipeline.tokenizer import load_tokenizer
from finetune import data, lead_copy
from finetune import objectives  # noqa: F401  (registers ar, nar, bang_mixed, janus into the core's registry)
from finetune.config import OBJECTIVES, FinetuneConfig, fail, load
from finetune.glge_tasks import get_task
from finetune.init_checkpoint import (FINETUNE_META, TOKENIZER_COPY, HfCheckpoint, check_tokenizer,
                                      is_hf_checkpoint, load_weights, pretrain_run_id, pretrain_step,
                                      read_hf_checkpoint, read_init)
from finetune.resolve import (build_model_config, decoding_options, load_data_config, resolve_task_data,
                              validate_task)
from finetune.tracking import log_json_artifact
from finetune.valid_generation import ValidGeneration
from model.config import ModelConfig
from model.generation import DecodeOptions
from pretrain import core

SCRATCH = "scratch"


@dataclass
class Plan:
    cfg: FinetuneConfig
    world_size: int
    data_cfg: DataConfig
    task: data.TaskData
    model_cfg: ModelConfig
    init: core.InitWeights | HfCheckpoint | None  # None: `scratch`
    max_source_len: int
    decode_mode: str
    decode_options: DecodeOptions
    tokenizer_checksum: str
    batches_per_epoch: int
    train_dir: Path  # the training shards: the task's, or data.distilled's
    distilled: data.DistilledSet | None = None

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.cfg.parallel.tensor_parallel


# --- validation (no process group) -------------------------------------------------------------------------

def objective_kwargs(cfg: FinetuneConfig, seed: int) -> dict[str, Any]:
    o = cfg.objective
    if o.name == "ar":
        return {"stream": o.ar.stream, "label_smoothing": o.ar.label_smoothing}
    return {**asdict(getattr(o, o.name)), "seed": seed}


def _validate_objective(cfg: FinetuneConfig) -> None:
    o = cfg.objective
    if o.name not in OBJECTIVES:
        fail(cfg, "objective.name", f"must be one of {OBJECTIVES}, got {o.name!r}")
    kwargs = objective_kwargs(cfg, 0)
    if not 0 <= kwargs["label_smoothing"] < 1:
        fail(cfg, f"objective.{o.name}.label_smoothing", f"must be in [0, 1), got {kwargs['label_smoothing']}")
    for key in ("w_ar_c", "w_ar_q", "w_c_q", "length_weight"):
        if key in kwargs and kwargs[key] < 0:
            fail(cfg, f"objective.{o.name}.{key}", f"must be >= 0, got {kwargs[key]}")
    try:
        core.build(o.name, **kwargs)
    except ValueError as err:  # the constructors name objective.<field>
        fail(cfg, f"objective.{o.name}", str(err))
    for key, least in (("warmup_steps", 0), ("every", 0), ("tokens", 1)):
        if getattr(o.lead_copy, key) < least:
            fail(cfg, f"objective.lead_copy.{key}", f"must be >= {least}, got {getattr(o.lead_copy, key)}")


def _check_keep_best(cfg: FinetuneConfig) -> None:
    """checkpoint.keep_best must name a metric this job's evaluation reports: the objective's held-out losses
    (eval.batches > 0) or the validation decoding's task metrics (valid_generation.samples > 0, gen/...)."""
    if not cfg.checkpoint.keep_best:
        return
    available = core.build(cfg.objective.name, **objective_kwargs(cfg, 0)).eval_metric_names() \
        if cfg.eval.batches > 0 else []
    if cfg.valid_generation.samples > 0:
        available += [f"gen/{m}" for m in (*get_task(cfg.task.name).metrics, "task_score", "ms_per_sample")]
    try:
        core.check_keep_best(cfg.checkpoint.keep_best, available)
    except ValueError as err:
        fail(cfg, "checkpoint.keep_best", str(err))


def _open_distilled(cfg: FinetuneConfig, td: data.TaskData) -> data.DistilledSet:
    try:
        return data.read_distilled(cfg.data.distilled, td, cfg.task.train_split)
    except DataError as err:
        fail(cfg, "data.distilled", str(err))


def data_command(cfg: FinetuneConfig) -> str:
    extra = " ".join(f"'{o}'" for o in ([f"task.difficulty={cfg.task.difficulty}"] +
                                       ([f"data.overrides=[{','.join(cfg.data.overrides)}]"]
                                        if cfg.data.overrides else [])))
    return f"python -m finetune data --config {cfg.config_file or '<config>'} {extra}".strip()


def _open_split(cfg: FinetuneConfig, td: data.TaskData, split: str, field_name: str):
    """Check one split's shards (manifest, files, tokenizer checksum); returns the tokenizer."""
    shard_dir = td.shard_dir(split)
    if not (shard_dir / "manifest.json").is_file():
        fail(cfg, field_name, f"no task shards at {shard_dir}; build them with `{data_command(cfg)}`")
    try:
        _, _, tokenizer, _ = open_shard_dir(shard_dir, "task", td.tokenizer, "size", "error")
    except DataError as err:
        fail(cfg, field_name, f"{err} (rebuild with `{data_command(cfg)}`)")
    return tokenizer


def read_init_checkpoint(cfg: FinetuneConfig, model_cfg: ModelConfig, field_name: str = "init.checkpoint",
                         tokenizer_checksum: str = "", shards: str = "the task shards") -> core.InitWeights | None:
    """The init weights, checked against the configured model shape and (where the checkpoint records one) the
    tokenizer that wrote `shards`; None for `scratch`."""
    if not cfg.init.checkpoint:
        fail(cfg, field_name, f"no pretraining checkpoint: pass --init <checkpoint> (or init.checkpoint={SCRATCH} "
                              "to train from random weights)")
    if cfg.init.checkpoint == SCRATCH:
        return None
    try:
        weights = read_init(cfg.init.checkpoint)
        check_tokenizer(weights, tokenizer_checksum, shards)
        core.check_dims(weights, model_cfg, f"{cfg.config_file or 'the config'} (model.preset={cfg.model.preset}, "
                                            f"model.overrides={dict(cfg.model.overrides)})")
    except core.InitError as err:
        fail(cfg, field_name, str(err))
    return weights


def read_hf_init(cfg: FinetuneConfig, tokenizer, shards: str) -> HfCheckpoint | None:
    """--init as a Hugging Face folder: its model config (model.overrides applied), checked against the task
    shards' tokenizer; None when --init names something else."""
    if not cfg.init.checkpoint or not is_hf_checkpoint(cfg.init.checkpoint):
        return None
    try:
        init = read_hf_checkpoint(cfg.init.checkpoint, tokenizer, dict(cfg.model.overrides),
                                  cfg.parallel.tensor_parallel)
        check_tokenizer(init, tokenizer.checksum, shards)
    except core.InitError as err:
        fail(cfg, "init.checkpoint", str(err))
    return init


def output_dir(cfg: FinetuneConfig) -> str:
    """Where the job writes: output_dir, else runs/finetune/<task>-<difficulty>-<objective>."""
    return cfg.output_dir or f"runs/finetune/{cfg.task.name}-{cfg.task.difficulty}-{cfg.objective.name}"


def prepare(cfg: FinetuneConfig, world_size: int) -> Plan:
    """Validate the whole job before any process group exists; ConfigError names the field or file at fault."""
    cfg.output_dir = output_dir(cfg)
    validate_task(cfg)
    _validate_objective(cfg)
    data_cfg = load_data_config(cfg)
    td = resolve_task_data(cfg, data_cfg)
    tokenizer = _open_split(cfg, td, cfg.task.train_split, "task.train_split")
    valid_tok = _open_split(cfg, td, cfg.task.valid_split, "task.valid_split")
    if valid_tok.checksum != tokenizer.checksum:
        fail(cfg, "task.valid_split", "the validation shards were written with another tokenizer than the "
                                      "training ones")
    shards = f"the task shards {td.shard_dir(cfg.task.train_split)}"
    hf_init = read_hf_init(cfg, tokenizer, shards)  # a Hugging Face checkpoint's config gives the model's shape
    model_cfg = hf_init.model_cfg if hf_init else build_model_config(cfg, tokenizer.padded_vocab_size)
    max_source_len = cfg.data.max_source_len or model_cfg.max_source_positions
    if max_source_len > model_cfg.max_source_positions:
        fail(cfg, "data.max_source_len", f"{max_source_len} exceeds model.max_source_positions="
                                         f"{model_cfg.max_source_positions}")
    if td.max_target_len + 1 > model_cfg.max_target_positions:
        fail(cfg, "data.overrides", f"targets of up to {td.max_target_len} tokens + EOS (data config "
                                    f"tasks.max_target_len) exceed model.max_target_positions="
                                    f"{model_cfg.max_target_positions}")
    copies = cfg.objective.lead_copy
    if lead_copy.enabled(copies) and copies.tokens + 1 > model_cfg.max_target_positions:
        fail(cfg, "objective.lead_copy.tokens", f"{copies.tokens} + EOS exceed "
                                                f"model.max_target_positions={model_cfg.max_target_positions}")
    init = hf_init or read_init_checkpoint(cfg, model_cfg, tokenizer_checksum=tokenizer.checksum, shards=shards)
    decode_mode, decode_options = decoding_options(cfg, model_cfg)
    _check_keep_best(cfg)
    distilled = _open_distilled(cfg, td) if cfg.data.distilled else None
    train_dir = distilled.shard_dir if distilled is not None else td.shard_dir(cfg.task.train_split)

    tp = cfg.parallel.tensor_parallel
    dp = max(world_size // max(tp, 1), 1)
    loader = data.task_loader(train_dir, cfg.data, dp_rank=0, dp_size=dp, seed=cfg.train.seed,
                              max_source_len=max_source_len)
    batches_per_epoch = len(loader)
    if cfg.task.epochs > 0:
        cfg.train.steps = max(1, math.ceil(cfg.task.epochs * batches_per_epoch / cfg.train.grad_accum))
        if cfg.schedule.warmup_steps > cfg.train.steps:
            warmup = cfg.train.steps // 10
            print(f"[finetune] schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds the {cfg.train.steps} steps "
                  f"of task.epochs={cfg.task.epochs} ({batches_per_epoch} batches per epoch); using {warmup}",
                  file=sys.stderr)
            cfg.schedule.warmup_steps = warmup
    if not cfg.checkpoint.export_final:
        fail(cfg, "checkpoint.export_final", f"must be true: `generate` reads the finetuned weights from "
                                             f"<output_dir>/{core.FINAL_WEIGHTS}")
    cfg.tracking.uri = core.resolve_uri(cfg.tracking.uri) if cfg.tracking.mlflow else cfg.tracking.uri
    core.validate_engine(cfg, world_size)
    if cfg.checkpoint.resume:  # the checkpoint's layout, objective and batches against this job's
        core.check_resume(cfg, world_size, cfg.objective.name, lambda: loader)
    return Plan(cfg, world_size, data_cfg, td, model_cfg, init, max_source_len, decode_mode, decode_options,
                tokenizer.checksum, batches_per_epoch, train_dir, distilled)


# --- the run ---------------------------------------------------------------------------------------------------

def run_tags(plan: Plan) -> dict[str, Any]:
    cfg = plan.cfg
    return {"kind": "finetune", "task": cfg.task.name, "difficulty": cfg.task.difficulty,
            "objective": cfg.objective.name, "decoding_mode": plan.decode_mode,
            "pretrain_run_id": pretrain_run_id(plan.init) if plan.init is not None else "none",
            "pretrain_checkpoint": str(plan.init.path) if plan.init is not None else SCRATCH,
            "pretrain_step": pretrain_step(plan.init) if plan.init is not None else "unknown",
            **(plan.distilled.tags() if plan.distilled is not None else {"training_targets": "gold"})}


def run_params(plan: Plan) -> dict[str, Any]:
    params = core.to_dict(plan.cfg)
    params["resolved"] = {"model": asdict(plan.model_cfg), "world_size": plan.world_size,
                          "data_parallel": plan.data_parallel, "batches_per_epoch": plan.batches_per_epoch,
                          "max_source_len": plan.max_source_len, "decode": asdict(plan.decode_options),
                          "train_shards": str(plan.train_dir),
                          "tokenizer_checksum": plan.tokenizer_checksum}
    return params


def build_objective(plan: Plan) -> core.Objective:
    cfg = plan.cfg
    # One random stream on every rank: bang_mixed picks AR or NAR per batch, and ZeRO-3 needs all data-parallel
    # ranks to run the same modules (parameters are gathered module by module).
    objective = core.build(cfg.objective.name, **objective_kwargs(cfg, cfg.train.seed * 1000 + 7919))
    if not lead_copy.enabled(cfg.objective.lead_copy):
        return objective
    return lead_copy.LeadCopy(objective, **asdict(cfg.objective.lead_copy))


def export_meta(plan: Plan, run_id: str | None) -> dict[str, Any]:
    tags = run_tags(plan)
    lineage = {k: tags[k] for k in data.TARGET_TAGS if k in tags}
    return {"task": plan.cfg.task.name, "difficulty": plan.cfg.task.difficulty, "objective": plan.cfg.objective.name,
            "decoding_mode": plan.decode_mode, "finetune_run_id": run_id, "tracking_uri": plan.cfg.tracking.uri,
            "experiment": plan.cfg.tracking.experiment, "pretrain_run_id": tags["pretrain_run_id"],
            "pretrain_checkpoint": tags["pretrain_checkpoint"], "pretrain_step": tags["pretrain_step"], **lineage,
            "tokenizer_checksum": plan.tokenizer_checksum,  # "tokenizer": the copy's path, set by write_meta
            "model_config": asdict(plan.model_cfg), "config": core.to_dict(plan.cfg)}


def describe(plan: Plan) -> str:
    """The `config ok:` line of --validate-only."""
    cfg, m = plan.cfg, plan.model_cfg
    init = SCRATCH if plan.init is None else f"{plan.init.path} (pretrain run {run_tags(plan)['pretrain_run_id']})"
    targets = "gold" if plan.distilled is None else \
        f"distilled {plan.distilled.shard_dir} (teacher run {plan.distilled.tags()['teacher_run_id']})"
    if isinstance(plan.init, HfCheckpoint):
        init += " (Hugging Face; the model's shape from its config.json)"
    copies = cfg.objective.lead_copy
    objective = cfg.objective.name + (f" + lead copy ({lead_copy.schedule_text(copies)})"
                                      if lead_copy.enabled(copies) else "")
    return (f"finetune {cfg.task.name}-{cfg.task.difficulty} objective {objective} decode "
            f"{plan.decode_mode} ({cfg.config_file}): world {plan.world_size} = TP {cfg.parallel.tensor_parallel} x "
            f"DP {plan.data_parallel}, ZeRO-{core.zero_stage(cfg)}; model {cfg.model.preset} d_model={m.d_model} "
            f"vocab={m.vocab_size}; init {init}; targets {targets}; {cfg.train.steps} steps ({plan.batches_per_epoch} "
            f"batches per epoch); output {cfg.output_dir}; mlflow {cfg.tracking.uri if cfg.tracking.mlflow else 'off'}")


def train(plan: Plan) -> dict[str, float]:
    from model import parallel  # megatron-core: imported when a job starts, not for --validate-only
    from model.seq2seq import Seq2SeqModel

    cfg = plan.cfg
    with core.started(cfg) as mpu:
        model = Seq2SeqModel(plan.model_cfg)
        if plan.init is not None:
            load_weights(model, plan.init)
        dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
        objective = build_objective(plan)
        train_loader = data.task_loader(plan.train_dir, cfg.data, dp_rank=dp_rank, dp_size=dp_size,
                                        seed=cfg.train.seed, max_source_len=plan.max_source_len)
        valid_dir = plan.task.shard_dir(cfg.task.valid_split)
        evals = {}
        if cfg.eval.batches > 0:
            evals["valid"] = lambda: data.task_loader(valid_dir, cfg.data, dp_rank=dp_rank, dp_size=dp_size,
                                                      seed=0, max_source_len=plan.max_source_len, shuffle=False)
        extra_eval = ValidGeneration(plan) if cfg.valid_generation.samples > 0 else None
        tags = run_tags(plan)
        if core.is_rank0():  # a meta left by an earlier run in this folder must not pair with new weights
            (Path(cfg.output_dir) / FINETUNE_META).unlink(missing_ok=True)
        engine = core.Engine(cfg, model, objective, train_loader, mpu, micro_batch_size=cfg.data.batch_size,
                             eval_loaders=evals, extra_eval=extra_eval, kind="finetune", tags=tags,
                             meta={"tokenizer_checksum": plan.tokenizer_checksum,
                                   "pretrain_run_id": tags["pretrain_run_id"], "pretrain_step": tags["pretrain_step"]})
        run_name = cfg.tracking.run_name or f"{cfg.task.name}-{cfg.task.difficulty} {cfg.objective.name}"
        datasets = [(plan.task.shard_dir(cfg.task.train_split), "training"), (valid_dir, "validation")]
        last = engine.fit(params=run_params(plan), artifacts=core.config_artifacts(cfg), run_name=run_name,
                          datasets=datasets)
        if engine.rank0:
            write_meta(plan, engine.tracker.run_id)
            core.publish_hf(engine, load_tokenizer(plan.task.tokenizer), options=plan.decode_options,
                            mode=plan.decode_mode, source={"task": cfg.task.name, "difficulty": cfg.task.difficulty,
                                                           "objective": cfg.objective.name})
        return last


def write_meta(plan: Plan, run_id: str | None) -> None:
    """finetune_meta.json, finetune.yaml and a copy of the tokenizer beside the exported weights (what `generate`
    reads); the meta also goes to the MLflow run."""
    cfg, out = plan.cfg, Path(plan.cfg.output_dir)
    meta = export_meta(plan, run_id)
    copy = out / TOKENIZER_COPY  # the folder holds what `generate` needs, so it can be moved
    copy.mkdir(parents=True, exist_ok=True)
    meta["tokenizer"] = f"{TOKENIZER_COPY}/{load_tokenizer(plan.task.tokenizer).copy_into(copy)}"
    core.write_atomically(out / "finetune.yaml", core.to_yaml(cfg))
    core.write_atomically(out / FINETUNE_META, json.dumps(meta, indent=1, default=str))  # last: generate needs both
    if run_id is not None:
        log_json_artifact(cfg.tracking.uri, run_id, {k: v for k, v in meta.items() if k != "config"}, FINETUNE_META,
                          "model")
    print(f"[finetune] wrote {out / core.FINAL_WEIGHTS} and {out / FINETUNE_META} (MLflow run {run_id})", flush=True)


def config_from_args(args) -> FinetuneConfig:
    cfg = load(args.config, args.overrides)
    if args.init:
        cfg.init.checkpoint = args.init
    if args.resume:
        cfg.checkpoint.resume = True
    cfg.output_dir = output_dir(cfg)
    return cfg


def stage_facts(cfg: FinetuneConfig) -> dict[str, list]:
    """What --validate-only --json adds to the engine's facts: the files the job reads (the init checkpoint among
    them) and the training (the task's, or data.distilled) and validation shard folders with their sizes. A task or
    data config that cannot be resolved names no folder (the verdict says why)."""
    inputs = [core.input_file("data.config", config_path(cfg.data.config))]
    if cfg.init.checkpoint and cfg.init.checkpoint != SCRATCH:
        inputs.append(core.input_file("--init", cfg.init.checkpoint))
    shards = []
    try:
        td = resolve_task_data(cfg, load_data_config(cfg))
        train = ("data.distilled", Path(cfg.data.distilled), "python -m finetune distill --teacher <AR finetune dir>") \
            if cfg.data.distilled else ("task.train_split", td.shard_dir(cfg.task.train_split), data_command(cfg))
        shards = [core.shard_folder(train[0], train[1], training=True, num_workers=cfg.data.num_workers,
                                    build=train[2]),
                  core.shard_folder("task.valid_split", td.shard_dir(cfg.task.valid_split), training=False,
                                    num_workers=0, build=data_command(cfg))]
    except ConfigError:
        pass
    return {"inputs": inputs, "shards": shards}


def main(argv: Sequence[str]) -> int:
    parser = core.cli_parser("python -m finetune", "Finetune a pretrained model on one GLGE task or IWSLT14, on the "
                                                   "training core's engine. Subcommands: data, generate, evaluate, "
                                                   "compare, distill (python -m finetune <subcommand> --help).",
                             "a YAML file under configs/finetune/")
    parser.add_argument("--init", default="", help="pretraining checkpoint: a pretraining output folder, a DeepSpeed "
                                                   "checkpoint folder (or one step_* tag in it), a full state dict "
                                                   "(.pt, e.g. final_model.pt) or a Hugging Face BART/mBART folder "
                                                   "(its tokenizer: data.overrides=[tokenizer.type=hf,"
                                                   "tokenizer.path=<folder>])")
    return core.cli_main("finetune", core.parse_args(parser, argv), config_from_args, prepare, train, describe,
                         stage_facts)
