"""The pure mapping between our state dict / config and Hugging Face BART (norm="post") or mBART (norm="pre").

No model is built here (model/hf.py does that); everything works on full (TP=1) state dicts. What differs:
- Self-attention: our fused QKV rows are laid out per head, [head][q|k|v][head_dim] (so megatron's contiguous
  TP split hands every rank whole heads); HF has separate q_proj/k_proj/v_proj. Cross-attention: our q plus a
  fused kv laid out [head][k|v][head_dim].
- Positions: HF's learned tables carry 2 unused leading rows (BartLearnedPositionalEmbedding adds 2 to every
  id) and one max_position_embeddings P for encoder and decoder. Our source table has S rows (ids 0..S-1); our
  target table has M+1 rows: the main stream uses ids 0..T-1, exactly HF's decoder positions, and row M is
  reached only by a predicting slot for the M-th target token. So P = max(S, M); rows HF has and we lack are zero.
- HF ties model.shared, both embed_tokens and lm_head; final_logits_bias is zero (we have none).
- No HF counterpart (kept aside on export, fresh or given back on import): slot_embed, length_head and row M of
  the target position table. Config fields HF has no place for travel in the HF config as `tandem`.
- Special ids: ours are fixed (model.config.SPECIAL: pad 0, bos 2, eos 3, ...); a checkpoint's come from its config
  (BART: pad 1, bos 0, eos 2). `vocab_order[our id]` = the checkpoint's id (the permutation its tokenizer defines,
  data_pipeline/hf_tokenizer.py) maps one onto the other: embedding rows are permuted with it on import and back
  on export, and the HF config's pad/bos/eos ids are checked against it (import) or written from it (export).
  None means the identity (our own exports). The decoder starts from our bos (decoder_start_token_id = its id).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from transformers import BartConfig, MBartConfig, PretrainedConfig

from model.config import SPECIAL, ModelConfig

HF_OFFSET = 2  # BartLearnedPositionalEmbedding / MBartLearnedPositionalEmbedding: id p lives in row p + 2
HF_LAYER_NORM_EPS = 1e-5  # HF BART/mBART build nn.LayerNorm(d_model) with torch's default eps
LAST_TARGET_POSITION = "embed_target_positions.last_row"
ASIDE_KEYS = ("slot_embed", "length_head.weight", "length_head.bias", LAST_TARGET_POSITION)
_TANDEM_FIELDS = ("max_source_positions", "max_target_positions", "n_predict", "n_length_classes")
_CONFIG_SPECIALS = ("pad", "bos", "eos")  # the special ids an HF BART/mBART config names

# Our name -> HF name for weights copied one to one (".weight"/".bias" appended), per layer.
_ENCODER_LAYER = {
    "self_attn.block.out": "self_attn.out_proj",
    "self_attn.norm": "self_attn_layer_norm",
    "ffn.block.fc_in": "fc1",
    "ffn.block.fc_out": "fc2",
    "ffn.norm": "final_layer_norm",
}
_DECODER_LAYER = {
    **_ENCODER_LAYER,
    "cross_attn.block.q": "encoder_attn.q_proj",
    "cross_attn.block.out": "encoder_attn.out_proj",
    "cross_attn.norm": "encoder_attn_layer_norm",
}
_TOP = {"encoder_embed_norm": "model.encoder.layernorm_embedding",
        "decoder_embed_norm": "model.decoder.layernorm_embedding"}
_TOP_PRE = {"encoder_final_norm": "model.encoder.layer_norm", "decoder_final_norm": "model.decoder.layer_norm"}


# --- special ids -----------------------------------------------------------------------------------------

def checkpoint_special_ids(vocab_order: Sequence[int] | None) -> dict[str, int]:
    """The checkpoint's ids of our pad, bos and eos under vocab_order (ours when None)."""
    ours = {name: getattr(SPECIAL, name) for name in _CONFIG_SPECIALS}
    return ours if vocab_order is None else {name: int(vocab_order[i]) for name, i in ours.items()}


