"""From a finetune config to what every finetune command works on, checked: the task, the data config, the task's
data locations, the model config and the decoding mode with its options.

Training (finetune.run.prepare), `generate`, `evaluate` and `data` all resolve a config through these functions,
so they agree on what a config means; each raises ConfigError naming the field (and file) at fault.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from configs import ConfigError, config_path, not_found
from data_pipeline.config import DataConfig, load_config
from finetune.config import FinetuneConfig, fail
from finetune.data import TaskData, task_data
from finetune.glge_tasks import DIFFICULTIES, get_task
from model.config import ModelConfig

if TYPE_CHECKING:
    from model.generation import DecodeOptions


def validate_task(cfg: FinetuneConfig) -> None:
    """The task and data-loading fields: a known task, difficulty and sizes."""
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


def load_data_config(cfg: FinetuneConfig) -> DataConfig:
    """The pretraining data config (its tokenizer, work_dir and tasks section) with data.overrides applied."""
    if not config_path(cfg.data.config).is_file():
        fail(cfg, "data.config", not_found(cfg.data.config))
    try:
        return load_config(cfg.data.config, list(cfg.data.overrides))
    except ConfigError as err:  # the data config's own message, behind the field of this config that set it
        fail(cfg, "data.overrides", str(err))


def resolve_task_data(cfg: FinetuneConfig, data_cfg: DataConfig) -> TaskData:
    try:
        return task_data(data_cfg, cfg.task.name, cfg.task.difficulty)
    except ValueError as err:
        fail(cfg, "data.config", str(err))


def build_model_config(cfg: FinetuneConfig, padded_vocab: int) -> ModelConfig:
    """model.preset + model.overrides, the vocabulary from the tokenizer, checked for the tensor-parallel size."""
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", padded_vocab)
    try:
        model_cfg = ModelConfig.preset(cfg.model.preset, **overrides)
        model_cfg.validate(cfg.parallel.tensor_parallel)
    except (ValueError, TypeError) as err:
        fail(cfg, "model", str(err))
    return model_cfg


def decoding_options(cfg: FinetuneConfig, model_cfg=None) -> tuple[str, DecodeOptions]:
    """(mode, options): the decode section over the task's official settings and what the objective trained;
    checked against the model (e.g. decode.exit_layer within its decoder layers) when model_cfg is given."""
    from finetune import decoding  # model.generation brings megatron-core: `evaluate` and `data` never need it

    try:
        mode, options = decoding.resolve(cfg.decode, cfg.task.name, cfg.objective)
        if model_cfg is not None:
            options.check_model(model_cfg)
        return mode, options
    except ValueError as err:
        fail(cfg, "decode", str(err))
