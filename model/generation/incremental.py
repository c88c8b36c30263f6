"""Decoding against a key/value cache that holds only the main stream.

A *block* is m new main-stream rows followed by n predicting slots. With c rows already cached, main row r
(position c + r) holds the token before y_{c+r}; the slots predict y_{c+m-1} .. y_{c+m-2+n} (positions
c+m .. c+m-1+n). Main rows see the cache and the new main rows up to themselves (causal); slot j sees the
cache, all new main rows and slots 0..j of the block. This is the bang_ar rule for m = n = 1 and the
semi_nar block view for n = k; plain AR is m = 1, n = 0. Only the main rows enter the cache.
"""
from __future__ import annotations

import torch

from model.config import SPECIAL
from model.layers import KVCache
from model.seq2seq import Encoded, Seq2SeqModel


def block_inputs(main_tokens: torch.Tensor, n_slots: int, n_cached: int):
    """ids, is_slot, positions [B, m+n] and the mask [B, m+n, n_cached+m+n] of one block."""
    B, m = main_tokens.shape
    n = m + n_slots
    dev = main_tokens.device
    ids = torch.cat([main_tokens, main_tokens.new_full((B, n_slots), SPECIAL.pad)], dim=1)
    is_slot = torch.zeros(B, n, dtype=torch.bool, device=dev)
    is_slot[:, m:] = True
    positions = torch.cat([torch.arange(n_cached, n_cached + m, device=dev),
                           torch.arange(n_cached + m, n_cached + m + n_slots, device=dev)])
    mask = torch.zeros(n, n_cached + n, dtype=torch.bool, device=dev)
    mask[:, :n_cached] = True
    mask[:m, n_cached:n_cached + m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
    mask[m:, n_cached:n_cached + m] = True
    mask[m:, n_cached + m:] = torch.ones(n_slots, n_slots, dtype=torch.bool, device=dev).tril()
    return ids, is_slot, positions.expand(B, n), mask.expand(B, n, n_cached + n)


def run_block(model: Seq2SeqModel, enc: Encoded, cache: KVCache, main_tokens: torch.Tensor,
              n_slots: int) -> torch.Tensor:
    """Hidden states [B, m+n, D] of one block (final norm applied); the m main rows are appended to the cache."""
    ids, is_slot, positions, mask = block_inputs(main_tokens, n_slots, cache.length)
    return model.decode_incremental(enc, cache, ids, is_slot, positions, mask, n_cache_rows=main_tokens.shape[1])


class ArStepper:
    """One AR step per call: feed the newest token, get the hidden state that predicts the next one, from the
    main stream ("ar") or from one uncached predicting slot ("bang_ar")."""

    def __init__(self, model: Seq2SeqModel, enc: Encoded, logits_source: str):
        self.model = model
        self.enc = enc
        self.n_slots = 1 if logits_source == "bang_ar" else 0
        self.cache = model.new_cache()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [R]: the token before the one predicted now (BOS first). Returns [R, D]."""
        hidden = run_block(self.model, self.enc, self.cache, tokens[:, None], self.n_slots)
        return hidden[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search). Beams of one example share their encoder rows, so only the cache
        moves; the encoder rows stay valid as long as index maps each example's beams to its own rows."""
        self.cache.reorder(index)