def _check_order(vocab_order: Sequence[int] | None, vocab_size: int) -> None:
    if vocab_order is not None and sorted(vocab_order) != list(range(vocab_size)):
        raise ValueError(f"vocab_order must be a permutation of the {vocab_size} vocabulary ids "
                         f"(got {len(vocab_order)} entries)")


def _permute_rows(emb: torch.Tensor, vocab_order: Sequence[int] | None, to_hf: bool) -> torch.Tensor:
    """Our embedding rows -> the checkpoint's order (to_hf) or back: ours[k] = theirs[vocab_order[k]]."""
    if vocab_order is None:
        return emb.clone()
    index = torch.as_tensor(vocab_order, dtype=torch.long)
    if not to_hf:
        return emb[index].clone()
    out = torch.empty_like(emb)
    out[index] = emb
    return out


# --- configs ---------------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, vocab_order: Sequence[int] | None = None) -> BartConfig | MBartConfig:
    """BartConfig for norm="post", MBartConfig for norm="pre", of the same shape, with the checkpoint's special ids
    under vocab_order."""
    cfg.validate()
    _check_order(vocab_order, cfg.vocab_size)
    ids = checkpoint_special_ids(vocab_order)
    if cfg.layer_norm_eps != HF_LAYER_NORM_EPS:
        raise ValueError(f"model.layer_norm_eps={cfg.layer_norm_eps!r}: Hugging Face BART/mBART use "
                         f"{HF_LAYER_NORM_EPS}; this model cannot be exported")
    config_class = BartConfig if cfg.norm == "post" else MBartConfig
    return config_class(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ffn, decoder_ffn_dim=cfg.d_ffn,
        max_position_embeddings=max(cfg.max_source_positions, cfg.max_target_positions),
        dropout=cfg.dropout, attention_dropout=cfg.attention_dropout, activation_dropout=0.0,
        activation_function=cfg.activation, init_std=cfg.init_std,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=cfg.scale_embedding, tie_word_embeddings=True,
        pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        decoder_start_token_id=ids["bos"], forced_eos_token_id=None,  # BART's default (2) need not be our eos
        tandem={field: getattr(cfg, field) for field in _TANDEM_FIELDS},
    )


