"""Build a finetuning job from its config and run it on the pretraining engine (pretrain.engine.Engine).

`prepare()` checks everything that needs no process group: config fields, task name, the data config, the task
shards and their tokenizer, the model shape and the tokenizer against the init checkpoint, decoding options
(`python -m finetune --validate-only [--world-size N] ...` runs just that). `train()` starts the process groups
(pretrain.job, shared with pretraining), loads the pretrained weights and hands model + objective + task loaders to
the engine, whose export writes <output_dir>/final_model.pt (full weights, model config, run record); beside it
finetune_meta.json records the task, objective, decoding mode, MLflow runs (finetune and pretraining), tokenizer
and the resolved config: `generate` reads the pair.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from finetune.config import FinetuneConfig, fail, load
from finetune.data import TaskData
from finetune.init_checkpoint import FINAL_WEIGHTS, FINETUNE_META
from finetune.glge_tasks import DIFFICULTIES, get_task
from pretrain import job
from pretrain.config import cli_parser, parse_args, to_dict, to_yaml, validate_engine

OBJECTIVES = ("ar", "nar", "bang_mixed", "janus")
SCRATCH = "scratch"


@dataclass
class Plan:
    cfg: FinetuneConfig
    world_size: int
    data_cfg: Any  # data_pipeline.config.DataConfig
    task: TaskData
    model_cfg: Any  # model.config.ModelConfig
    init: Any  # finetune.init_checkpoint.InitWeights, or None for `scratch`
    max_source_len: int
    decode_mode: str
    decode_options: Any  # model.generation.DecodeOptions
    tokenizer_checksum: str
    batches_per_epoch: int

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
    import finetune.objectives  # noqa: F401  (registers ar, nar, bang_mixed, janus)
    from pretrain import objectives

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
        objectives.build(o.name, **kwargs)
    except ValueError as err:  # the constructors name objective.<field>
        fail(cfg, f"objective.{o.name}", str(err))


def _validate_task(cfg: FinetuneConfig) -> None:
    if not cfg.task.name:
        fail(cfg, "task.name", "is empty; name a GLGE task or iwslt14")
    try:
        spec = get_task(cfg.task.name)
    except ValueError as err:
        fail(cfg, "task.name", str(err))
    if spec.glge and cfg.task.difficulty not in DIFFICULTIES:
        fail(cfg, "task.difficulty", f"must be one of {DIFFICULTIES}, got {cfg.task.difficulty!r}")
    if cfg.task.epochs < 0:
        fail(cfg, "task.epochs", f"must be >= 0 (0 = use train.steps), got {cfg.task.epochs}")
    d = cfg.data
    for name in ("batch_size", "shuffle_buffer", "bucket_window"):
        if getattr(d, name) < 1:
            fail(cfg, f"data.{name}", f"must be >= 1, got {getattr(d, name)}")
    if d.max_tokens < 0 or d.max_source_len < 0 or d.num_workers < 0:
        fail(cfg, "data", "max_tokens, max_source_len and num_workers must be >= 0")
    if cfg.valid_generation.samples < 0:
        fail(cfg, "valid_generation.samples", "must be >= 0")


def load_data_config(cfg: FinetuneConfig):
    from data_pipeline.config import load_config
    from data_pipeline.errors import ConfigError as DataConfigError

    if not Path(cfg.data.config).is_file():
        fail(cfg, "data.config", f"file not found: {cfg.data.config}")
    try:
        return load_config(cfg.data.config, list(cfg.data.overrides))
    except DataConfigError as err:
        fail(cfg, "data.overrides", str(err))


def resolve_task_data(cfg: FinetuneConfig, data_cfg) -> TaskData:
    from finetune.data import task_data

    try:
        return task_data(data_cfg, cfg.task.name, cfg.task.difficulty)
    except ValueError as err:
        fail(cfg, "data.config", str(err))


def data_command(cfg: FinetuneConfig) -> str:
    extra = " ".join(f"'{o}'" for o in ([f"task.difficulty={cfg.task.difficulty}"] +
                                       ([f"data.overrides=[{','.join(cfg.data.overrides)}]"]
                                        if cfg.data.overrides else [])))
    return f"python -m finetune data --config {cfg.config_file or '<config>'} {extra}".strip()


def _open_split(cfg: FinetuneConfig, td: TaskData, split: str, field_name: str):
    """Check one split's shards (manifest, files, tokenizer checksum); returns the tokenizer."""
    from data_pipeline.errors import DataError
    from data_pipeline.stream import open_shard_dir

    shard_dir = td.shard_dir(split)
    if not (shard_dir / "manifest.json").is_file():
        fail(cfg, field_name, f"no task shards at {shard_dir}; build them with `{data_command(cfg)}`")
    try:
        _, _, tokenizer, _ = open_shard_dir(shard_dir, "task", td.tokenizer, "size", "error")
    except DataError as err:
        fail(cfg, field_name, f"{err} (rebuild with `{data_command(cfg)}`)")
    return tokenizer


