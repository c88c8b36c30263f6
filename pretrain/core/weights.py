"""Initial weights for a model (finetuning, decoding, benchmarks) from any checkpoint a run writes, with shape checks.

Accepted paths:
  * a run's output folder or its `checkpoints/` folder: the DeepSpeed checkpoint `latest` names (it carries the
    MLflow run id); without checkpoints, the folder's final_model.pt;
  * one DeepSpeed tag folder (`step_00000300/`): `mp_rank_XX_model_states.pt` per tensor-parallel rank (ZeRO 0-2;
    shards are concatenated along each parameter's partition dimension) or, for ZeRO-3, the fp32 partitions
    rebuilt with DeepSpeed's zero_to_fp32;
  * a file: the engine's full-weights export (final_model.pt: {"model": state dict, "config": model config,
    "step", and the run record: job, mlflow_run_id, tokenizer_checksum, ...}), a plain full (TP=1) state dict
    (`{name: tensor}` or `{"state_dict"|"module": {...}}`), or one mp_rank file.

Every file is read with torch.load(weights_only=True), so reading weights never runs code from the file; only a
DeepSpeed checkpoint file that holds other objects is read in full, with a warning (`_load`). The layout is the one
pretrain.core.checkpoint and pretrain.core.export write. `read_weights(path)` needs no process
group: it returns the full weights (or, for TP shards, the shards) and the record the engine wrote
(pretrain.core.export.RECORD_KEYS: job kind, step, MLflow run id, model config, tokenizer checksum; from a
DeepSpeed checkpoint's client state or the export's top-level keys; older files may lack some). `checkpoint_dims`
reads the model dimensions off the weight shapes so a job can compare them with its config before any process
starts; `load_into` copies the weights into a model at any tensor-parallel size.
"""
from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.core.checkpoint import POINTER
from pretrain.core.export import FINAL_WEIGHTS, RECORD_KEYS

MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # DeepSpeed's file of one tensor-parallel rank
_PREFIXES = ("module.", "model.")  # DeepSpeed wraps pretrain.core.engine.ObjectiveModule, which holds `model`


class InitError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the path."""


@dataclass
class InitWeights:
    path: Path  # what was read (file or tag folder)
    shards: list[dict[str, Any]]  # one state dict per tensor-parallel rank of the writer (one entry: full weights)
    meta: dict[str, Any] = field(default_factory=dict)  # step, mlflow_run_id, zero_stage, model_config, format ...

    @property
    def writer_tp(self) -> int:
        return len(self.shards)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of rank 0's tensors (local shapes when the writer used tensor parallelism)."""
        return {k: tuple(v.shape) for k, v in self.shards[0].items() if isinstance(v, torch.Tensor)}


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in state.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        out[name] = value
    return out


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _load(path: Path) -> Any:
    """torch.load with weights_only=True: reading weights never runs code from the file (what this project writes
    is plain: pretrain.core.export.plain). Only a DeepSpeed checkpoint file, whose format DeepSpeed owns and may
    fill with other objects, is read in full when weights_only refuses it, with a warning."""
    try:
        try:
            return _torch_load(path, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), None)
            if reason is None:  # not a pickle at all (a junk or truncated file): below, "cannot read"
                raise
            reason = reason.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
            if not MP_FILE.match(path.name):
                raise InitError(f"{path}: holds objects other than tensors and plain values, which torch.load("
                                f"weights_only=True) refuses ({reason}); save a plain state dict ({{name: tensor}}) "
                                "instead") from None
            warnings.warn(f"{path}: DeepSpeed's checkpoint holds objects torch.load(weights_only=True) refuses "
                          f"({reason}); reading it in full", RuntimeWarning, stacklevel=3)
            return _torch_load(path, weights_only=False)
    except InitError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt file, not a torch file, truncated download
        raise InitError(f"{path}: cannot read as a torch checkpoint ({type(err).__name__}: {err})") from None


