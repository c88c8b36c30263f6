"""Target lengths for the NAR modes (slots, EOS included) and the choice among a length beam."""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.generation.common import NEG_INF
from model.generation.options import DecodeOptions
from model.seq2seq import Encoded, Seq2SeqModel


def length_cap(model: Seq2SeqModel, options: DecodeOptions) -> int:
    return min(options.max_len + 1, model.cfg.max_target_positions)


def candidate_lengths(model: Seq2SeqModel, enc: Encoded, src_tokens: torch.Tensor,
                      options: DecodeOptions) -> torch.Tensor:
    """[B, l] slot counts: from the length head (class = target length with its EOS), the source length (non-pad
    tokens), or the fixed length; l = length_beam for the head, else 1. The head's candidates are fairseq's
    (IterativeRefinementGenerator, what JANUS and CMLM decode with): its argmax plus the offsets
    -(l//2) .. l-1-l//2 (-1, 0, +1 for l = 3), clamped to the possible lengths; or, with
    options.length_candidates="top", its l likeliest classes."""
    cap = length_cap(model, options)
    if options.length_source == "fixed":
        if options.fixed_length > model.cfg.max_target_positions:
            raise ValueError(f"decode.fixed_length={options.fixed_length}: exceeds "
                             f"model.max_target_positions={model.cfg.max_target_positions}")
        return src_tokens.new_full((src_tokens.shape[0], 1), options.fixed_length)
    if options.length_source == "source":
        return (src_tokens != SPECIAL.pad).sum(1, keepdim=True).clamp(1, cap)
    logits = model.length_logits(enc).float()
    classes = torch.arange(logits.shape[1], device=logits.device)
    logits = logits.masked_fill(((classes < 1) | (classes > cap))[None], NEG_INF)
    n_valid = min(logits.shape[1] - 1, cap)
    if options.length_beam > n_valid:
        raise ValueError(f"decode.length_beam={options.length_beam}: only {n_valid} lengths are possible "
                         f"(model.n_length_classes={model.cfg.n_length_classes}, max_len={options.max_len})")
    if options.length_candidates == "top":
        return logits.topk(options.length_beam, dim=1).indices
    return length_beam(logits.argmax(dim=1), options.length_beam, cap)


def length_beam(best: torch.Tensor, beam: int, cap: int) -> torch.Tensor:
    """[B, beam] lengths around best [B]: best + (-(beam//2) .. beam-1-beam//2), clamped to 1..cap (a length
    near a bound can appear twice; pick_best then keeps the first)."""
    offsets = torch.arange(beam, device=best.device) - beam // 2
    return (best[:, None] + offsets).clamp(1, cap)


def real_slots(lengths: torch.Tensor) -> torch.Tensor:
    """[R, T_max] bool: slot t of row r is real when t < lengths[r]. Sizing the slots reads T_max on the host:
    the one read a NAR pass makes before it runs."""
    T = int(lengths.max())
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def pick_best(tokens: torch.Tensor, token_logp: torch.Tensor, real: torch.Tensor, n_candidates: int):
    """Per example, the candidate (rows b*l .. b*l+l-1) with the best mean log-prob over its real slots.
    Returns the chosen rows' ids (as lists, cut to their length) and their scores. Ties keep the likelier length."""
    mean = (token_logp * real).sum(1) / real.sum(1)
    B = tokens.shape[0] // n_candidates
    best = mean.view(B, n_candidates).argmax(1)
    rows = torch.arange(B, device=tokens.device) * n_candidates + best
    chosen = torch.cat([real.sum(1)[rows, None], tokens[rows]], dim=1).tolist()  # [length, ids...] per example
    return [row[1:1 + row[0]] for row in chosen], mean[rows].tolist()
