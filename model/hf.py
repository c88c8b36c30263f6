"""Hugging Face export and import of Seq2SeqModel: BartForConditionalGeneration for norm="post",
MBartForConditionalGeneration for norm="pre". The state-dict and config mapping is model/hf_state.py.

    hf_model = to_hf(model)                  # under TP a collective: call it on every TP rank
    aside = aside_weights(model)             # slot_embed, length_head, target position row M: no HF counterpart
    model = from_hf(hf_model, aside=aside)   # aside=None: those stay freshly initialised
    save_hf(model, directory); model = load_hf(directory)   # HF files plus tandem_aside.pt

In plain AR mode ("ar" streams, prev_tokens = decoder_input_ids, source pads = attention_mask 0) the HF model's
logits equal ours (tests/test_hf_interop.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import (AutoModelForSeq2SeqLM, BartForConditionalGeneration, MBartForConditionalGeneration,
                          PreTrainedModel)

from model.config import SPECIAL
from model.hf_state import (ASIDE_KEYS, LAST_TARGET_POSITION, config_from_hf, from_hf_state_dict, hf_config,
                            to_hf_state_dict)
from model.seq2seq import Seq2SeqModel
from model.sharding import full_state_dict, load_full_state_dict

ASIDE_FILE = "tandem_aside.pt"

__all__ = ["ASIDE_KEYS", "aside_weights", "config_from_hf", "from_hf", "from_hf_state_dict", "hf_config",
           "load_hf", "save_hf", "to_hf", "to_hf_state_dict"]


def to_hf(model: Seq2SeqModel, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """An HF model with our weights (gathered from all TP ranks first), in our dtype and train/eval mode."""
    full = full_state_dict(model)
    hf_sd, _ = to_hf_state_dict(full, model.cfg)
    model_class = BartForConditionalGeneration if model.cfg.norm == "post" else MBartForConditionalGeneration
    hf_model = model_class._from_config(hf_config(model.cfg), attn_implementation=attn_implementation)
    hf_model.load_state_dict(hf_sd, strict=True)
    hf_model.generation_config.forced_eos_token_id = SPECIAL.eos  # as BART does, with our eos id
    return hf_model.to(full["embed_tokens.weight"].dtype).train(model.training)


def aside_weights(model: Seq2SeqModel) -> dict[str, torch.Tensor]:
    """Our weights without an HF counterpart (all replicated under TP, so no collective)."""
    return {"slot_embed": model.slot_embed.detach().clone(),
            "length_head.weight": model.length_head.weight.detach().clone(),
            "length_head.bias": model.length_head.bias.detach().clone(),
            LAST_TARGET_POSITION: model.embed_target_positions.weight[model.cfg.max_target_positions].detach().clone()}


def from_hf(hf_model: PreTrainedModel, aside: dict[str, torch.Tensor] | None = None, **overrides) -> Seq2SeqModel:
    """Our model (at the current TP size) from an HF BART/mBART. `aside` gives back what an export kept aside;
    without it slot_embed, length_head and the target position row M keep the new model's fresh init.
    `overrides` set config fields (e.g. dropout=0.0)."""
    cfg = config_from_hf(hf_model.config, **overrides)
    model = Seq2SeqModel(cfg)
    full = from_hf_state_dict(hf_model.state_dict(), cfg, aside if aside is not None else aside_weights(model))
    current = model.state_dict()
    tensors = {name for name, value in current.items() if isinstance(value, torch.Tensor)}
    if set(full) != tensors:
        raise KeyError(f"HF import does not cover the model: missing {sorted(tensors - set(full))}, "
                       f"unexpected {sorted(set(full) - tensors)}")
    extra_states = {name: value for name, value in current.items() if name not in tensors}  # megatron's, None
    load_full_state_dict(model, {**full, **extra_states}, strict=True)
    return model.train(hf_model.training)


def save_hf(model: Seq2SeqModel, directory: str | Path) -> Path:
    """HF files (save_pretrained) plus the aside weights in tandem_aside.pt. A collective under TP; rank 0 writes."""
    directory = Path(directory)
    hf_model = to_hf(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        hf_model.save_pretrained(directory)
        torch.save(aside_weights(model), directory / ASIDE_FILE)
    return directory


def load_hf(directory: str | Path, **overrides) -> Seq2SeqModel:
    """Our model from a directory of HF files; tandem_aside.pt is used when present (local files only)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'}: not a Hugging Face model directory")
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(directory, local_files_only=True)
    aside_file = directory / ASIDE_FILE
    aside = torch.load(aside_file, map_location="cpu", weights_only=True) if aside_file.is_file() else None
    return from_hf(hf_model, aside=aside, **overrides)
