"""Turning a row of generated ids into the output: plain cut at EOS, or BANG's NAR post-processing."""
from __future__ import annotations

from model.config import SPECIAL

_SKIPPED = (SPECIAL.pad, SPECIAL.bos, SPECIAL.mask)


def cut_at_eos(ids: list[int]) -> list[int]:
    """The tokens before the first EOS (all of them if there is none), with pads dropped."""
    out = []
    for t in ids:
        if t == SPECIAL.eos:
            break
        if t != SPECIAL.pad:
            out.append(t)
    return out


def collapse_repeats(ids: list[int]) -> list[int]:
    return [t for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]


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
