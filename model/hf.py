"""Hugging Face export and import of Seq2SeqModel: BartForConditionalGeneration for norm="post",
MBartForConditionalGeneration for norm="pre". The state-dict and config mapping is model/hf_state.py.

    hf_model = to_hf(model)                  # under TP a collective: call it on every TP rank
    aside = aside_weights(model)             # slot_embed, length_head, target position row M: no HF counterpart
    model = from_hf(hf_model, aside=aside)   # aside=None: those stay freshly initialised
    save_hf(model, directory); model = load_hf(directory)   # HF files plus tandem_aside.pt
    hf_model = hf_model_from_state(full_state_dict, cfg)    # from exported weights, without building our model
    save_hf_state(full_state_dict, cfg, directory)          # the same, written as save_hf does
    generation_config(options, cfg)          # HF generate settings that decode as our AR modes do

Every function takes `vocab_order` (our id -> the checkpoint's id; a Hugging Face tokenizer's permutation,
data_pipeline/hf_tokenizer.py) for a checkpoint whose special ids differ from ours, e.g. BART's.

In plain AR mode ("ar" streams, prev_tokens = decoder_input_ids, source pads = attention_mask 0) the HF model's
logits equal ours (tests/test_hf_interop.py), and `generate` with generation_config() gives ar_beam's / ar_greedy's
tokens (tests/test_hf_export.py), except where a hypothesis reaches the maximum length: there HF forces EOS with
log-probability 0 (ForcedEOSTokenLogitsProcessor), we with its own log-probability (fairseq), so such finished
hypotheses can rank differently. A model decoded through BANG's predicting stream ("bang_ar") has no HF
counterpart: HF reproduces its main stream only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from transformers import (AutoModelForSeq2SeqLM, BartForConditionalGeneration, GenerationConfig,
                          MBartForConditionalGeneration, PreTrainedModel)

from model.config import ModelConfig
from model.generation.common import NEVER_OUTPUT
from model.generation.options import DecodeOptions
from model.hf_state import (ASIDE_KEYS, LAST_TARGET_POSITION, checkpoint_special_ids, config_from_hf,
                            from_hf_state_dict, hf_config, to_hf_state_dict)
from model.seq2seq import Seq2SeqModel
from model.sharding import full_state_dict, load_full_state_dict

ASIDE_FILE = "tandem_aside.pt"
HF_AR_MODES = ("ar_beam", "ar_greedy")  # the decoding modes HF `generate` reproduces

__all__ = ["ASIDE_KEYS", "HF_AR_MODES", "aside_weights", "config_from_hf", "from_hf", "from_hf_state_dict",
           "generation_config", "hf_config", "hf_model_from_state", "load_hf", "load_hf_into", "read_hf", "save_hf",
           "save_hf_state", "to_hf", "to_hf_state_dict"]


def hf_model_from_state(full: dict[str, torch.Tensor], cfg: ModelConfig, vocab_order: Sequence[int] | None = None,
                        attn_implementation: str = "sdpa") -> PreTrainedModel:
    """An HF model (eval mode) holding a full (TP=1) state dict of ours, in its dtype."""
    return _hf_model(to_hf_state_dict(_tensors(full), cfg, vocab_order)[0], cfg, vocab_order, attn_implementation)


def save_hf_state(full: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path,
                  vocab_order: Sequence[int] | None = None, config_notes: dict | None = None) -> PreTrainedModel:
    """HF files (save_pretrained; `config_notes` added to config.json as `tandem_export`) and the aside weights
    (tandem_aside.pt) of a full (TP=1) state dict of ours; returns the HF model."""
    hf_sd, aside = to_hf_state_dict(_tensors(full), cfg, vocab_order)
    hf_model = _hf_model(hf_sd, cfg, vocab_order)
    if config_notes:
        hf_model.config.tandem_export = config_notes
    directory = Path(directory)
    hf_model.save_pretrained(directory)
    torch.save(aside, directory / ASIDE_FILE)
    return hf_model


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _hf_model(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, vocab_order: Sequence[int] | None,
              attn_implementation: str = "sdpa") -> PreTrainedModel:
    model_class = BartForConditionalGeneration if cfg.norm == "post" else MBartForConditionalGeneration
    hf_model = model_class._from_config(hf_config(cfg, vocab_order), attn_implementation=attn_implementation)
    hf_model.load_state_dict(hf_sd, strict=True)
    hf_model.generation_config.forced_eos_token_id = checkpoint_special_ids(vocab_order)["eos"]  # as BART does
    return hf_model.to(hf_sd["model.shared.weight"].dtype).eval()


def to_hf(model: Seq2SeqModel, attn_implementation: str = "sdpa",
          vocab_order: Sequence[int] | None = None) -> PreTrainedModel:
    """An HF model with our weights (gathered from all TP ranks first), in our dtype and train/eval mode."""
    hf_model = hf_model_from_state(full_state_dict(model), model.cfg, vocab_order, attn_implementation)
    return hf_model.train(model.training)


def aside_weights(model: Seq2SeqModel) -> dict[str, torch.Tensor]:
    """Our weights without an HF counterpart (all replicated under TP, so no collective)."""
    return {"slot_embed": model.slot_embed.detach().clone(),
            "length_head.weight": model.length_head.weight.detach().clone(),
            "length_head.bias": model.length_head.bias.detach().clone(),
            LAST_TARGET_POSITION: model.embed_target_positions.weight[model.cfg.max_target_positions].detach().clone()}


def from_hf(hf_model: PreTrainedModel, aside: dict[str, torch.Tensor] | None = None,
            vocab_order: Sequence[int] | None = None, **overrides) -> Seq2SeqModel:
    """Our model (at the current TP size) from an HF BART/mBART. `aside` gives back what an export kept aside;
    without it slot_embed, length_head and the target position row M keep the new model's fresh init.
    `overrides` set config fields (e.g. dropout=0.0)."""
    model = Seq2SeqModel(config_from_hf(hf_model.config, vocab_order, **overrides))
    load_hf_into(model, hf_model, aside, vocab_order)
    return model.train(hf_model.training)


def load_hf_into(model: Seq2SeqModel, hf_model: PreTrainedModel, aside: dict[str, torch.Tensor] | None = None,
                 vocab_order: Sequence[int] | None = None) -> None:
    """Copy an HF BART/mBART's weights into our model of the same shape (this rank's TP slice); without `aside`
    the weights HF has no place for keep the model's own."""
    cfg = model.cfg
    full = from_hf_state_dict(hf_model.state_dict(), cfg, aside if aside is not None else aside_weights(model),
                              vocab_order)
    current = model.state_dict()
    tensors = {name for name, value in current.items() if isinstance(value, torch.Tensor)}
    if set(full) != tensors:
        raise KeyError(f"HF import does not cover the model: missing {sorted(tensors - set(full))}, "
                       f"unexpected {sorted(set(full) - tensors)}")
    extra_states = {name: value for name, value in current.items() if name not in tensors}  # megatron's, None
    load_full_state_dict(model, {**full, **extra_states}, strict=True)


