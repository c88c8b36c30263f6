"""The file a run leaves behind for finetuning and decoding: full weights plus the record of where they came from.

The record (Engine.record: the job kind, its MLflow run, the model config, the recipe's `meta`) is what checkpoints
and exports carry besides weights; RECORD_KEYS lists what pretrain.core.weights reads back from either.

The export holds only tensors, dicts, lists, strings, numbers, booleans and None, so `torch.load(path,
weights_only=True)` reads it: loading never runs code from the file (`plain` enforces this when saving).
"""
from __future__ import annotations

import dataclasses
from pathlib import PurePath
from typing import Any

import torch
from torch import nn

FINAL_WEIGHTS = "final_model.pt"  # the export at the end of a run, in output_dir
# Engine.record and Engine.save's progress, plus the meta the recipes pass (tokenizer_checksum; finetuning's lineage)
RECORD_KEYS = ("job", "step", "samples_seen", "tokens_seen", "mlflow_run_id", "tracking_uri", "experiment",
               "model_config", "tokenizer_checksum", "pretrain_run_id", "pretrain_step")


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def plain(value: Any, where: str) -> Any:
    """`value` as what torch.load(weights_only=True) accepts: paths become strings, numpy scalars and arrays
    Python numbers and lists, tuples lists; TypeError naming `where` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # numpy scalar or array
        return value.tolist()
    raise TypeError(f"{where}: a {type(value).__name__} cannot go into the exported weights (plain values only, so "
                    "that torch.load(weights_only=True) reads them)")


def export_payload(state: dict[str, Any], model_config: dict[str, Any] | None, step: int,
                   record: dict[str, Any]) -> dict[str, Any]:
    """What Engine.export_weights saves: {"model": full state dict on CPU, "config": the model config, "step",
    plus the run record (job, mlflow_run_id, tracking_uri, tokenizer_checksum, ...)}, all plain values;
    pretrain.core.weights reads it back. Non-tensor state entries other than None (megatron's `_extra_state`
    holds a byte buffer under Transformer Engine) are left out: load_into takes those from the model."""
    model = {k: v.detach().cpu() if v is not None else None for k, v in state.items()
             if v is None or isinstance(v, torch.Tensor)}
    return {**plain(record, "record"), "model": model, "config": plain(model_config, "model config"),
            "step": int(step)}
