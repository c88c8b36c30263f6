"""The model's typed config, its presets and its validation."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

MODES = ("ar", "bang_ar", "bang", "nar_bidir", "nar_causal", "semi_nar", "janus")
NORMS = ("post", "pre")
ACTIVATIONS = ("gelu", "relu")
MIN_INIT_GAIN = 0.3  # init_std * sqrt(d_model); BART-base has 0.02 * sqrt(768) = 0.55
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")  # auto: FlexAttention block masks on CUDA, dense SDPA elsewhere


@dataclass(frozen=True)
class SpecialIds:
    """Fixed by the tokenizer the data pipeline trains (sentencepiece user symbols)."""

    pad: int = 0
    unk: int = 1
    bos: int = 2
    eos: int = 3
    mask: int = 4
    sep: int = 5


SPECIAL = SpecialIds()


@dataclass
class ModelConfig:
    vocab_size: int = 30592
    d_model: int = 768
    n_heads: int = 12
    d_ffn: int = 3072
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    max_source_positions: int = 512
    max_target_positions: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    norm: str = "post"  # "post" (BART/BANG) or "pre" (mBART)
    n_predict: int = 2  # BANG predicting streams used by mode "bang"
    n_length_classes: int = 256
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5
    attention_backend: str = "auto"
    scale_embedding: bool = False  # token embeddings x sqrt(d_model) at the input (mBART); the output stays unscaled

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
        cfg = dataclasses.replace(PRESETS[name], **overrides)
        cfg.validate()
        return cfg

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, tp_size: int = 1) -> "ModelConfig":
        """Raise ValueError naming the field at fault; returns self so calls chain."""

        def bad(field: str, why: str):
            raise ValueError(f"model.{field}={getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "d_model", "n_heads", "d_ffn", "n_encoder_layers", "n_decoder_layers",
                      "max_source_positions", "max_target_positions", "n_length_classes"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                bad(field, "must be a positive integer")
        if self.n_predict < 1:
            bad("n_predict", "must be at least 1")
        for field in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                bad(field, "must be in [0, 1)")
        if not self.init_std > 0:
            bad("init_std", "must be positive")
        gain = self.init_std * math.sqrt(self.d_model)
        if gain < MIN_INIT_GAIN:  # legal, but the trap the tiny preset fell into (see PRESETS["tiny"])
            warnings.warn(f"model.init_std={self.init_std} at d_model={self.d_model} gives a per-layer gain "
                          f"init_std*sqrt(d_model)={gain:.2f} (BART-base: 0.55); below {MIN_INIT_GAIN} the encoder "
                          f"states of different sources tend to collapse early in training. Consider "
                          f"init_std={0.55 / math.sqrt(self.d_model):.3g}.", stacklevel=2)
        if self.norm not in NORMS:
            bad("norm", f"must be one of {NORMS}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", f"must be one of {ATTENTION_BACKENDS}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"must be one of {ACTIVATIONS}")
        if self.d_model % self.n_heads:
            bad("d_model", f"must be divisible by n_heads={self.n_heads}")
        if self.vocab_size <= SPECIAL.sep:
            bad("vocab_size", f"must exceed the special ids (0..{SPECIAL.sep})")
        if tp_size < 1:
            raise ValueError(f"parallel.tp_size={tp_size}: must be at least 1")
        if self.n_heads % tp_size:
            bad("n_heads", f"must be divisible by the tensor-parallel size {tp_size}")
        if self.vocab_size % tp_size:
            bad("vocab_size", f"must be divisible by the tensor-parallel size {tp_size}")
        if self.d_ffn % tp_size:
            bad("d_ffn", f"must be divisible by the tensor-parallel size {tp_size}")
        return self


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"decoder mode {mode!r} is unknown; choose one of {MODES}")
    return mode


PRESETS = {
    # BANG / BART-base shape (methods.md §7.1).
    "base": ModelConfig(),
    # For tests, CI and the CPU demo. init_std: BART's 0.02 is tuned for d_model 768 (a linear's gain
    # std * sqrt(d_model) ~ 0.55). At d_model 64 it gives each sublayer an output ~40x smaller than the residual;
    # Adam-driven biases swamp it within ~25 steps, the encoder states of all sources collapse to one vector and
    # AR training stalls (tests/test_model_learning.py). 0.08 restores BART-base's gain (0.08 * 8 = 0.64).
    "tiny": ModelConfig(vocab_size=1024, d_model=64, n_heads=4, d_ffn=128, n_encoder_layers=2,
                        n_decoder_layers=2, max_source_positions=256, max_target_positions=256,
                        dropout=0.0, attention_dropout=0.0, n_length_classes=64, init_std=0.08),
    # The CPU demo's model (`make demo`, launch/demo.py): d 256, 3+3 layers, sized to learn Gigaword headlines in
    # minutes on 2 cores. Chosen by 400-step AR runs on the demo's data (greedy ROUGE-1 on 200 validation
    # examples; BENCHMARKS.md, "Quickstart"): pre-norm with init_std 0.08 (gain 1.3) reached 12.0, pre-norm with
    # BART's gain (0.035) 6.4; post-norm's encoder states collapsed. vocab_size comes from the tokenizer.
    "small": ModelConfig(vocab_size=4096, d_model=256, n_heads=4, d_ffn=1024, n_encoder_layers=3,
                         n_decoder_layers=3, max_source_positions=256, max_target_positions=256,
                         dropout=0.0, attention_dropout=0.0, n_length_classes=128, init_std=0.08, norm="pre"),
}