def config_from_hf(hf_cfg: PretrainedConfig, vocab_order: Sequence[int] | None = None, **overrides) -> ModelConfig:
    """Our config for an HF BART (post-LN) or mBART (pre-LN) config. A config we exported carries our position
    sizes, n_predict and n_length_classes in `tandem`; otherwise S = M = max_position_embeddings. The config's
    pad/bos/eos ids must be where vocab_order (its tokenizer's permutation; None: ours) puts them."""
    def bad(field: str, why: str):
        raise ValueError(f"Hugging Face config {field}={getattr(hf_cfg, field, None)!r}: {why}")

    if isinstance(hf_cfg, MBartConfig):
        norm = "pre"
    elif isinstance(hf_cfg, BartConfig):
        norm = "post"
    else:
        raise ValueError(f"Hugging Face config {type(hf_cfg).__name__}: only BartConfig (post-LN) and "
                         f"MBartConfig (pre-LN) can be imported")
    if hf_cfg.encoder_attention_heads != hf_cfg.decoder_attention_heads:
        bad("decoder_attention_heads", f"must equal encoder_attention_heads={hf_cfg.encoder_attention_heads}")
    if hf_cfg.encoder_ffn_dim != hf_cfg.decoder_ffn_dim:
        bad("decoder_ffn_dim", f"must equal encoder_ffn_dim={hf_cfg.encoder_ffn_dim}")
    if hf_cfg.activation_function not in ("gelu", "relu"):
        bad("activation_function", "only gelu and relu are supported")
    _check_order(vocab_order, hf_cfg.vocab_size)
    for name, expected in checkpoint_special_ids(vocab_order).items():
        if getattr(hf_cfg, f"{name}_token_id") != expected:
            why = (f"differs from our {name} id {expected}: import the checkpoint with its tokenizer "
                   f"(tokenizer.type=hf), which maps its ids onto ours" if vocab_order is None else
                   f"its tokenizer puts our {name} at id {expected}: tokenizer and checkpoint config disagree")
            bad(f"{name}_token_id", why)
    if not getattr(hf_cfg, "tie_word_embeddings", True):
        bad("tie_word_embeddings", "our output projection is tied to the embedding")
    if hf_cfg.activation_dropout:
        warnings.warn(f"Hugging Face activation_dropout={hf_cfg.activation_dropout} is dropped on import "
                      "(our FFN has no activation dropout); logits in eval mode are unaffected")
    P = hf_cfg.max_position_embeddings
    fields = dict(
        vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.d_model, n_heads=hf_cfg.encoder_attention_heads,
        d_ffn=hf_cfg.encoder_ffn_dim, n_encoder_layers=hf_cfg.encoder_layers,
        n_decoder_layers=hf_cfg.decoder_layers, max_source_positions=P, max_target_positions=P,
        dropout=hf_cfg.dropout, attention_dropout=hf_cfg.attention_dropout,
        activation=hf_cfg.activation_function, norm=norm, init_std=hf_cfg.init_std,
        layer_norm_eps=HF_LAYER_NORM_EPS, scale_embedding=bool(hf_cfg.scale_embedding),
    )
    fields.update(getattr(hf_cfg, "tandem", None) or {})
    fields.update(overrides)
    cfg = ModelConfig(**fields).validate()
    if max(cfg.max_source_positions, cfg.max_target_positions) > P:
        raise ValueError(f"model.max_source_positions/max_target_positions exceed the Hugging Face "
                         f"max_position_embeddings={P}")
    return cfg


# --- attention weights -----------------------------------------------------------------------------------

def _split_heads(fused: torch.Tensor, n_heads: int, parts: int) -> list[torch.Tensor]:
    """[head][part][head_dim](, d_in) rows -> one [d, (d_in)] tensor per part."""
    x = fused.reshape(n_heads, parts, -1, *fused.shape[1:])
    return [x[:, p].reshape(-1, *fused.shape[1:]).clone() for p in range(parts)]


def _fuse_heads(tensors: list[torch.Tensor], n_heads: int) -> torch.Tensor:
    """Inverse of _split_heads."""
    x = torch.stack([t.reshape(n_heads, -1, *t.shape[1:]) for t in tensors], dim=1)
    return x.reshape(-1, *tensors[0].shape[1:]).clone()


# --- state dicts -----------------------------------------------------------------------------------------

def _one_to_one(cfg: ModelConfig) -> dict[str, str]:
    """Our module name -> HF module name, for weights and biases copied as they are."""
    names = dict(_TOP, **(_TOP_PRE if cfg.norm == "pre" else {}))
    for side, n_layers, table in (("encoder", cfg.n_encoder_layers, _ENCODER_LAYER),
                                  ("decoder", cfg.n_decoder_layers, _DECODER_LAYER)):
        for i in range(n_layers):
            names.update({f"{side}_layers.{i}.{ours}": f"model.{side}.layers.{i}.{theirs}"
                          for ours, theirs in table.items()})
    return names