def _find_tag_dir(path: Path) -> Path | None:
    """A DeepSpeed tag folder for `path` (itself, `latest` in it, or in its checkpoints/ subfolder)."""
    for folder in (path, path / "checkpoints"):
        if any(MP_FILE.match(p.name) for p in folder.glob("mp_rank_*_model_states.pt")):
            return folder
        pointer = folder / POINTER
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if not (folder / tag).is_dir():
                raise InitError(f"{pointer} names {tag!r}, but {folder / tag} does not exist")
            return folder / tag
    return None


def read_weights(path: str | Path) -> InitWeights:
    """Read weights and metadata from any accepted checkpoint form (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InitError(f"init checkpoint not found: {path}")
    if path.is_dir():
        tag_dir = _find_tag_dir(path)
        if tag_dir is not None:
            return _read_deepspeed(tag_dir)
        if (path / FINAL_WEIGHTS).is_file():
            return _read_file(path / FINAL_WEIGHTS)
        raise InitError(f"{path}: no checkpoint here: expected mp_rank_*_model_states.pt, a `{POINTER}` file naming "
                        f"a step_* folder (also under checkpoints/), or {FINAL_WEIGHTS}")
    if MP_FILE.match(path.name):
        return _read_deepspeed(path.parent)
    return _read_file(path)


def _read_file(path: Path) -> InitWeights:
    obj = _load(path)
    if not isinstance(obj, dict):
        raise InitError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    meta: dict[str, Any] = {"format": "state_dict"}
    state = next((obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), dict)), obj)
    if isinstance(obj.get("config"), dict):  # the engine's export: model config, step and the run record
        meta.update({k: obj[k] for k in RECORD_KEYS if k in obj}, format="export", model_config=obj["config"],
                    step=obj.get("step"))
    state = _strip(state)
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError(f"{path}: no tensors found; expected a state dict of the seq2seq model")
    return InitWeights(path, [state], meta)


def _read_deepspeed(tag_dir: Path) -> InitWeights:
    files = sorted((p for p in tag_dir.iterdir() if MP_FILE.match(p.name)),
                   key=lambda p: int(MP_FILE.match(p.name).group(1)))
    if not files:
        raise InitError(f"{tag_dir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint folder)")
    first = _load(files[0])
    mp = int(first.get("mp_world_size", len(files)) or 1)
    if len(files) != mp:
        raise InitError(f"{tag_dir}: {len(files)} mp_rank files but the checkpoint was written with "
                        f"tensor parallelism {mp}: the checkpoint is incomplete")
    stage = int(first.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    meta = {"format": "deepspeed", "zero_stage": stage, "writer_tp": mp, "tag": tag_dir.name,
            **{k: first[k] for k in RECORD_KEYS if k in first}}
    if stage == 3:
        if mp > 1:
            raise InitError(f"{tag_dir}: ZeRO-3 with tensor parallelism is not a layout this project writes")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except Exception as err:  # noqa: BLE001
            raise InitError(f"{tag_dir}: cannot rebuild ZeRO-3 weights ({type(err).__name__}: {err})") from None
        # zero_to_fp32 returns parameters only; carry the non-tensor entries (megatron's _extra_state) over.
        state = {**{k: v for k, v in first["module"].items() if not isinstance(v, torch.Tensor)}, **state}
        return InitWeights(tag_dir, [_strip(state)], meta)
    shards = [_strip(first["module"])] + [_strip(_load(f)["module"]) for f in files[1:]]
    return InitWeights(tag_dir, shards, meta)


# --- shapes ---------------------------------------------------------------------------------------------------

def checkpoint_dims(weights: InitWeights) -> dict[str, Any]:
    """Model dimensions read off the weight shapes (n_heads cannot be: Q/K/V are fused)."""
    shapes, tp = weights.shapes(), weights.writer_tp

    def rows(name: str) -> int:
        if name not in shapes:
            raise InitError(f"{weights.path}: no tensor {name!r}; this is not a checkpoint of the seq2seq model "
                            f"(found e.g. {sorted(shapes)[:5]})")
        return shapes[name][0]

    def count(prefix: str) -> int:
        return len({int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    return {
        "vocab_size": rows("embed_tokens.weight") * tp,
        "d_model": shapes["embed_tokens.weight"][1],
        "d_ffn": rows("encoder_layers.0.ffn.block.fc_in.weight") * tp,
        "n_encoder_layers": count("encoder_layers"),
        "n_decoder_layers": count("decoder_layers"),
        "max_source_positions": rows("embed_source_positions.weight"),
        "max_target_positions": rows("embed_target_positions.weight") - 1,
        "n_length_classes": rows("length_head.weight"),
        "norm": "pre" if "encoder_final_norm.weight" in shapes else "post",
    }


SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "d_ffn", "n_encoder_layers", "n_decoder_layers",
                "max_source_positions", "max_target_positions", "n_length_classes", "norm", "activation", "n_predict")


def check_dims(weights: InitWeights, model_cfg, where: str) -> None:
    """InitError listing every dimension where the checkpoint and the configured model differ (the saved model
    config, where the checkpoint has one, also settles n_heads, activation and n_predict)."""
    dims = checkpoint_dims(weights)
    saved = weights.meta.get("model_config") or {}
    dims.update({k: saved[k] for k in SHAPE_FIELDS if k in saved and k not in dims})
    diffs = [f"{k}: checkpoint {v!r}, config {getattr(model_cfg, k)!r}" for k, v in dims.items()
             if getattr(model_cfg, k) != v]
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size") for d in diffs):
            hint = " (vocab_size comes from the tokenizer: finetune with the pretraining data config's tokenizer)"
        raise InitError(f"{weights.path} was written for a model of another shape than {where} describes: "
                        f"{'; '.join(diffs)}{hint}. Set model.preset / model.overrides to the pretrained model's.")


def full_weights(weights: InitWeights, model: torch.nn.Module) -> dict[str, Any]:
    """One full (TP=1) state dict: tensor-parallel shards concatenated along each parameter's partition dim
    (read from the model's megatron attributes; shards are contiguous slices in rank order)."""
    if weights.writer_tp == 1:
        return dict(weights.shards[0])
    params = dict(model.named_parameters())
    full: dict[str, Any] = {}
    for name, value in weights.shards[0].items():
        param = params.get(name)
        if isinstance(value, torch.Tensor) and param is not None and getattr(param, "tensor_model_parallel", False):
            full[name] = torch.cat([s[name] for s in weights.shards], dim=param.partition_dim)
        else:
            full[name] = value
    return full


def load_into(model: torch.nn.Module, weights: InitWeights) -> None:
    """Copy the checkpoint into `model` (this rank's tensor-parallel slice); InitError on any missing, extra or
    differently shaped tensor, naming them."""
    from model import parallel
    from model.sharding import load_full_state_dict

    full = full_weights(weights, model)
    expected = model.state_dict()
    params = dict(model.named_parameters())
    tp = parallel.tp_size()
    for name, value in expected.items():  # megatron's `_extra_state` placeholders need not be in the file
        if not isinstance(value, torch.Tensor) and name not in full:
            full[name] = value
    missing = sorted(k for k in expected if k not in full)
    extra = sorted(k for k in full if k not in expected)
    wrong = []
    for name, value in full.items():
        if name in expected and isinstance(value, torch.Tensor):
            shape = list(expected[name].shape)
            param = params.get(name)
            if param is not None and getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp
            if list(value.shape) != shape:
                wrong.append(f"{name} {tuple(value.shape)} vs model {tuple(shape)}")
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:3]})" if extra else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else ""]
        raise InitError(f"{weights.path} does not fit the model: " + "; ".join(p for p in parts if p))
    full = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in full.items()}
    load_full_state_dict(model, full, strict=True)

