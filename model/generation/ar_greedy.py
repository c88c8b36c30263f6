"""AR greedy decoding with the main-stream key/value cache."""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.generation.common import constrain_step, decoding_mode, log_probs, max_output_len
from model.generation.incremental import ArStepper
from model.generation.options import DecodeOptions, DecodeResult
from model.generation.postprocess import cut_at_eos
from model.seq2seq import Seq2SeqModel


@decoding_mode
def ar_greedy(model: Seq2SeqModel, src_tokens: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    B = src_tokens.shape[0]
    max_len = max_output_len(model, options)
    stepper = ArStepper(model, model.encode(src_tokens), options.ar_logits)
    prev = src_tokens.new_full((B,), SPECIAL.bos)
    out = src_tokens.new_zeros((B, 0))
    finished = torch.zeros(B, dtype=torch.bool, device=src_tokens.device)
    passes = 0
    for step in range(max_len + 1):
        logp = constrain_step(log_probs(model, stepper.step(prev)), step, max_len, options, history=out)
        passes += 1
        token = logp.argmax(-1).masked_fill(finished, SPECIAL.pad)  # finished rows run on, ignored
        out = torch.cat([out, token[:, None]], dim=1)
        finished |= token == SPECIAL.eos
        prev = token
        if bool(finished.all()):
            break
    return DecodeResult([cut_at_eos(row) for row in out.tolist()], {"decoder_passes": passes})