def save_hf(model: Seq2SeqModel, directory: str | Path, vocab_order: Sequence[int] | None = None) -> Path:
    """HF files (save_pretrained) plus the aside weights in tandem_aside.pt. A collective under TP; rank 0 writes."""
    full = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_hf_state(full, model.cfg, directory, vocab_order)
    return Path(directory)


def load_hf(directory: str | Path, vocab_order: Sequence[int] | None = None, **overrides) -> Seq2SeqModel:
    """Our model from a directory of HF files; tandem_aside.pt is used when present (local files only)."""
    hf_model, aside = read_hf(directory)
    return from_hf(hf_model, aside=aside, vocab_order=vocab_order, **overrides)


def read_hf(directory: str | Path) -> tuple[PreTrainedModel, dict[str, torch.Tensor] | None]:
    """(the HF model of a directory, its tandem_aside.pt weights or None); local files only."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'}: not a Hugging Face model directory")
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(directory, local_files_only=True)
    aside_file = directory / ASIDE_FILE
    aside = torch.load(aside_file, map_location="cpu", weights_only=True) if aside_file.is_file() else None
    return hf_model, aside


def generation_config(options: DecodeOptions, cfg: ModelConfig, mode: str = "ar_beam",
                      vocab_order: Sequence[int] | None = None) -> GenerationConfig:
    """HF `generate` settings that decode as our `mode` (ar_beam, else greedy) with these options: beam size,
    length penalty (score / len**lenpen, len counting EOS, as ours), min and max output length (EOS banned before
    min_len tokens and forced after max_len, capped by the target positions as ours), no-repeat n-gram, the tokens we
    never output (pad, bos, mask) suppressed, early stopping once beam_size hypotheses finished (fairseq's rule)."""
    ids = checkpoint_special_ids(vocab_order)
    max_len = min(options.max_len, cfg.max_target_positions - 1)  # as model.generation.common.max_output_len
    never = [int(i if vocab_order is None else vocab_order[i]) for i in NEVER_OUTPUT]
    beams = options.beam_size if mode == "ar_beam" else 1
    return GenerationConfig(
        num_beams=beams, do_sample=False, length_penalty=float(options.length_penalty), early_stopping=True,
        min_new_tokens=options.min_len, max_new_tokens=max_len + 1, no_repeat_ngram_size=options.no_repeat_ngram_size,
        suppress_tokens=never, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        decoder_start_token_id=ids["bos"], forced_eos_token_id=ids["eos"])
