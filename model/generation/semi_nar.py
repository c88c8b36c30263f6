"""Semi-NAR block-parallel decoding (the semi_nar view of model/streams.py): each pass feeds the main-stream
rows of the previous block (BOS first) and k predicting slots, which see the prefix up to the block start and
the earlier slots of their block. k=1 is bang_ar greedy; k > max_len is one pass after BOS. The prefix sits in
the main-stream cache, so each pass computes only 2k new rows."""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.generation.common import constrain_step, decoding_mode, log_probs, max_output_len
from model.generation.incremental import run_block
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.postprocess import collapse_repeats, cut_at_eos
from model.seq2seq import Seq2SeqModel


@decoding_mode
def semi_nar(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    B = src_tokens.shape[0]
    max_len = max_output_len(model, options)
    total = max_len + 1  # output indices 0..max_len, EOS forced at max_len
    enc = model.encode(src_tokens)
    cache = model.new_cache()
    main = src_tokens.new_full((B, 1), SPECIAL.bos)
    out = src_tokens.new_zeros((B, 0))
    passes = 0
    while out.shape[1] < total:
        start, n = out.shape[1], min(options.block_size, total - out.shape[1])
        logp = log_probs(model, run_block(model, enc, cache, main, n)[:, -n:])  # [B, n, V]
        for j in range(n):
            constrain_step(logp[:, j], start + j, max_len, options)
        block = logp.argmax(-1)
        passes += 1
        out = torch.cat([out, block], dim=1)
        if bool((out == SPECIAL.eos).any(1).all()):
            break
        main = block
    rows = [cut_at_eos(row) for row in out.tolist()]
    if options.postprocess:
        rows = [collapse_repeats(row) for row in rows]
    return DecodeResult(rows, {"decoder_passes": passes})
