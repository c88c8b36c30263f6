"""The weights a finetuning job (or `generate`) starts from: anything the training core can read
(pretrain.core.read_weights: checkpoint folders, exports, plain state dicts) plus a finetuning output folder, and
where those weights come from.

A finetuning run leaves final_model.pt (the core's export) and, beside it, finetune_meta.json (task, objective,
decoding mode, MLflow runs, tokenizer, the resolved config; finetune.run.write_meta) and a copy of its tokenizer
(in TOKENIZER_COPY, which the meta names by its path relative to the folder, so the folder can be moved): `read_init` on that folder
(or on its final_model.pt) returns the weights with the meta merged in and `format` "finetuned"; `tokenizer_copy`
finds the tokenizer.

`pretrain_run_id` / `pretrain_step` name the pretraining run the weights descend from; `check_tokenizer` refuses
weights trained with another tokenizer than the task shards'.

A Hugging Face BART / mBART folder (config.json + weights, e.g. a public checkpoint or `python -m finetune export`'s
output) is an `HfCheckpoint`: its config gives the model's shape (model.preset does not apply) and, through the task
shards' tokenizer (tokenizer.type=hf on the checkpoint's tokenizer), the permutation of its special ids onto ours
(data_pipeline/hf_tokenizer.py); the weights are copied into the model once it is built (`load_weights`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from pretrain import core

FINETUNE_META = "finetune_meta.json"  # written beside the exported weights by `python -m finetune`
FINETUNED = "finetuned"  # meta["format"] of a finetuned model
TOKENIZER_COPY = "tokenizer"  # the folder, inside a finetuning output, holding its tokenizer (meta["tokenizer"])
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")  # what transformers' from_pretrained reads


def is_hf_checkpoint(path: str | Path) -> bool:
    """A folder of Hugging Face model files: config.json beside the weights."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES)


@dataclass
class HfCheckpoint:
    """A Hugging Face BART/mBART folder to start from: the model config read from it, its ids mapped by
    vocab_order (our id -> its id; None: its ids are ours)."""

    path: Path
    model_cfg: ModelConfig
    vocab_order: list[int] | None
    meta: dict[str, Any] = field(default_factory=lambda: {"format": "hf"})


def read_hf_checkpoint(path: str | Path, tokenizer, overrides: dict[str, Any], tp_size: int = 1) -> HfCheckpoint:
    """The model config of an HF folder, checked against the tokenizer the task shards were written with (its
    special ids and vocabulary); core.InitError naming the folder otherwise."""
    from transformers import AutoConfig

    from model.hf_state import config_from_hf

    path = Path(path)
    try:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        model_cfg = config_from_hf(hf_cfg, tokenizer.vocab_order, **overrides).validate(tp_size)
    except (OSError, ValueError, TypeError) as err:
        raise core.InitError(f"{path}: {err}") from None
    if model_cfg.vocab_size != tokenizer.padded_vocab_size:
        raise core.InitError(f"{path} has a vocabulary of {model_cfg.vocab_size} ids, but the tokenizer "
                             f"{tokenizer.path} has {tokenizer.padded_vocab_size}: build the task shards with the "
                             f"checkpoint's tokenizer (data.overrides=[tokenizer.type=hf,tokenizer.path={path}])")
    exported = getattr(hf_cfg, "tandem_export", None) or {}  # a Tandem export records its run and tokenizer
    meta = {"format": "hf", **{k: exported.get(k) for k in ("job", "step", "mlflow_run_id", "tokenizer_checksum")}}
    return HfCheckpoint(path, model_cfg, tokenizer.vocab_order, {k: v for k, v in meta.items() if v is not None})


def load_weights(model, init: core.InitWeights | HfCheckpoint) -> None:
    """Copy the init weights into the built model (this rank's tensor-parallel slice)."""
    if isinstance(init, HfCheckpoint):
        from model.hf import load_hf_into, read_hf

        hf_model, aside = read_hf(init.path)
        load_hf_into(model, hf_model, aside, init.vocab_order)
    else:
        core.load_into(model, init)


def read_init(path: str | Path) -> core.InitWeights:
    """Weights and metadata from a finetuning output folder or any form the core reads (core.InitError if not)."""
    path = Path(path)
    if path.is_file() and path.name == core.FINAL_WEIGHTS and (path.parent / FINETUNE_META).is_file():
        path = path.parent
    if path.is_dir() and (path / FINETUNE_META).is_file():
        return _read_finetuned(path)
    return core.read_weights(path)


def _read_finetuned(folder: Path) -> core.InitWeights:
    weights_file = folder / core.FINAL_WEIGHTS
    if not weights_file.is_file():
        raise core.InitError(f"{folder}: {FINETUNE_META} but no {core.FINAL_WEIGHTS} (the finetuning run did not "
                             "finish?)")
    try:
        meta = json.loads((folder / FINETUNE_META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise core.InitError(f"{folder / FINETUNE_META}: cannot read ({err})") from None
    weights = core.read_weights(weights_file)
    weights.meta = {**weights.meta, **meta, "format": FINETUNED}
    return weights


def tokenizer_copy(weights: core.InitWeights) -> Path | None:
    """The tokenizer folder a finetuned model carries, None for weights without one (other files; finetuning
    outputs written before the copy existed named the data's tokenizer by an absolute path instead)."""
    name = weights.meta.get("tokenizer")
    if weights.meta.get("format") != FINETUNED or not name or Path(name).is_absolute():
        return None
    return Path(weights.path).parent / name


def pretrain_run_id(weights: core.InitWeights | HfCheckpoint) -> str:
    """The MLflow run of the pretraining these weights descend from: the writer's own run for a pretraining
    checkpoint or export, the recorded pretrain_run_id for finetuned weights; "none" when the file does not say."""
    meta = weights.meta
    if meta.get("format") == FINETUNED or meta.get("job") == "finetune":
        return str(meta.get("pretrain_run_id") or "none")
    return str(meta.get("mlflow_run_id") or "none")


def pretrain_step(weights: core.InitWeights | HfCheckpoint) -> int | str:
    """The pretraining step these weights descend from, by the same lineage as pretrain_run_id (a finetuned file's
    own `step` is its finetuning step)."""
    meta = weights.meta
    if meta.get("format") == FINETUNED or meta.get("job") == "finetune":
        return meta.get("pretrain_step", "unknown")
    return meta.get("step", "unknown")


def check_tokenizer(weights: core.InitWeights | HfCheckpoint, checksum: str, shards: str) -> None:
    """InitError when the weights record a tokenizer other than the one that wrote `shards` (files without a
    record, e.g. a plain state dict, cannot be checked and pass)."""
    recorded = weights.meta.get("tokenizer_checksum")
    if recorded and checksum and recorded != checksum:
        raise core.InitError(f"{weights.path} was trained with the tokenizer of checksum {recorded}, but {shards} "
                             f"were written with the tokenizer of checksum {checksum}: token ids would mean different "
                             "pieces. Build the task shards with the pretraining data config's tokenizer (python -m "
                             "finetune data, data.config / data.overrides as in pretraining)")
