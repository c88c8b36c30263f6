"""Decoding modes by name. Every mode is `(model, src_tokens [B, S], options) -> DecodeResult`."""
from __future__ import annotations

import torch

from model.generation.ar_beam import ar_beam
from model.generation.ar_greedy import ar_greedy
from model.generation.common import DecodeFn
from model.generation.early_exit import early_exit
from model.generation.mask_predict import mask_predict
from model.generation.nar import nar
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.semi_nar import semi_nar

MODES: dict[str, DecodeFn] = {
    "ar_greedy": ar_greedy,
    "ar_beam": ar_beam,
    "nar": nar,
    "semi_nar": semi_nar,
    "mask_predict": mask_predict,
    "early_exit": early_exit,
}


def get_mode(name: str) -> DecodeFn:
    if name not in MODES:
        raise ValueError(f"decoding mode {name!r} is unknown; choose one of {sorted(MODES)}")
    return MODES[name]


def decode(name: str, model, src_tokens: torch.Tensor, options: DecodeOptions | None = None) -> DecodeResult:
    return get_mode(name)(model, src_tokens, options)
