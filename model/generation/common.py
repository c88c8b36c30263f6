"""What every decoding mode shares: the wrapper that makes a function a mode, log-probabilities with the
never-output tokens banned, the AR length and n-gram constraints, and beam/length-beam expansion.

Device discipline (checked by tests/test_fake_cuda.py): a mode's per-step work stays on the model's device; a loop
reads at most one stop flag per step on the host, and the result is read back at the end in one or two
transfers. Host-side choices (lengths, step counts) come from the options, not from device values."""
from __future__ import annotations

import functools
import time
from typing import Callable

import torch
import torch.nn.functional as F

from model.config import SPECIAL
from model.generation.options import DecodeOptions, DecodeResult
from model.seq2seq import Encoded, Seq2SeqModel

# (model, src_tokens [B, S], options) -> DecodeResult
DecodeFn = Callable[..., DecodeResult]

NEVER_OUTPUT = (SPECIAL.pad, SPECIAL.bos, SPECIAL.mask)
NEG_INF = float("-inf")


def decoding_mode(fn: DecodeFn) -> DecodeFn:
    """Validate the options, run without gradients in eval mode (dropout off; the caller's mode is restored),
    and add the wall time and the mean output length to the figures."""

    @functools.wraps(fn)
    def run(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions | None = None) -> DecodeResult:
        options = (options if options is not None else DecodeOptions()).validate().check_model(model.cfg)
        if src_tokens.dim() != 2:
            raise ValueError(f"src_tokens must be [batch, length], got shape {tuple(src_tokens.shape)}")
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                result = fn(model, src_tokens, options)
        finally:
            model.train(was_training)
        result.figures["wall_s"] = time.perf_counter() - start
        result.figures["mean_output_len"] = sum(map(len, result.tokens)) / max(len(result.tokens), 1)
        return result

    return run


def log_probs(model: Seq2SeqModel, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probabilities in fp32 (gathered across TP ranks, so every rank picks the same
    tokens), with pad, bos and mask made impossible."""
    logp = F.log_softmax(model.logits(hidden).float(), dim=-1)
    for token in NEVER_OUTPUT:  # one id at a time: a list index would be copied to the device every step
        logp[..., token] = NEG_INF
    return logp


def max_output_len(model: Seq2SeqModel, options: DecodeOptions) -> int:
    """max_len capped so that the last step's position ids stay inside the position table."""
    cap = model.cfg.max_target_positions - 1
    if options.min_len > cap:
        raise ValueError(f"decode.min_len={options.min_len}: exceeds the longest output the model can position "
                         f"({cap} = model.max_target_positions - 1)")
    return min(options.max_len, cap)


def constrain_step(logp: torch.Tensor, step: int, max_len: int, options: DecodeOptions,
                   history: torch.Tensor | None = None) -> torch.Tensor:
    """In place on logp [R, V] for output index `step` (0-based): EOS banned before min_len and forced at
    max_len; with history [R, step] (the tokens so far), no n-gram of no_repeat_ngram_size occurs twice."""
    if step < options.min_len:
        logp[:, SPECIAL.eos] = NEG_INF
    if step >= max_len:
        eos = logp[:, SPECIAL.eos].clone()
        logp.fill_(NEG_INF)
        logp[:, SPECIAL.eos] = eos
    n = options.no_repeat_ngram_size
    if n and history is not None and history.shape[1] >= n:
        ban_repeated_ngrams(logp, history, n)
    return logp


def ban_repeated_ngrams(logp: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Ban every token that would complete an n-gram already present in the row's history [R, t]."""
    windows = history.unfold(1, n, 1)  # [R, t-n+1, n]: every n-gram so far
    prefix = history[:, history.shape[1] - n + 1:]  # the last n-1 tokens
    hit = (windows[:, :, :n - 1] == prefix[:, None, :]).all(-1)  # [R, t-n+1]
    counts = torch.zeros_like(logp)
    counts.scatter_add_(1, windows[:, :, n - 1], hit.to(logp.dtype))
    logp.masked_fill_(counts > 0, NEG_INF)


def expand_encoded(enc: Encoded, n: int) -> Encoded:
    """Repeat each example n times in place order (example b -> rows b*n .. b*n+n-1)."""
    if n == 1:
        return enc
    return Encoded(enc.states.repeat_interleave(n, dim=0), enc.pad_mask.repeat_interleave(n, dim=0))
