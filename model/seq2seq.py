"""The encoder-decoder: one decoder serves every mode through streams (model/streams.py).

Reads like single-device code; tensor parallelism lives in the megatron-core layers (vocab-parallel embedding
tied to the output projection, column/row-parallel linears) and in model/parallel.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from model import parallel
from model.config import SPECIAL, ModelConfig
from model.attention import resolve_backend, stream_block_mask
from model.layers import DecoderLayer, EncoderLayer, KVCache, normal_init, tied_projection
from model.streams import DecoderStreams

# Decides, after decoder layer l (1-based), which rows exit there: (l, normed hidden [B, L, D]) -> bool [B, L].
ExitRule = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Encoded:
    states: torch.Tensor  # [B, S, D]
    pad_mask: torch.Tensor  # [B, S] bool, True at real tokens


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # [B, L, D], final norm applied; for exits, the state at each row's exit layer
    exit_layer: torch.Tensor | None = None  # [B, L] 1-based layer each row exited at (None: all at the last)
    layer_states: list[torch.Tensor] | None = None  # per layer, the states passed upward (tests, analysis)


class Seq2SeqModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        parallel.ensure_initialized()
        cfg.validate(parallel.tp_size())
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, d, init_method=normal_init(cfg.init_std),
                                                   config=parallel.megatron_config(), tp_group=parallel.tp_group())
        self.embed_source_positions = nn.Embedding(cfg.max_source_positions, d)
        # Position ids 0..max_target: the main stream uses 0..max-1, predicting slots 1..max.
        self.embed_target_positions = nn.Embedding(cfg.max_target_positions + 1, d)
        self.slot_embed = nn.Parameter(torch.empty(d))  # the learned mask vector of predicting/NAR slots
        self.encoder_embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.decoder_embed_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        pre = cfg.norm == "pre"
        self.encoder_final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if pre else nn.Identity()
        self.decoder_final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if pre else nn.Identity()
        self.length_head = nn.Linear(d, cfg.n_length_classes)
        self.dropout = nn.Dropout(cfg.dropout)
        for emb in (self.embed_source_positions, self.embed_target_positions, self.length_head):
            nn.init.normal_(emb.weight, std=cfg.init_std)
        nn.init.zeros_(self.length_head.bias)
        nn.init.normal_(self.slot_embed, std=cfg.init_std)

    def embed_input_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the encoder and decoder read them (x sqrt(d_model) with scale_embedding, as mBART
        does); the tied output projection uses the unscaled table."""
        tok = self.embed_tokens(ids)
        return tok * math.sqrt(self.cfg.d_model) if self.cfg.scale_embedding else tok

    # --- encoder -----------------------------------------------------------------------------------------

    def encode(self, src_tokens: torch.Tensor, tokens: torch.Tensor | None = None) -> Encoded:
        """tokens: the source's token embeddings [B, S, D] when the caller has looked them up (forward)."""
        B, S = src_tokens.shape
        if S > self.cfg.max_source_positions:
            raise ValueError(f"source length {S} exceeds model.max_source_positions={self.cfg.max_source_positions}")
        pad_mask = src_tokens != SPECIAL.pad
        pos = torch.arange(S, device=src_tokens.device)
        tok = self.embed_input_tokens(src_tokens) if tokens is None else tokens
        x = tok + self.embed_source_positions(pos)[None]
        x = self.dropout(self.encoder_embed_norm(x))
        mask = pad_mask[:, None, :].expand(B, S, S)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return Encoded(self.encoder_final_norm(x), pad_mask)

    # --- decoder -----------------------------------------------------------------------------------------

    def embed_decoder(self, ids: torch.Tensor, is_slot: torch.Tensor, positions: torch.Tensor,
                      tokens: torch.Tensor | None = None) -> torch.Tensor:
        # Position ids are not checked here (that would read device values on the host every forward): the data
        # side bounds them (pretrain.run / finetune.run validate lengths against max_target_positions, the
        # training step checks each host batch: pretrain.core.step.MicroBatch) and decoding caps its lengths.
        tok = self.embed_input_tokens(ids) if tokens is None else tokens
        tok = torch.where(is_slot[..., None], self.slot_embed.to(tok.dtype), tok)
        x = tok + self.embed_target_positions(positions)
        return self.dropout(self.decoder_embed_norm(x))

    def decode(self, enc: Encoded, streams: DecoderStreams, exit_layers: torch.Tensor | None = None,
               exit_rule: ExitRule | None = None, keep_layer_states: bool = False,
               stop_when_all_exited: bool = True, depth: int | None = None,
               tokens: torch.Tensor | None = None) -> DecoderOutput:
        """Run the decoder over all streams.

        exit_layers [B, K*T] (ELMER LPLM): row t exits at layer exit_layers[t] (1-based); its state there is the
        output, and a detached copy is what later layers see, so the copies carry no gradient. exit_rule decides
        exits on the fly instead (entropy early exit). Computation stops once every row has exited, which reads
        one flag per layer on the host, unless stop_when_all_exited=False (training): then every layer runs, with
        no host read, and every data-parallel rank runs the same layers (ZeRO-3 gathers parameters layer by
        layer). depth: run only that many layers (a count the host knows; rows still in at layer `depth` exit
        there), e.g. ELMER's evaluation at a fixed exit layer, without reading anything back. tokens: the token
        embeddings of streams.ids when the caller has looked them up (forward).
        """
        x = self.embed_decoder(streams.ids, streams.is_slot, streams.positions, tokens)
        cross_mask = enc.pad_mask[:, None, :].expand(x.shape[0], x.shape[1], -1)
        self_mask = self.self_attention_mask(streams, x.device)
        if exit_layers is not None:
            exit_rule = lambda layer, _h: exit_layers == layer  # noqa: E731
        n_layers = len(self.decoder_layers) if depth is None else depth
        states = [] if keep_layer_states else None
        if exit_rule is None:
            for layer in self.decoder_layers:
                x, _ = layer(x, self_mask, enc.states, cross_mask)
                if keep_layer_states:
                    states.append(x)
            return DecoderOutput(self.decoder_final_norm(x), None, states)

        out = torch.zeros_like(x)
        frozen = torch.zeros_like(x)
        exited = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        exit_at = torch.full(x.shape[:2], n_layers, dtype=torch.long, device=x.device)
        for number, layer in enumerate(self.decoder_layers[:n_layers], start=1):
            x, _ = layer(x, self_mask, enc.states, cross_mask)
            normed = self.decoder_final_norm(x)
            now = ~exited & (exit_rule(number, normed) if number < n_layers else torch.ones_like(exited))
            out = torch.where(now[..., None], normed, out)
            frozen = torch.where(now[..., None], x.detach(), frozen)
            exit_at = torch.where(now, number, exit_at)
            exited = exited | now
            x = torch.where(exited[..., None], frozen, x)
            if keep_layer_states:
                states.append(x)
            if stop_when_all_exited and bool(exited.all()):
                break
        return DecoderOutput(out, exit_at, states)

    def self_attention_mask(self, streams: DecoderStreams, device: torch.device):
        """The dense rule for SDPA, or the same rule block-sparse for FlexAttention (skips fully masked tiles):
        only the form the layers' kernel uses is built (model/attention.py resolve_backend, as the layers ask)."""
        dropout = self.cfg.attention_dropout if self.training else 0.0
        if resolve_backend(self.cfg.attention_backend, device, dropout) != "flex":
            return streams.attn_mask
        return stream_block_mask(streams.mode, streams.length, n_predict=streams.n_predict,
                                 block_size=streams.block_size, tgt_mask=streams.tgt_mask, masked=streams.masked,
                                 device=device)

    def decode_incremental(self, enc: Encoded, cache: KVCache, ids: torch.Tensor, is_slot: torch.Tensor,
                           positions: torch.Tensor, mask: torch.Tensor, n_cache_rows: int) -> torch.Tensor:
        """Run new decoder rows [B, n] against the cache. mask [B, n, cache.length + n]. The first n_cache_rows
        new rows are main-stream rows: their keys/values are appended to the cache (slots never are)."""
        x = self.embed_decoder(ids, is_slot, positions)
        cross_mask = enc.pad_mask[:, None, :].expand(x.shape[0], x.shape[1], -1)
        keep = cache.length + n_cache_rows  # past + the new main-stream rows; the slots follow them
        for i, layer in enumerate(self.decoder_layers):
            if cache.cross_kv[i] is None:
                cache.cross_kv[i] = layer.cross_attn.block.project_kv(enc.states)
            past = None if cache.self_k[i] is None else (cache.self_k[i], cache.self_v[i])
            x, (k, v) = layer(x, mask, enc.states, cross_mask, cross_kv=cache.cross_kv[i], past=past)
            if n_cache_rows:
                cache.self_k[i], cache.self_v[i] = k[:, :, :keep], v[:, :, :keep]
        return self.decoder_final_norm(x)

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.decoder_layers))

    # --- heads -------------------------------------------------------------------------------------------

    def logits_local(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits, through the tied embedding."""
        if parallel.tp_size() > 1:
            hidden = copy_to_tensor_model_parallel_region(hidden)
        return tied_projection(hidden, self.embed_tokens.weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V], gathered across tensor-parallel ranks."""
        return parallel.gather_from_tp(self.logits_local(hidden))

    def token_loss(self, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-token cross entropy [...] (pads are not masked here), label-smoothed like
        torch.nn.functional.cross_entropy: (1 - eps) * NLL + eps * mean over the vocabulary of -log p_v.

        The NLL is megatron's vocab-parallel cross entropy without smoothing; megatron's own smoothing averages
        over each rank's vocabulary shard (and spreads eps over the K-1 non-targets), so the loss would change
        with the TP size. With -log p_v = lse - logit_v and NLL = lse - logit_target, the smoothed loss is
        NLL - eps * (mean_v logit_v - logit_target): two sums over the FULL vocabulary (all TP ranks), and no
        second [.., V] tensor kept for backward. The full vocabulary is the model's, padded ids (beyond the
        tokenizer's pieces) included: they are ordinary rows of the tied embedding, the model does not know the
        tokenizer's size, and each gets eps / V (data_pipeline pads to a multiple of 128: a small share of eps).
        """
        logits = self.logits_local(hidden).float()
        if label_smoothing == 0.0:
            return vocab_parallel_cross_entropy(logits, targets)
        # Both sums come before the NLL: megatron's cross entropy overwrites a float32 input in place (with the
        # softmax), and neither sum nor indexing keeps `logits` for its backward.
        mean_logit = parallel.sum_over_tp(logits.sum(dim=-1)) / (logits.shape[-1] * parallel.tp_size())
        target_logit = parallel.pick_over_tp(logits, targets)
        nll = vocab_parallel_cross_entropy(logits, targets)
        return nll - label_smoothing * (mean_logit - target_logit)

    def length_logits(self, enc: Encoded) -> torch.Tensor:
        """Target-length classes from mean-pooled encoder states (JANUS / CMLM length prediction)."""
        m = enc.pad_mask[..., None].to(enc.states.dtype)
        pooled = (enc.states * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.length_head(pooled)

    def forward(self, src_tokens: torch.Tensor, streams: DecoderStreams, **kwargs) -> DecoderOutput:
        """encode, then decode (kwargs as decode's). The source and decoder ids are embedded in one lookup: the
        gradient of the tied table (the step's largest tensor with the LM head's) then costs one [V, D] zero-fill,
        scatter and sum into the head's gradient, not two."""
        S = src_tokens.shape[1]
        tokens = self.embed_input_tokens(torch.cat([src_tokens, streams.ids], dim=1))
        return self.decode(self.encode(src_tokens, tokens[:, :S]), streams, tokens=tokens[:, S:], **kwargs)
