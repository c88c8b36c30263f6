"""ELMER early exit: one nar_bidir pass in which a slot leaves at the first layer whose off-ramp distribution
(its normed state through the tied head) has entropy below options.exit_entropy; the rest run on. With
options.exit_layer = k every slot leaves at layer k instead (a fixed exit: k layers run, no entropy computed)."""
from __future__ import annotations

import torch

from model.generation.common import decoding_mode, expand_encoded, log_probs
from model.generation.lengths import candidate_lengths, pick_best, real_slots
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.postprocess import finish_nar
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams


def entropy_exit_rule(model: Seq2SeqModel, threshold: float, real: torch.Tensor):
    """Slots beyond a row's length exit at once so that they never keep the computation going."""

    def rule(layer: int, normed: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(model.logits(normed).float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return (entropy < threshold) | ~real

    return rule


def fixed_exit_rule(exit_layer: int):
    def rule(layer: int, normed: torch.Tensor) -> torch.Tensor:
        return torch.full(normed.shape[:2], layer >= exit_layer, dtype=torch.bool, device=normed.device)

    return rule


@decoding_mode
def early_exit(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    enc = model.encode(src_tokens)
    lengths = candidate_lengths(model, enc, src_tokens, options)
    n_candidates = lengths.shape[1]
    real = real_slots(lengths.reshape(-1))
    streams = build_streams("nar_bidir", tgt_mask=real)
    rule = (entropy_exit_rule(model, options.exit_entropy, real) if options.exit_layer is None
            else fixed_exit_rule(options.exit_layer))
    fixed = options.exit_layer is not None  # k layers, known on the host: no flag to read per layer
    out = model.decode(expand_encoded(enc, n_candidates), streams, exit_rule=rule, stop_when_all_exited=not fixed,
                       depth=options.exit_layer)
    token_logp, tokens = log_probs(model, out.hidden).max(-1)
    ids, scores = pick_best(tokens, token_logp, real, n_candidates)
    n_real = real.sum()
    mean_exit, layers_run, n_real = torch.stack([(out.exit_layer * real).sum() / n_real,
                                                 out.exit_layer.max().float(), n_real.float()]).tolist()  # one read
    figures = {"decoder_passes": 1, "mean_exit_layer": mean_exit, "layers_run": int(layers_run),
               "mean_slots": n_real / real.shape[0]}
    return DecodeResult([finish_nar(row, options.postprocess) for row in ids], figures, scores)
