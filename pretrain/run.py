"""Build a pretraining job from its config: validate everything, start the process groups, build the model, the
objective and the loaders, and hand them to the engine.

`prepare()` does all the checking that needs no process group (config fields, parallel layout, DeepSpeed JSON,
data config, shard folders, tokenizer, model shape) so a bad job stops before any process group starts;
`python -m pretrain --validate-only [--world-size N] [--json]` runs just that (`stage_facts`: what --json adds for
the launcher). The command line and the process-level set-up are the training core's (pretrain.core), shared with
finetuning. After the final export, rank 0 writes <output_dir>/hf, the Hugging Face folder of the weights with the
tokenizer, and logs it as the run's MLflow model (pretrain.core.publish_hf).
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from configs import ConfigError, config_path, not_found
from data_pipeline.config import DataConfig, load_config, resolve
from data_pipeline.corruption import OBJECTIVES  # the ones the data pipeline corrupts samples for (mix combines them)
from data_pipeline.errors import DataError
from data_pipeline.stream import build_pretrain_loader, open_shard_dir
from data_pipeline.tokenizer import load_tokenizer
from model.config import ModelConfig
from pretrain import core, objectives
from pretrain.pretrain_config import PretrainConfig, load


@dataclass
class Plan:
    """What validation found out: the checked configs and the facts the job is built from."""

    cfg: PretrainConfig
    world_size: int
    data_cfg: DataConfig
    eval_data_cfg: DataConfig | None
    model_cfg: ModelConfig
    micro_batch_size: int
    tokenizer_checksum: str = ""  # the training shards' tokenizer: recorded in checkpoints and exported weights
    tokenizer_path: str = ""  # ... and where it is (the Hugging Face export at the end carries it)

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.cfg.parallel.tensor_parallel


def _fail(cfg: PretrainConfig, field_name: str, why: str):
    where = f"{cfg.config_file}: " if cfg.config_file else ""
    raise ConfigError(f"{where}{field_name}: {why}")


def _validate_objective(cfg: PretrainConfig) -> None:
    o = cfg.objective
    if o.name not in OBJECTIVES + ("mix",):
        _fail(cfg, "objective.name", f"must be one of {', '.join(OBJECTIVES + ('mix',))}; got {o.name!r}")
    if o.name == "mix":
        unknown = sorted(set(o.weights) - set(OBJECTIVES))
        if unknown:
            _fail(cfg, "objective.weights", f"names {unknown}; the pretraining objectives are {OBJECTIVES}")
        if any(v < 0 for v in o.weights.values()) or not o.active():
            _fail(cfg, "objective.weights", f"need a positive weight and none negative, got {dict(o.weights)}")
    if o.bang.n_streams < 0:
        _fail(cfg, "objective.bang.n_streams", f"must be >= 0 (0 = the model's n_predict), got {o.bang.n_streams}")
    for name, ls in (("bang", o.bang.label_smoothing), ("elmer", o.elmer.label_smoothing)):
        if not 0 <= ls < 1:
            _fail(cfg, f"objective.{name}.label_smoothing", f"must be in [0, 1), got {ls}")


def _shard_dir(data_cfg: DataConfig) -> Path:
    return resolve(data_cfg.loader.shard_dir, data_cfg.work())


def build_command(cfg: PretrainConfig, eval_data_cfg: DataConfig | None = None) -> str:
    """The one command that builds the shards the job reads, ready to paste: the training shards, or (given the
    held-out data config) the held-out shards, which `prepare --heldout` builds from the data config's heldout
    section, aimed at the folder data.eval_overrides name when that is another than heldout.shard_dir."""
    flag, aim = [], []
    if eval_data_cfg is not None:
        flag, wanted = ["--heldout"], _shard_dir(eval_data_cfg)
        if wanted != eval_data_cfg.in_work(eval_data_cfg.heldout.shard_dir):
            aim = [f"heldout.shard_dir={wanted}"]
    return shlex.join(["python", "-m", "data_pipeline", "prepare", *flag, "--config", cfg.data.config,
                       *cfg.data.overrides, *aim])


def _open_shards(cfg: PretrainConfig, data_cfg: DataConfig, field_name: str, held_out: bool = False):
    """Check a shard folder (manifest, shard files and sizes, tokenizer checksum); returns the tokenizer."""
    lc = data_cfg.loader
    shard_dir = _shard_dir(data_cfg)
    if not (shard_dir / "manifest.json").is_file():
        _fail(cfg, field_name, f"no shards at {shard_dir} ({shard_dir / 'manifest.json'} is missing); build them "
                               f"with `{build_command(cfg, data_cfg if held_out else None)}`")
    try:
        _, _, tokenizer, _ = open_shard_dir(shard_dir, "pretrain", resolve(lc.tokenizer, data_cfg.work())
                                            if lc.tokenizer else "", lc.verify, lc.on_corrupt_shard)
    except (DataError, ConfigError) as err:  # the field that pointed here goes in front of the message
        _fail(cfg, field_name, str(err))
    return tokenizer


def _load_data_config(cfg: PretrainConfig, overrides: Sequence[str], field_name: str) -> DataConfig:
    if not config_path(cfg.data.config).is_file():
        _fail(cfg, "data.config", not_found(cfg.data.config))
    try:
        return load_config(cfg.data.config, list(overrides))
    except ConfigError as err:  # the data config's own message, behind the field of this config that set it
        _fail(cfg, field_name, str(err))


def prepare(cfg: PretrainConfig, world_size: int) -> Plan:
    """Validate the whole job before any process group exists; ConfigError names the field or file at fault."""
    core.validate_engine(cfg, world_size)
    _validate_objective(cfg)
    data_cfg = _load_data_config(cfg, cfg.data.overrides, "data.overrides")
    tokenizer = _open_shards(cfg, data_cfg, "data.config")
    eval_data_cfg = None
    if cfg.data.eval_overrides and cfg.eval.batches > 0:
        eval_data_cfg = _load_data_config(cfg, [*cfg.data.overrides, *cfg.data.eval_overrides], "data.eval_overrides")
        eval_tokenizer = _open_shards(cfg, eval_data_cfg, "data.eval_overrides", held_out=True)
        if eval_tokenizer.checksum != tokenizer.checksum:
            _fail(cfg, "data.eval_overrides", "the held-out shards were tokenized with a different tokenizer")
    if cfg.data.num_workers < 0:
        _fail(cfg, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")

    overrides = dict(cfg.model.overrides)
    if "vocab_size" in overrides and overrides["vocab_size"] < tokenizer.padded_vocab_size:
        _fail(cfg, "model.overrides.vocab_size", f"{overrides['vocab_size']} is smaller than the tokenizer's "
                                                 f"padded vocabulary {tokenizer.padded_vocab_size}")
    overrides.setdefault("vocab_size", tokenizer.padded_vocab_size)
    try:
        model_cfg = ModelConfig.preset(cfg.model.preset, **overrides)
        model_cfg.validate(cfg.parallel.tensor_parallel)
    except (ValueError, TypeError) as err:
        _fail(cfg, "model", str(err))
    longest = data_cfg.shard.seq_len + 1  # ELMER targets carry EOS
    if longest > min(model_cfg.max_source_positions, model_cfg.max_target_positions):
        _fail(cfg, "model", f"samples of up to {longest} tokens (data shard.seq_len={data_cfg.shard.seq_len} + EOS) "
                            f"exceed max_source_positions={model_cfg.max_source_positions} or "
                            f"max_target_positions={model_cfg.max_target_positions}")
    if cfg.objective.bang.stream_weights:
        n = cfg.objective.bang.n_streams or model_cfg.n_predict
        if len(cfg.objective.bang.stream_weights) != n:
            _fail(cfg, "objective.bang.stream_weights", f"has {len(cfg.objective.bang.stream_weights)} entries for "
                                                        f"{n} streams")
    if cfg.tracking.mlflow:
        cfg.tracking.uri = core.resolve_uri(cfg.tracking.uri)  # the store this job writes to, in params and configs
    plan = Plan(cfg, world_size, data_cfg, eval_data_cfg, model_cfg, data_cfg.loader.batch_size, tokenizer.checksum,
                str(tokenizer.path))
    if cfg.checkpoint.keep_best:  # a metric the held-out evaluation reports
        available = build_objective(plan, 0).eval_metric_names() if eval_data_cfg is not None else []
        try:
            core.check_keep_best(cfg.checkpoint.keep_best, available)
        except ValueError as err:
            _fail(cfg, "checkpoint.keep_best", str(err))
    if cfg.checkpoint.resume:  # the checkpoint's layout, objective and batches against this job's
        core.check_resume(cfg, world_size, cfg.objective.name,
                          lambda: training_loader(plan, dp_rank=0, dp_size=plan.data_parallel, pin_memory=False))
    return plan


# --- building (after the process groups exist) -----------------------------------------------------------

def build_objective(plan: Plan, dp_rank: int) -> core.Objective:
    cfg, model_cfg = plan.cfg, plan.model_cfg
    o = cfg.objective
    parts = {}
    for name in o.active():
        if name == "bang":
            parts[name] = objectives.build("bang", n_streams=o.bang.n_streams or model_cfg.n_predict,
                                           stream_weights=o.bang.stream_weights or None,
                                           label_smoothing=o.bang.label_smoothing)
        else:  # ELMER's exit layers: one generator per data-parallel rank, identical on tensor-parallel peers
            parts[name] = objectives.build("elmer", n_layers=model_cfg.n_decoder_layers,
                                           label_smoothing=o.elmer.label_smoothing,
                                           seed=cfg.train.seed * 1000 + 7919 * (dp_rank + 1))
    if o.name == "mix":
        return objectives.build("mix", parts=parts, weights=o.active())
    return parts[o.name]


def training_loader(plan: Plan, *, dp_rank: int, dp_size: int, pin_memory: bool):
    cfg = plan.cfg
    return build_pretrain_loader(plan.data_cfg, dp_rank=dp_rank, dp_world_size=dp_size, seed=cfg.train.seed,
                                 objective_weights=cfg.objective.active(), num_workers=cfg.data.num_workers,
                                 pin_memory=pin_memory)


def build_loaders(plan: Plan, dp_rank: int, dp_size: int):
    """The training loader (split by the data-parallel rank: TP peers read the same batches) and one held-out
    loader factory per objective."""
    cfg = plan.cfg
    pin = core.uses_gpu()  # pinned batches copy to the GPU asynchronously
    train = training_loader(plan, dp_rank=dp_rank, dp_size=dp_size, pin_memory=pin)
    evals = {}
    if plan.eval_data_cfg is not None:
        for name in cfg.objective.active():
            evals[name] = (lambda n=name: build_pretrain_loader(plan.eval_data_cfg, dp_rank=dp_rank,
                                                                dp_world_size=dp_size, seed=0,
                                                                objective_weights={n: 1.0}, num_workers=0,
                                                                pin_memory=pin))
    return train, evals


def run_params(plan: Plan) -> dict[str, Any]:
    """The resolved config logged as MLflow params: the YAML's values plus what was derived from them."""
    params = core.to_dict(plan.cfg)
    params["resolved"] = {
        "model": asdict(plan.model_cfg),
        "world_size": plan.world_size,
        "data_parallel": plan.data_parallel,
        "micro_batch_size": plan.micro_batch_size,
        "data": {"shard_dir": str(plan.data_cfg.in_work(plan.data_cfg.loader.shard_dir)),
                 "seq_len": plan.data_cfg.shard.seq_len},
    }
    return params


