"""The typed options every decoding mode reads, and the result every mode returns."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.config import ModelConfig

AR_LOGITS = ("ar", "bang_ar")
NAR_MODES = ("nar_bidir", "nar_causal")
LENGTH_SOURCES = ("length_head", "source", "fixed")
LENGTH_CANDIDATES = ("offsets", "top")
REMASK_SLOTS = ("content", "all")


@dataclass
class DecodeOptions:
    """One options type for all modes; each mode reads only its own fields.

    Lengths count output tokens, EOS excluded: AR and semi-NAR outputs have min_len..max_len tokens (EOS is
    banned before min_len and forced at max_len). NAR lengths count slots, EOS included (the length head's
    class is the target length with its EOS), and are capped at max_len + 1.
    """

    # AR (ar_greedy, ar_beam); min/max length also semi_nar
    beam_size: int = 4
    length_penalty: float = 1.0  # fairseq: a finished hypothesis scores sum(log p) / len**length_penalty
    min_len: int = 0
    max_len: int = 200
    no_repeat_ngram_size: int = 0  # 0 = off
    ar_logits: str = "ar"  # "ar": plain main stream; "bang_ar": one predicting slot per step
    # NAR (nar, mask_predict, early_exit)
    nar_mode: str = "nar_bidir"  # mode "nar" only; mask_predict and early_exit are nar_bidir
    length_source: str = "length_head"
    length_beam: int = 1  # length-head candidates; the best candidate by mean log-prob wins
    length_candidates: str = "offsets"  # fairseq's argmax + offsets (-1, 0, +1 for 3), or "top": the l likeliest
    fixed_length: int | None = None  # slots (EOS included) when length_source == "fixed"
    # semi_nar
    block_size: int = 4
    # mask_predict
    iterations: int = 10
    remask_slots: str = "content"  # fairseq: re-mask a share of the content slots, never EOS's; "all": EOS's too
    # early_exit: a slot exits at the first layer whose off-ramp entropy (nats) is below this
    exit_entropy: float = 1.0
    exit_layer: int | None = None  # early_exit: every slot exits at this layer (1-based); the entropy is unused
    # NAR modes: cut at the first EOS once the output is non-empty and collapse repeats (BANG's
    # post_processed_nar); semi_nar: collapse repeats. Repeated words are collapsed too where the ids become text
    # (postprocess.finish_text). Off: plain cut at the first EOS.
    postprocess: bool = True

    def validate(self) -> "DecodeOptions":
        def bad(name: str, why: str):
            raise ValueError(f"decode.{name}={getattr(self, name)!r}: {why}")

        for name, low in (("beam_size", 1), ("min_len", 0), ("max_len", 1), ("no_repeat_ngram_size", 0),
                          ("length_beam", 1), ("block_size", 1), ("iterations", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                bad(name, f"must be an integer >= {low}")
        if self.min_len > self.max_len:
            bad("min_len", f"must not exceed max_len={self.max_len}")
        if not isinstance(self.length_penalty, (int, float)) or math.isnan(self.length_penalty):
            bad("length_penalty", "must be a number")
        if not isinstance(self.exit_entropy, (int, float)) or math.isnan(self.exit_entropy):
            bad("exit_entropy", "must be a number (inf and -inf are allowed)")
        if self.exit_layer is not None and (not isinstance(self.exit_layer, int) or isinstance(self.exit_layer, bool)
                                            or self.exit_layer < 1):
            bad("exit_layer", "must be a layer number >= 1, or null for the entropy threshold")
        if self.ar_logits not in AR_LOGITS:
            bad("ar_logits", f"must be one of {AR_LOGITS}")
        if self.nar_mode not in NAR_MODES:
            bad("nar_mode", f"must be one of {NAR_MODES}")
        if self.length_source not in LENGTH_SOURCES:
            bad("length_source", f"must be one of {LENGTH_SOURCES}")
        if self.length_candidates not in LENGTH_CANDIDATES:
            bad("length_candidates", f"must be one of {LENGTH_CANDIDATES}")
        if self.remask_slots not in REMASK_SLOTS:
            bad("remask_slots", f"must be one of {REMASK_SLOTS}")
        if self.length_source == "fixed" and (not isinstance(self.fixed_length, int) or self.fixed_length < 1):
            bad("fixed_length", "must be a positive integer when length_source='fixed'")
        if not isinstance(self.postprocess, bool):
            bad("postprocess", "must be true or false")
        return self

    def check_model(self, cfg: ModelConfig) -> "DecodeOptions":
        """The checks that need the model's config (every mode runs them; finetuning runs them before training)."""
        if self.exit_layer is not None and self.exit_layer > cfg.n_decoder_layers:
            raise ValueError(f"decode.exit_layer={self.exit_layer}: the model has {cfg.n_decoder_layers} decoder "
                             f"layers")
        return self


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per example, in input order: EOS and pads removed, post-processed where asked
    figures: dict[str, float] = field(default_factory=dict)  # decoder_passes, wall_s, mean_exit_layer, ...
    scores: list[float] | None = None  # per example, the score the mode ranked by (beam, length beam)
