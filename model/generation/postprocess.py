"""Turning a row of generated ids into the output: plain cut at EOS, or BANG's NAR post-processing.

BANG's post_processed_nar runs twice, on word pieces and again on the words they merge into; ELMER collapses
repeated words. The piece pass (nar_postprocess) is part of each mode's result; the word pass (finish_text) runs
where the ids become text, because only the tokenizer knows where words end. Both passes are needed: sentencepiece
splits "Woodhouse Woodhouse" into ▁Wood house ▁Wood house (no repeated piece), and "the the" into ▁the ▁the.
"""
from __future__ import annotations

from model.config import SPECIAL

_SKIPPED = (SPECIAL.pad, SPECIAL.bos, SPECIAL.mask)
# The modes whose outputs options.postprocess cleans, on pieces in the mode and on words in finish_text.
POSTPROCESSED_MODES = frozenset({"nar", "semi_nar", "mask_predict", "early_exit"})


def cut_at_eos(ids: list[int]) -> list[int]:
    """The tokens before the first EOS (all of them if there is none), with pads dropped."""
    out = []
    for t in ids:
        if t == SPECIAL.eos:
            break
        if t != SPECIAL.pad:
            out.append(t)
    return out


def collapse_repeats(items: list) -> list:
    """Consecutive equal items (ids or words) kept once."""
    return [t for i, t in enumerate(items) if i == 0 or t != items[i - 1]]


def nar_postprocess(ids: list[int]) -> list[int]:
    """BANG's post_processed_nar rule: EOS ends the output only once something was kept (a leading EOS is
    skipped, as are pad/bos/mask), and a token equal to the last kept one is dropped (collapsed repeats)."""
    out: list[int] = []
    for t in ids:
        if t == SPECIAL.eos:
            if out:
                break
            continue
        if t in _SKIPPED or (out and t == out[-1]):
            continue
        out.append(t)
    return out


def finish_nar(ids: list[int], postprocess: bool) -> list[int]:
    return nar_postprocess(ids) if postprocess else cut_at_eos(ids)


def finish_text(text: str, mode: str, postprocess: bool) -> str:
    """One output line from a row's detokenized text: whitespace normalized (no newlines inside) and, for the
    post-processed modes, BANG's second pass on words. The tokenizer's decode has already dropped EOS and the
    special tokens (the piece pass cut at EOS), so what is left of that pass is collapsing repeated words."""
    words = text.split()
    if postprocess and mode in POSTPROCESSED_MODES:
        words = collapse_repeats(words)
    return " ".join(words)