def run_datasets(plan: Plan) -> list[tuple[Path, str]]:
    """The shard folders the job reads, for the MLflow run's datasets: training, and held-out when evaluated."""
    datasets = [(_shard_dir(plan.data_cfg), "training")]
    if plan.eval_data_cfg is not None:
        datasets.append((_shard_dir(plan.eval_data_cfg), "validation"))
    return datasets


def describe(plan: Plan) -> str:
    """The `config ok:` line of --validate-only."""
    cfg, m = plan.cfg, plan.model_cfg
    return (f"pretrain {cfg.name} ({cfg.config_file}): world {plan.world_size} = TP {cfg.parallel.tensor_parallel} x "
            f"DP {plan.data_parallel}, ZeRO-{core.zero_stage(cfg)}; model {cfg.model.preset} d_model={m.d_model} "
            f"layers={m.n_encoder_layers}+{m.n_decoder_layers} vocab={m.vocab_size}; objective {cfg.objective.name}; "
            f"{cfg.train.steps} steps of {plan.micro_batch_size} x {cfg.train.grad_accum} x {plan.data_parallel}; "
            f"output {cfg.output_dir}; mlflow {cfg.tracking.uri if cfg.tracking.mlflow else 'off'}")


def train(plan: Plan) -> dict[str, float]:
    from model import parallel  # megatron-core: imported when a job starts, not for --validate-only
    from model.seq2seq import Seq2SeqModel

    cfg = plan.cfg
    with core.started(cfg) as mpu:
        model = Seq2SeqModel(plan.model_cfg)  # same initial weights for every TP size (CPU master init)
        dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
        objective = build_objective(plan, dp_rank)
        train_loader, eval_loaders = build_loaders(plan, dp_rank, dp_size)
        engine = core.Engine(cfg, model, objective, train_loader, mpu, micro_batch_size=plan.micro_batch_size,
                             eval_loaders=eval_loaders, kind="pretrain",
                             meta={"tokenizer_checksum": plan.tokenizer_checksum})
        last = engine.fit(params=run_params(plan), artifacts=core.config_artifacts(cfg),
                          run_name=cfg.tracking.run_name or cfg.name, datasets=run_datasets(plan))
        if engine.rank0:  # <output_dir>/hf, the run's MLflow model (checkpoint.export_hf)
            core.publish_hf(engine, load_tokenizer(plan.tokenizer_path))
        return last


