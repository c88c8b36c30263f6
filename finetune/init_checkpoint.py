"""The weights a finetuning job (or `generate`) starts from: anything the training core can read
(pretrain.core.read_weights: checkpoint folders, exports, plain state dicts) plus a finetuning output folder, and
where those weights come from.

A finetuning run leaves final_model.pt (the core's export) and, beside it, finetune_meta.json (task, objective,
decoding mode, MLflow runs, tokenizer, the resolved config; finetune.run.write_meta) and a copy of its tokenizer
(TOKENIZER_COPY, which the meta names by that relative path, so the folder can be moved): `read_init` on that folder
(or on its final_model.pt) returns the weights with the meta merged in and `format` "finetuned"; `tokenizer_copy`
finds the tokenizer.

`pretrain_run_id` / `pretrain_step` name the pretraining run the weights descend from; `check_tokenizer` refuses
weights trained with another tokenizer than the task shards'.
"""
from __future__ import annotations

import json
from pathlib import Path

from pretrain import core

FINETUNE_META = "finetune_meta.json"  # written beside the exported weights by `python -m finetune`
FINETUNED = "finetuned"  # meta["format"] of a finetuned model
TOKENIZER_COPY = "tokenizer"  # the folder, inside a finetuning output, holding its tokenizer (meta["tokenizer"])


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


def pretrain_run_id(weights: core.InitWeights) -> str:
    """The MLflow run of the pretraining these weights descend from: the writer's own run for a pretraining
    checkpoint or export, the recorded pretrain_run_id for finetuned weights; "none" when the file does not say."""
    meta = weights.meta
    if meta.get("format") == FINETUNED or meta.get("job") == "finetune":
        return str(meta.get("pretrain_run_id") or "none")
    return str(meta.get("mlflow_run_id") or "none")


def pretrain_step(weights: core.InitWeights) -> int | str:
    """The pretraining step these weights descend from, by the same lineage as pretrain_run_id (a finetuned file's
    own `step` is its finetuning step)."""
    meta = weights.meta
    if meta.get("format") == FINETUNED or meta.get("job") == "finetune":
        return meta.get("pretrain_step", "unknown")
    return meta.get("step", "unknown")


def check_tokenizer(weights: core.InitWeights, checksum: str, shards: str) -> None:
    """InitError when the weights record a tokenizer other than the one that wrote `shards` (files without a
    record, e.g. a plain state dict, cannot be checked and pass)."""
    recorded = weights.meta.get("tokenizer_checksum")
    if recorded and checksum and recorded != checksum:
        raise core.InitError(f"{weights.path} was trained with the tokenizer of checksum {recorded}, but {shards} "
                             f"were written with the tokenizer of checksum {checksum}: token ids would mean different "
                             "pieces. Build the task shards with the pretraining data config's tokenizer (python -m "
                             "finetune data, data.config / data.overrides as in pretraining)")