def _fused(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(our fused module, HF attention module, the projections it holds in order) of every attention block."""
    out = []
    for side, n_layers in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        for i in range(n_layers):
            out.append((f"{side}_layers.{i}.self_attn.block.qkv", f"model.{side}.layers.{i}.self_attn", "qkv"))
            if side == "decoder":
                out.append((f"{side}_layers.{i}.cross_attn.block.kv", f"model.{side}.layers.{i}.encoder_attn", "kv"))
    return out


def _positions_to_hf(rows: torch.Tensor, P: int) -> torch.Tensor:
    table = rows.new_zeros(P + HF_OFFSET, rows.shape[1])
    table[HF_OFFSET:HF_OFFSET + rows.shape[0]] = rows
    return table


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, vocab_order: Sequence[int] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our full state dict -> (HF state dict, the weights without HF counterpart, keyed by ASIDE_KEYS); the
    vocabulary rows in the checkpoint's order under vocab_order."""
    _check_order(vocab_order, cfg.vocab_size)
    P, M = max(cfg.max_source_positions, cfg.max_target_positions), cfg.max_target_positions
    emb = _permute_rows(sd["embed_tokens.weight"], vocab_order, to_hf=True)
    hf = {key: emb for key in ("model.shared.weight", "model.encoder.embed_tokens.weight",
                               "model.decoder.embed_tokens.weight", "lm_head.weight")}
    hf["final_logits_bias"] = emb.new_zeros(1, cfg.vocab_size)
    hf["model.encoder.embed_positions.weight"] = _positions_to_hf(sd["embed_source_positions.weight"], P)
    hf["model.decoder.embed_positions.weight"] = _positions_to_hf(sd["embed_target_positions.weight"][:M], P)
    for ours, theirs in _one_to_one(cfg).items():
        for wb in ("weight", "bias"):
            hf[f"{theirs}.{wb}"] = sd[f"{ours}.{wb}"].clone()
    for ours, theirs, projections in _fused(cfg):
        for wb in ("weight", "bias"):
            parts = _split_heads(sd[f"{ours}.{wb}"], cfg.n_heads, len(projections))
            hf.update({f"{theirs}.{p}_proj.{wb}": part for p, part in zip(projections, parts)})
    aside = {key: sd[key].clone() for key in ASIDE_KEYS if key != LAST_TARGET_POSITION}
    aside[LAST_TARGET_POSITION] = sd["embed_target_positions.weight"][M].clone()
    return hf, aside


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, aside: dict[str, torch.Tensor],
                       vocab_order: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """HF state dict + the weights without HF counterpart (given back from an export, or a fresh model's)
    -> our full state dict of tensors (megatron's `_extra_state` entries are not included); the vocabulary rows
    taken in our order under vocab_order."""
    _check_order(vocab_order, cfg.vocab_size)
    missing = [key for key in ASIDE_KEYS if key not in aside]
    if missing:
        raise KeyError(f"aside weights lack {missing}")
    S, M = cfg.max_source_positions, cfg.max_target_positions
    emb = hf["model.shared.weight"]
    if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], emb):
        raise ValueError("Hugging Face lm_head.weight differs from model.shared.weight: our projection is tied")
    bias = hf.get("final_logits_bias")
    if bias is not None and bool(bias.ne(0).any()):
        raise ValueError("Hugging Face final_logits_bias is not zero: our model has no output bias")
    source_rows = hf["model.encoder.embed_positions.weight"][HF_OFFSET:HF_OFFSET + S]
    target_rows = hf["model.decoder.embed_positions.weight"][HF_OFFSET:HF_OFFSET + M]
    sd = {"embed_tokens.weight": _permute_rows(emb, vocab_order, to_hf=False),
          "embed_source_positions.weight": source_rows.clone(),
          "embed_target_positions.weight": torch.cat([target_rows, aside[LAST_TARGET_POSITION][None].to(emb.dtype)])}
    sd.update({key: aside[key].clone() for key in ASIDE_KEYS if key != LAST_TARGET_POSITION})
    for ours, theirs in _one_to_one(cfg).items():
        for wb in ("weight", "bias"):
            sd[f"{ours}.{wb}"] = hf[f"{theirs}.{wb}"].clone()
    for ours, theirs, projections in _fused(cfg):
        for wb in ("weight", "bias"):
            sd[f"{ours}.{wb}"] = _fuse_heads([hf[f"{theirs}.{p}_proj.{wb}"] for p in projections], cfg.n_heads)
    return sd
