"""The training core: one engine and everything around it, used by both recipes, pretraining (pretrain/) and
finetuning (finetune/). Finetuning uses this package's names below and nothing else of pretrain/; a recipe brings
its config sections, its objectives, its data and its evaluation (docs/architecture.md,
tests/test_import_graph.py).

    config      EngineConfig (train, optim, schedule, deepspeed, parallel, checkpoint, eval, tracking sections):
                load_config, validate_engine, zero_stage, to_dict / to_yaml; cli_parser + parse_args, the command
                line both recipes share
    job         cli_main (config -> prepare -> `config ok:` / facts / train, exit codes, stop signals); started
                (process groups and seeds); config_artifacts
    facts       what a stage tells the launcher (`--validate-only --json`): a recipe adds input_file and shard_folder
                entries to the engine's
    engine      Engine: DeepSpeed ZeRO over a tensor-parallel model, the loop, evaluation, checkpoints, export
    objectives  the Objective interface (loss, metrics, num_targets, checkpointed state) and the registry:
                register (a decorator, used by each recipe's objectives), build, registered
    checkpoint  checkpoints that continue a run exactly: tags, the atomic `latest` pointer, write_atomically;
                check_resume (--validate-only --resume: can this job continue the checkpoint? see
                checkpoint_manifest)
    export      the exported weights (FINAL_WEIGHTS) and the run record they carry
    hf_export   the Hugging Face folder of a run's weights (write_hf_export, HF_EXPORT) and its MLflow model
                (log_hf_model); publish_hf: both, after a run's final export
    weights     reading weights back from any of those files: read_weights, check_dims, load_into (InitError)
    tracking    MLflow: resolve_uri (the project's one store), sqlite_path, artifact_root, flatten, source_tags
                (MLflow's standard source tags), ensure_experiment (a classic training experiment), client_for;
                the engine's Tracker writes metrics.jsonl and a thread copies it to MLflow (mlflow_sync, also
                `python -m pretrain.core backfill <output_dir>` for a run that ended while MLflow was away)
    distributed process groups (through `started`), is_rank0, uses_gpu
    schedule, metrics, activation_checkpointing, step (the step's logic, apart from DeepSpeed): the engine's own
                parts, not part of the API
    dry_run     the fake-CUDA dry run (tests/test_fake_cuda.py): the step on fake cuda tensors, no GPU needed

Importing this package is cheap: `Engine` and `is_rank0` (megatron-core and DeepSpeed behind them) are imported on
first use, so `--validate-only`, `generate` and `evaluate` never load them.
"""
from __future__ import annotations

import importlib

from pretrain.core.checkpoint import check_resume, write_atomically
from pretrain.core.config import (EngineConfig, TrackingSection, cli_parser, load_config, parse_args, to_dict, to_yaml,
                                  validate_engine, zero_stage)
from pretrain.core.export import FINAL_WEIGHTS
from pretrain.core.facts import input_file, shard_folder
from pretrain.core.hf_export import HF_EXPORT, log_hf_model, publish_hf, write_hf_export
from pretrain.core.job import cli_main, config_artifacts, started
from pretrain.core.objectives import Metrics, Objective, build, gather_rows, register, registered
from pretrain.core.mlflow_sync import client_for, ensure_experiment
from pretrain.core.tracking import PARAM_VALUE_LIMIT, artifact_root, flatten, resolve_uri, source_tags, sqlite_path
from pretrain.core.weights import InitError, InitWeights, check_dims, load_into, read_weights

_ON_FIRST_USE = {"Engine": "pretrain.core.engine", "is_rank0": "pretrain.core.distributed",
                 "uses_gpu": "pretrain.core.distributed"}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        value = getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EngineConfig", "TrackingSection", "load_config", "validate_engine", "zero_stage", "to_dict", "to_yaml",
           "cli_parser", "parse_args", "cli_main", "started", "config_artifacts", "input_file", "shard_folder",
           "Engine", "is_rank0", "uses_gpu", "Objective", "Metrics", "gather_rows", "register", "build", "registered",
           "write_atomically", "check_resume", "FINAL_WEIGHTS", "InitError", "InitWeights", "read_weights",
           "check_dims", "load_into", "resolve_uri", "sqlite_path", "artifact_root", "flatten", "PARAM_VALUE_LIMIT",
           "source_tags", "ensure_experiment", "client_for", "HF_EXPORT", "write_hf_export", "log_hf_model",
           "publish_hf"]
