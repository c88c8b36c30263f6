"""Model config: presets as documented (methods.md §7.1) and validation errors that name the field at fault."""
import dataclasses
import warnings

import pytest
import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding

from model.config import MODES, SPECIAL, ModelConfig, check_mode
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams, stream_names


def test_base_preset_is_bang_bart_base_shape():
    cfg = ModelConfig.preset("base")
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == (6, 6)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ffn, cfg.head_dim) == (768, 12, 3072, 64)
    assert cfg.activation == "gelu" and cfg.norm == "post"
    assert cfg.vocab_size % 128 == 0
    cfg.validate(tp_size=2)
    cfg.validate(tp_size=4)


def test_tiny_preset_and_overrides():
    cfg = ModelConfig.preset("tiny")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ffn) == (1024, 64, 4, 128)
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == (2, 2)
    assert cfg.dropout == 0.0 and cfg.attention_dropout == 0.0 and cfg.activation == "gelu"
    over = ModelConfig.preset("tiny", vocab_size=4096, norm="pre")
    assert over.vocab_size == 4096 and over.norm == "pre" and over.d_model == 64
    assert ModelConfig.preset("tiny").vocab_size == 1024  # overrides do not leak into the preset


def test_special_ids_are_fixed():
    assert (SPECIAL.pad, SPECIAL.unk, SPECIAL.bos, SPECIAL.eos, SPECIAL.mask, SPECIAL.sep) == (0, 1, 2, 3, 4, 5)


def test_tiny_model_has_learned_positions_and_a_tied_output_projection():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=384, d_model=32, n_heads=4, d_ffn=64)
    model = Seq2SeqModel(cfg)
    assert len(model.encoder_layers) == 2 and len(model.decoder_layers) == 2
    assert isinstance(model.embed_tokens, VocabParallelEmbedding)
    assert model.embed_tokens.weight.shape == (384, 32)
    assert isinstance(model.embed_source_positions, torch.nn.Embedding)
    assert model.embed_target_positions.weight.requires_grad
    # No separate output matrix: the only [V, D] parameter is the shared embedding.
    vocab_shaped = [n for n, p in model.named_parameters() if p.shape == (384, 32)]
    assert vocab_shaped == ["embed_tokens.weight"]
    h = torch.randn(2, 3, 32)
    torch.testing.assert_close(model.logits(h), h @ model.embed_tokens.weight.T, rtol=0, atol=1e-6)
    # Post-LN: no final norms; pre-LN adds them.
    assert isinstance(model.decoder_final_norm, torch.nn.Identity)
    pre = Seq2SeqModel(dataclasses.replace(cfg, norm="pre"))
    assert isinstance(pre.decoder_final_norm, torch.nn.LayerNorm)
    assert isinstance(pre.encoder_final_norm, torch.nn.LayerNorm)


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), **kw)


@pytest.mark.parametrize("overrides,tp,field", [
    ({"n_heads": 6, "d_model": 96}, 4, "model.n_heads"),  # 6 heads over TP=4
    ({"vocab_size": 1025}, 2, "model.vocab_size"),
    ({"vocab_size": 1020, "n_heads": 8}, 8, "model.vocab_size"),
    ({"d_ffn": 130}, 4, "model.d_ffn"),
    ({"n_heads": 3}, 1, "model.d_model"),  # 64 % 3
    ({"n_heads": 5, "d_model": 64}, 1, "model.d_model"),
    ({"dropout": 1.0}, 1, "model.dropout"),
    ({"dropout": -0.1}, 1, "model.dropout"),
    ({"attention_dropout": 1.5}, 1, "model.attention_dropout"),
    ({"norm": "sandwich"}, 1, "model.norm"),
    ({"activation": "swish"}, 1, "model.activation"),
    ({"d_model": 0}, 1, "model.d_model"),
    ({"n_decoder_layers": 0}, 1, "model.n_decoder_layers"),
    ({"vocab_size": 3.5}, 1, "model.vocab_size"),
    ({"vocab_size": 4}, 1, "model.vocab_size"),  # does not hold the special ids
    ({"n_predict": 0}, 1, "model.n_predict"),
    ({"init_std": 0.0}, 1, "model.init_std"),
    ({}, 0, "parallel.tp_size"),
])
def test_bad_values_raise_naming_the_field(overrides, tp, field):
    with pytest.raises(ValueError) as err:
        tiny(**overrides).validate(tp_size=tp)
    assert str(err.value).startswith(field + "="), str(err.value)


def test_good_values_pass_and_tp_divisibility():
    assert tiny().validate(tp_size=2) is not None
    tiny(n_heads=8).validate(tp_size=8)
    with pytest.raises(ValueError, match=r"^model\.n_heads=4: .*tensor-parallel size 8"):
        tiny(vocab_size=1024, d_ffn=128).validate(tp_size=8)


def test_an_init_too_small_for_the_width_warns_with_a_suggestion():
    """BART-base's init_std=0.02 at d_model=64 collapsed the tiny model's encoder (tests/test_model_learning.py):
    legal, so a warning naming the field and a value with BART-base's per-layer gain (0.55 / sqrt(64) = 0.0688)."""
    with pytest.warns(UserWarning, match=r"model\.init_std=0\.02 at d_model=64 .* gain .*=0\.16 .*init_std=0\.0688"):
        tiny(init_std=0.02).validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny().validate()  # 0.08 * 8 = 0.64
        ModelConfig.preset("base").validate()  # 0.02 * sqrt(768) = 0.55


def test_preset_overrides_are_validated():
    with pytest.raises(ValueError, match=r"model\.norm"):
        ModelConfig.preset("tiny", norm="middle")
    with pytest.raises(ValueError, match=r"model\.dropout"):
        ModelConfig.preset("base", dropout=2.0)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match=r"preset 'huge' is unknown.*base.*tiny"):
        ModelConfig.preset("huge")


def test_unknown_mode_names_it():
    assert set(MODES) == {"ar", "bang_ar", "bang", "nar_bidir", "nar_causal", "semi_nar", "janus"}
    for mode in MODES:
        assert check_mode(mode) == mode
    with pytest.raises(ValueError, match=r"decoder mode 'bidi' is unknown"):
        check_mode("bidi")
    with pytest.raises(ValueError, match=r"decoder mode 'ctc' is unknown"):
        stream_names("ctc")
    with pytest.raises(ValueError, match=r"decoder mode 'AR' is unknown"):
        build_streams("AR", prev_tokens=torch.ones(1, 3, dtype=torch.long))


def test_model_construction_validates():
    bad = tiny(norm="pre", activation="tanh")
    with pytest.raises(ValueError, match=r"^model\.activation="):
        Seq2SeqModel(bad)
