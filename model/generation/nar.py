"""NAR one pass (BANG NAR / ELMER without exits): mask slots only, argmax at every slot."""
from __future__ import annotations

import torch

from model.generation.common import decoding_mode, expand_encoded, log_probs
from model.generation.lengths import candidate_lengths, pick_best, real_slots
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.postprocess import finish_nar
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams


@decoding_mode
def nar(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    enc = model.encode(src_tokens)
    lengths = candidate_lengths(model, enc, src_tokens, options)  # [B, l]
    n_candidates = lengths.shape[1]
    real = real_slots(lengths.reshape(-1))
    streams = build_streams(options.nar_mode, tgt_mask=real)
    hidden = model.decode(expand_encoded(enc, n_candidates), streams).hidden
    token_logp, tokens = log_probs(model, hidden).max(-1)
    ids, scores = pick_best(tokens, token_logp, real, n_candidates)
    figures = {"decoder_passes": 1, "mean_slots": real.sum().item() / real.shape[0]}
    return DecodeResult([finish_nar(row, options.postprocess) for row in ids], figures, scores)