def build_model_config(cfg: FinetuneConfig, padded_vocab: int):
    from model.config import ModelConfig

    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", padded_vocab)
    try:
        model_cfg = ModelConfig.preset(cfg.model.preset, **overrides)
        model_cfg.validate(cfg.parallel.tensor_parallel)
    except (ValueError, TypeError) as err:
        fail(cfg, "model", str(err))
    return model_cfg


def read_init_checkpoint(cfg: FinetuneConfig, model_cfg, field_name: str = "init.checkpoint",
                         tokenizer_checksum: str = "", shards: str = "the task shards"):
    """The init weights, checked against the configured model shape and (where the checkpoint records one) the
    tokenizer that wrote `shards`; None for `scratch`."""
    from finetune.init_checkpoint import InitError, check_dims, check_tokenizer, read_init

    if not cfg.init.checkpoint:
        fail(cfg, field_name, f"no pretraining checkpoint: pass --init <checkpoint> (or init.checkpoint={SCRATCH} "
                              "to train from random weights)")
    if cfg.init.checkpoint == SCRATCH:
        return None
    try:
        weights = read_init(cfg.init.checkpoint)
        check_tokenizer(weights, tokenizer_checksum, shards)
        check_dims(weights, model_cfg, f"{cfg.config_file or 'the config'} (model.preset={cfg.model.preset}, "
                                       f"model.overrides={dict(cfg.model.overrides)})")
    except InitError as err:
        fail(cfg, field_name, str(err))
    return weights


