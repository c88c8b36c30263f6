"""The file a run leaves behind for finetuning and decoding: full weights plus the record of where they came from.

The record (Engine.record: the job kind, its MLflow run, the model config, the recipe's `meta`) is what checkpoints
and exports carry besides weights; RECORD_KEYS lists what pretrain.core.weights reads back from either.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

FINAL_WEIGHTS = "final_model.pt"  # the export at the end of a run, in output_dir
# Engine.record and Engine.save's progress, plus the meta the recipes pass (tokenizer_checksum; finetuning's lineage),
# and an export's `export` (the step(s) its weights come from: pretrain.core.averaging.ExportSource.record)
RECORD_KEYS = ("job", "step", "samples_seen", "tokens_seen", "mlflow_run_id", "tracking_uri", "experiment",
               "model_config", "tokenizer_checksum", "pretrain_run_id", "pretrain_step", "export")


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def export_payload(state: dict[str, Any], model_config: dict[str, Any] | None, step: int,
                   record: dict[str, Any]) -> dict[str, Any]:
    """What Engine.export_weights saves: {"model": full state dict on CPU, "config": the model config, "step",
    plus the run record (job, mlflow_run_id, tracking_uri, tokenizer_checksum, ...)}; pretrain.core.weights
    reads it back."""
    return {**record, "model": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
            "config": model_config, "step": step}
