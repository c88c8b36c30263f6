"""Decoding modes of the one seq2seq model: AR greedy/beam with a main-stream KV cache, NAR one pass,
semi-NAR blocks, mask-predict and ELMER early exit. See registry.MODES."""
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.registry import MODES, decode, get_mode

__all__ = ["DecodeOptions", "DecodeResult", "MODES", "decode", "get_mode"]
