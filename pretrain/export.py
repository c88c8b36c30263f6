"""The file a run leaves behind for finetuning and decoding: full weights plus the record of where they came from."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


def model_config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def export_payload(state: dict[str, Any], model_config: dict[str, Any] | None, step: int,
                   record: dict[str, Any]) -> dict[str, Any]:
    """What Engine.export_weights saves: {"model": full state dict on CPU, "config": the model config, "step",
    plus the run record (job, mlflow_run_id, tracking_uri, tokenizer_checksum, ...)}; finetune.init_checkpoint
    reads it back."""
    return {**record, "model": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
            "config": model_config, "step": step}
