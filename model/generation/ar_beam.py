"""AR beam search with the main-stream key/value cache, batched over examples and beams (fairseq's rules).

Each step expands every live beam, takes the 2K best candidates per example, finishes the EOS candidates among
the first K (score / len**length_penalty, len counting the EOS) and continues with the best K others. An example
is done once it has K finished hypotheses; the best finished one is its output.
"""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.generation.common import NEG_INF, constrain_step, decoding_mode, expand_encoded, log_probs, max_output_len
from model.generation.incremental import ArStepper
from model.generation.options import DecodeOptions, DecodeResult
from model.seq2seq import Seq2SeqModel


@decoding_mode
def ar_beam(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    B, K = src_tokens.shape[0], options.beam_size
    R = B * K
    dev = src_tokens.device
    max_len = max_output_len(model, options)
    stepper = ArStepper(model, expand_encoded(model.encode(src_tokens), K), options.ar_logits)
    scores = torch.full((B, K), NEG_INF, device=dev)
    scores[:, 0] = 0.0  # one live beam at the start, so the first step does not pick K copies
    hyps = src_tokens.new_zeros((R, 0))
    prev = src_tokens.new_full((R,), SPECIAL.bos)
    example_rows = torch.arange(B, device=dev)[:, None] * K
    rank = torch.arange(2 * K, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    passes = 0
    for step in range(max_len + 1):
        logp = constrain_step(log_probs(model, stepper.step(prev)), step, max_len, options, history=hyps)
        passes += 1
        V = logp.shape[-1]
        cand = (scores.reshape(R, 1) + logp).view(B, K * V)
        top, index = cand.topk(2 * K, dim=1)
        beam, token = index // V, index % V
        is_eos = token == SPECIAL.eos

        ends = (is_eos[:, :K] & torch.isfinite(top[:, :K])).nonzero().tolist()
        if ends:
            normed = (top / float(step + 1) ** options.length_penalty).tolist()
            origin = (example_rows + beam).tolist()
            for b, j in ends:
                if len(finished[b]) < K:
                    finished[b].append((normed[b][j], hyps[origin[b][j]].tolist()))
        if step == max_len or all(len(f) >= K for f in finished):
            break

        # Continue with the best K candidates that are not EOS (stable: EOS ones sort after, in rank order).
        keep = (is_eos.long() * 2 * K + rank).argsort(dim=1)[:, :K]
        token = token.gather(1, keep)
        scores = top.gather(1, keep).masked_fill(token == SPECIAL.eos, NEG_INF)
        origin = (example_rows + beam.gather(1, keep)).reshape(R)
        hyps = torch.cat([hyps[origin], token.reshape(R, 1)], dim=1)
        stepper.reorder(origin)
        prev = token.reshape(R)

    tokens, best_scores = [], []
    for b in range(B):
        if finished[b]:
            score, ids = max(finished[b], key=lambda f: f[0])  # max keeps the first of equal scores
        else:  # cannot happen while EOS is forced at max_len; kept as a safe fallback
            score, ids = float(scores[b, 0]), hyps[b * K].tolist()
        tokens.append(ids)
        best_scores.append(score)
    return DecodeResult(tokens, {"decoder_passes": passes}, best_scores)