def config_from_args(args) -> PretrainConfig:
    cfg = load(args.config, args.overrides)
    if args.resume:
        cfg.checkpoint.resume = True
    return cfg


def stage_facts(cfg: PretrainConfig) -> dict[str, list]:
    """What --validate-only --json adds to the engine's facts: the files the job reads, and the shard folders with
    their sizes (training stream; held-out shards when evaluation reads them). A data config that cannot be read
    names no folder (the verdict says why)."""
    inputs = [core.input_file("data.config", config_path(cfg.data.config))]
    shards = []
    try:
        data_cfg = load_config(cfg.data.config, list(cfg.data.overrides))
        shards.append(core.shard_folder("data.config", _shard_dir(data_cfg), training=True,
                                        num_workers=cfg.data.num_workers, build=build_command(cfg)))
        if cfg.data.eval_overrides and cfg.eval.batches > 0:
            eval_cfg = load_config(cfg.data.config, [*cfg.data.overrides, *cfg.data.eval_overrides])
            shards.append(core.shard_folder("data.eval_overrides", _shard_dir(eval_cfg), training=False,
                                            num_workers=0, build=build_command(cfg, eval_cfg)))
    except ConfigError:
        pass
    return {"inputs": inputs, "shards": shards}


def main(argv: Sequence[str]) -> int:
    parser = core.cli_parser("python -m pretrain", "Pretrain the seq2seq model (BANG, ELMER or their mix) with "
                                                   "DeepSpeed and tensor parallelism.",
                             "a YAML file under configs/pretrain/")
    parser.add_argument("--plan", action="store_true",
                        help="print the planned peak GPU memory per rank and its parts (weights, gradients, "
                             "optimizer, activations) for --world-size processes, from a fake dry run of one "
                             "micro-step at this config (pretrain/plan.py); nothing is allocated, no GPU needed")
    args = core.parse_args(parser, argv)
    if args.plan:
        return print_memory_plan(args)
    return core.cli_main("pretrain", args, config_from_args, prepare, train, describe, stage_facts)


def print_memory_plan(args) -> int:
    from pretrain.core.config import launch_world_size
    from pretrain.plan import memory_plan

    try:
        plan = prepare(config_from_args(args), args.world_size or launch_world_size())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(memory_plan(plan, build_objective).lines()), flush=True)
    return 0