def prepare(cfg: FinetuneConfig, world_size: int) -> Plan:
    """Validate the whole job before any process group exists; ConfigError names the field or file at fault."""
    from finetune import decoding
    from finetune.data import task_loader
    from pretrain.tracking import resolve_uri

    _validate_task(cfg)
    _validate_objective(cfg)
    data_cfg = load_data_config(cfg)
    td = resolve_task_data(cfg, data_cfg)
    tokenizer = _open_split(cfg, td, cfg.task.train_split, "task.train_split")
    valid_tok = _open_split(cfg, td, cfg.task.valid_split, "task.valid_split")
    if valid_tok.checksum != tokenizer.checksum:
        fail(cfg, "task.valid_split", "the validation shards were written with another tokenizer than the "
                                      "training ones")
    model_cfg = build_model_config(cfg, tokenizer.padded_vocab_size)
    max_source_len = cfg.data.max_source_len or model_cfg.max_source_positions
    if max_source_len > model_cfg.max_source_positions:
        fail(cfg, "data.max_source_len", f"{max_source_len} exceeds model.max_source_positions="
                                         f"{model_cfg.max_source_positions}")
    if td.max_target_len + 1 > model_cfg.max_target_positions:
        fail(cfg, "data.overrides", f"targets of up to {td.max_target_len} tokens + EOS (data config "
                                    f"tasks.max_target_len) exceed model.max_target_positions="
                                    f"{model_cfg.max_target_positions}")
    init = read_init_checkpoint(cfg, model_cfg, tokenizer_checksum=tokenizer.checksum,
                                shards=f"the task shards {td.shard_dir(cfg.task.train_split)}")
    try:
        decode_mode, decode_options = decoding.resolve(cfg.decode, cfg.task.name, cfg.objective)
        decode_options.check_model(model_cfg)
    except ValueError as err:
        fail(cfg, "decode", str(err))

    tp = cfg.parallel.tensor_parallel
    dp = max(world_size // max(tp, 1), 1)
    loader = task_loader(td.shard_dir(cfg.task.train_split), cfg.data, dp_rank=0, dp_size=dp, seed=cfg.train.seed,
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
    if not getattr(cfg.checkpoint, "export_final", False):
        fail(cfg, "checkpoint.export_final", f"must be true: `generate` reads the finetuned weights from "
                                             f"<output_dir>/{FINAL_WEIGHTS}")
    if not cfg.output_dir:
        cfg.output_dir = f"runs/finetune/{cfg.task.name}-{cfg.task.difficulty}-{cfg.objective.name}"
    cfg.tracking.uri = resolve_uri(cfg.tracking.uri) if cfg.tracking.mlflow else cfg.tracking.uri
    validate_engine(cfg, world_size)
    return Plan(cfg, world_size, data_cfg, td, model_cfg, init, max_source_len, decode_mode, decode_options,
                tokenizer.checksum, batches_per_epoch)


# --- the run ---------------------------------------------------------------------------------------------------

def run_tags(plan: Plan) -> dict[str, Any]:
    from finetune.init_checkpoint import pretrain_run_id, pretrain_step

    cfg = plan.cfg
    return {"kind": "finetune", "task": cfg.task.name, "difficulty": cfg.task.difficulty,
            "objective": cfg.objective.name, "decoding_mode": plan.decode_mode,
            "pretrain_run_id": pretrain_run_id(plan.init) if plan.init is not None else "none",
            "pretrain_checkpoint": str(plan.init.path) if plan.init is not None else SCRATCH,
            "pretrain_step": pretrain_step(plan.init) if plan.init is not None else "unknown"}


def run_params(plan: Plan) -> dict[str, Any]:
    params = to_dict(plan.cfg)
    params["resolved"] = {"model": asdict(plan.model_cfg), "world_size": plan.world_size,
                          "data_parallel": plan.data_parallel, "batches_per_epoch": plan.batches_per_epoch,
                          "max_source_len": plan.max_source_len, "decode": asdict(plan.decode_options),
                          "train_shards": str(plan.task.shard_dir(plan.cfg.task.train_split)),
                          "tokenizer_checksum": plan.tokenizer_checksum}
    return params


def build_objective(plan: Plan, dp_rank: int):
    import finetune.objectives  # noqa: F401
    from pretrain import objectives

    cfg = plan.cfg
    # One random stream on every rank: bang_mixed picks AR or NAR per batch, and ZeRO-3 needs all data-parallel
    # ranks to run the same modules (parameters are gathered module by module). dp_rank is kept for callers.
    return objectives.build(cfg.objective.name, **objective_kwargs(cfg, cfg.train.seed * 1000 + 7919))


def export_meta(plan: Plan, run_id: str | None) -> dict[str, Any]:
    tags = run_tags(plan)
    return {"task": plan.cfg.task.name, "difficulty": plan.cfg.task.difficulty, "objective": plan.cfg.objective.name,
            "decoding_mode": plan.decode_mode, "finetune_run_id": run_id, "tracking_uri": plan.cfg.tracking.uri,
            "experiment": plan.cfg.tracking.experiment, "pretrain_run_id": tags["pretrain_run_id"],
            "pretrain_checkpoint": tags["pretrain_checkpoint"], "pretrain_step": tags["pretrain_step"],
            "tokenizer": str(plan.task.tokenizer), "tokenizer_checksum": plan.tokenizer_checksum,
            "model_config": asdict(plan.model_cfg), "config": to_dict(plan.cfg)}


def describe(plan: Plan) -> str:
    """The `config ok:` line of --validate-only."""
    from pretrain.config import zero_stage

    cfg, m = plan.cfg, plan.model_cfg
    init = SCRATCH if plan.init is None else f"{plan.init.path} (pretrain run {run_tags(plan)['pretrain_run_id']})"
    return (f"finetune {cfg.task.name}-{cfg.task.difficulty} objective {cfg.objective.name} decode "
            f"{plan.decode_mode} ({cfg.config_file}): world {plan.world_size} = TP {cfg.parallel.tensor_parallel} x "
            f"DP {plan.data_parallel}, ZeRO-{zero_stage(cfg)}; model {cfg.model.preset} d_model={m.d_model} "
            f"vocab={m.vocab_size}; init {init}; {cfg.train.steps} steps ({plan.batches_per_epoch} batches per "
            f"epoch); output {cfg.output_dir}; mlflow {cfg.tracking.uri if cfg.tracking.mlflow else 'off'}")


def train(plan: Plan) -> dict[str, float]:
    from finetune.data import task_loader
    from finetune.init_checkpoint import load_into
    from finetune.valid_generation import ValidGeneration
    from model import parallel
    from model.seq2seq import Seq2SeqModel
    from pretrain import distributed
    from pretrain.engine import Engine

    cfg = plan.cfg
    with job.started(cfg) as mpu:
        model = Seq2SeqModel(plan.model_cfg)
        if plan.init is not None:
            load_into(model, plan.init)
        dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
        objective = build_objective(plan, dp_rank)
        train_loader = task_loader(plan.task.shard_dir(cfg.task.train_split), cfg.data, dp_rank=dp_rank,
                                   dp_size=dp_size, seed=cfg.train.seed, max_source_len=plan.max_source_len)
        valid_dir = plan.task.shard_dir(cfg.task.valid_split)
        evals = {}
        if cfg.eval.batches > 0:
            evals["valid"] = lambda: task_loader(valid_dir, cfg.data, dp_rank=dp_rank, dp_size=dp_size, seed=0,
                                                 max_source_len=plan.max_source_len, shuffle=False)
        extra_eval = ValidGeneration(plan) if cfg.valid_generation.samples > 0 else None
        tags = run_tags(plan)
        if distributed.is_rank0():  # a meta left by an earlier run in this folder must not pair with new weights
            (Path(cfg.output_dir) / FINETUNE_META).unlink(missing_ok=True)
        engine = Engine(cfg, model, objective, train_loader, mpu, micro_batch_size=cfg.data.batch_size,
                        eval_loaders=evals, extra_eval=extra_eval, kind="finetune", tags=tags,
                        meta={"tokenizer_checksum": plan.tokenizer_checksum, "pretrain_run_id": tags["pretrain_run_id"],
                              "pretrain_step": tags["pretrain_step"]})
        run_name = cfg.tracking.run_name or f"{cfg.task.name}-{cfg.task.difficulty} {cfg.objective.name}"
        last = engine.fit(params=run_params(plan), artifacts=job.config_artifacts(cfg), run_name=run_name)
        if engine.rank0:
            write_meta(plan, engine.tracker.run_id)
        return last


def write_meta(plan: Plan, run_id: str | None) -> None:
    """finetune_meta.json and finetune.yaml beside the exported weights (what `generate` reads); the meta also
    goes to the MLflow run."""
    from pretrain.checkpoint import write_atomically

    cfg, out = plan.cfg, Path(plan.cfg.output_dir)
    meta = export_meta(plan, run_id)
    write_atomically(out / "finetune.yaml", to_yaml(cfg))
    write_atomically(out / FINETUNE_META, json.dumps(meta, indent=1, default=str))  # last: generate needs both
    if run_id is not None:
        from finetune.tracking import log_json_artifact

        log_json_artifact(cfg.tracking.uri, run_id, {k: v for k, v in meta.items() if k != "config"}, FINETUNE_META,
                          "model")
    print(f"[finetune] wrote {out / FINAL_WEIGHTS} and {out / FINETUNE_META} (MLflow run {run_id})", flush=True)


def load_config(args) -> FinetuneConfig:
    cfg = load(args.config, args.overrides)
    if args.init:
        cfg.init.checkpoint = args.init
    if args.resume:
        cfg.checkpoint.resume = True
    return cfg


def main(argv: Sequence[str]) -> int:
    parser = cli_parser("python -m finetune", "Finetune a pretrained model on one GLGE task or IWSLT14, on the "
                                              "pretraining engine. Subcommands: data, generate, evaluate, compare "
                                              "(python -m finetune <subcommand> --help).",
                        "a YAML file under configs/finetune/")
    parser.add_argument("--init", default="", help="pretraining checkpoint: a pretraining output folder, a DeepSpeed "
                                                   "checkpoint folder (or one step_* tag in it) or a full state dict "
                                                   "(.pt, e.g. final_model.pt)")
    return job.main("finetune", parse_args(parser, argv), load_config, prepare, train, describe)
