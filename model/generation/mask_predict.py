"""Mask-predict (CMLM, JANUS NAR inference) as fairseq's IterativeRefinementGenerator runs it: nar_bidir passes
over a length beam (lengths.candidate_lengths). Pass 0 predicts every slot; after pass t the
n = floor(C * (1 - (t+1)/T)) least confident content tokens are masked again and re-predicted, C = L - 1 content
slots of a row of L slots (the others keep their token and probability). The EOS slot, the last one, is never
re-masked: fairseq's output ends in a fixed EOS that neither counts nor competes (its score 0 sorts after every
content log-prob). The candidate with the best mean log-prob wins.

options.remask_slots="all" counts and ranks the EOS slot too (C = L), this project's earlier rule; with the top-l
length classes (options.length_candidates="top") it scored higher on a small model (BENCHMARKS.md), so both stay
as options."""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.generation.common import decoding_mode, expand_encoded, log_probs
from model.generation.lengths import candidate_lengths, pick_best, real_slots
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.postprocess import finish_nar
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams


@decoding_mode
def mask_predict(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    enc = model.encode(src_tokens)
    lengths = candidate_lengths(model, enc, src_tokens, options)
    n_candidates = lengths.shape[1]
    flat = lengths.reshape(-1)
    real = real_slots(flat)
    enc = expand_encoded(enc, n_candidates)
    tokens = torch.full(real.shape, SPECIAL.pad, dtype=torch.long, device=real.device)
    token_logp = torch.zeros(real.shape, device=real.device)
    masked = real.clone()
    eligible = flat - 1 if options.remask_slots == "content" else flat  # per row, the slots that may be re-masked
    passes = 0
    T = options.iterations
    for it in range(T):
        streams = build_streams("nar_bidir", tgt_tokens=tokens, masked=masked, tgt_mask=real)
        new_logp, new_tokens = log_probs(model, model.decode(enc, streams).hidden).max(-1)
        passes += 1
        tokens = torch.where(masked, new_tokens, tokens)
        token_logp = torch.where(masked, new_logp, token_logp)
        n_mask = (eligible.float() * (1.0 - (it + 1) / T)).long()  # per row
        if it == T - 1 or not bool(n_mask.any()):  # nothing left to re-mask (the pass's one host read)
            break
        masked = least_confident(token_logp, eligible, n_mask)
    ids, scores = pick_best(tokens, token_logp, real, n_candidates)
    figures = {"decoder_passes": passes, "mean_slots": real.sum().item() / real.shape[0]}
    return DecodeResult([finish_nar(row, options.postprocess) for row in ids], figures, scores)


def least_confident(token_logp: torch.Tensor, eligible: torch.Tensor, n_mask: torch.Tensor) -> torch.Tensor:
    """[R, T] bool: among the first eligible[r] slots of row r, the n_mask[r] with the lowest log-prob (ties: the
    earlier slot); later slots are never chosen."""
    candidate = torch.arange(token_logp.shape[1], device=eligible.device)[None, :] < eligible[:, None]
    confidence = token_logp.masked_fill(~candidate, float("inf"))
    rank = confidence.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = least confident
    return rank < n_mask[:, None]
