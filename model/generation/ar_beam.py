"""AR beam search with the main-stream key/value cache, batched over examples and beams (fairseq's rules).

Each step expands every live beam, takes the 2K best candidates per example, finishes the EOS candidates among
the first K (score / len**length_penalty, len counting the EOS) and continues with the best K others. An example
is done once it has K finished hypotheses; the best finished one is its output (the first of equal scores).

Finished hypotheses are kept on the device, in K slots per example filled in the order they finish; a step reads
one flag on the host (is every example done?) and the outputs are read back once, at the end.
"""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.generation.common import NEG_INF, constrain_step, decoding_mode, expand_encoded, log_probs, max_output_len
from model.generation.incremental import ArStepper
from model.generation.options import DecodeOptions, DecodeResult
from model.seq2seq import Seq2SeqModel


class Finished:
    """Per example, up to K finished hypotheses: scores [B, K] (-inf in empty slots), tokens [B, K, max_len] and
    lengths [B, K] (EOS excluded), with a spare slot K per example that takes the finishes beyond K."""

    def __init__(self, B: int, K: int, max_len: int, device: torch.device):
        self.B, self.K = B, K
        self.scores = torch.full((B, K + 1), NEG_INF, device=device)
        self.tokens = torch.full((B, K + 1, max_len), SPECIAL.pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, K + 1, dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)

    def add(self, ends: torch.Tensor, scores: torch.Tensor, hyps: torch.Tensor) -> None:
        """ends [B, K]: which of the first K candidates finish (in rank order); scores [B, K] their normalised
        scores; hyps [B, K, t] their tokens before EOS."""
        slot = self.count[:, None] + ends.long().cumsum(1) - 1  # the j-th finish of a row takes the next slot
        slot = torch.where(ends & (slot < self.K), slot, self.K)  # not a finish, or beyond K: the spare slot
        flat = (torch.arange(self.B, device=slot.device)[:, None] * (self.K + 1) + slot).reshape(-1)
        t = hyps.shape[2]
        self.scores.view(-1).index_copy_(0, flat, scores.reshape(-1))
        if t:  # several finishes into the spare slot: any one of them lands there, unread
            self.tokens.view(-1, self.tokens.shape[2])[:, :t].index_copy_(0, flat, hyps.reshape(-1, t))
        self.lengths.view(-1).index_fill_(0, flat, t)
        self.count = (self.count + ends.sum(1)).clamp(max=self.K)

    def best(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per example the best finished (score, length, tokens); argmax takes the first of equal scores."""
        pick = self.scores[:, :self.K].argmax(1)
        rows = torch.arange(self.B, device=pick.device)
        return self.scores[rows, pick], self.lengths[rows, pick], self.tokens[rows, pick]


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
    finished = Finished(B, K, max_len + 1, dev)
    passes = 0
    for step in range(max_len + 1):
        logp = constrain_step(log_probs(model, stepper.step(prev)), step, max_len, options, history=hyps)
        passes += 1
        V = logp.shape[-1]
        cand = (scores.reshape(R, 1) + logp).view(B, K * V)
        top, index = cand.topk(2 * K, dim=1)
        beam, token = index // V, index % V
        is_eos = token == SPECIAL.eos

        ends = is_eos[:, :K] & torch.isfinite(top[:, :K])
        origin = example_rows + beam[:, :K]
        normed = top[:, :K] / float(step + 1) ** options.length_penalty
        finished.add(ends, normed, hyps[origin.reshape(-1)].view(B, K, step))
        if step == max_len or bool((finished.count >= K).all()):  # the step's one host read
            break

        # Continue with the best K candidates that are not EOS (stable: EOS ones sort after, in rank order).
        keep = (is_eos.long() * 2 * K + rank).argsort(dim=1)[:, :K]
        token = token.gather(1, keep)
        scores = top.gather(1, keep).masked_fill(token == SPECIAL.eos, NEG_INF)
        origin = (example_rows + beam.gather(1, keep)).reshape(R)
        hyps = torch.cat([hyps[origin], token.reshape(R, 1)], dim=1)
        stepper.reorder(origin)
        prev = token.reshape(R)

    best_score, best_length, best_tokens = finished.best()
    # None finished (cannot happen while EOS is forced at max_len; a safe fallback): the first live beam.
    none = finished.count == 0
    best_score = torch.where(none, scores[:, 0], best_score)
    best_length = torch.where(none, hyps.shape[1], best_length)
    width = hyps.shape[1]
    best_tokens = torch.where(none[:, None], hyps[example_rows[:, 0]], best_tokens[:, :width])
    rows = torch.cat([best_length[:, None], best_tokens], dim=1).tolist()  # the outputs' one read
    return DecodeResult([row[1:1 + row[0]] for row in rows], {"decoder_passes": passes}, best_score.tolist())
