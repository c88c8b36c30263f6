"""The decoder as K streams of length T with a visibility rule per mode (methods.md §7.4).

A stream row is either a *token* row (token embedding) or a *slot* row (the learned mask vector); both add the
position embedding of the token they stand for. Masks are boolean, True where a row may attend to a column,
laid out over the concatenation [stream 0 (T) ; stream 1 (T) ; ...].

The rule of the modes whose mask depends only on shapes is written once, per (row, column) pair (`shape_rule`):
`structure_mask` evaluates it over the grid of rows and columns on the batch's device (a few elementwise kernels,
no host-to-device copy; host masks are cached), and model/attention.py hands the same rule to FlexAttention. A
batch's dense mask (padding applied) is built only when a kernel asks for it (`DecoderStreams.attn_mask`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from model.config import SPECIAL, check_mode


@dataclass
class DecoderStreams:
    mode: str
    names: tuple[str, ...]
    length: int  # T, the length of every stream
    ids: torch.Tensor  # [B, K*T] token ids of token rows (ignored on slot rows)
    is_slot: torch.Tensor  # [B, K*T] bool
    positions: torch.Tensor  # [B, K*T] position ids
    tgt_mask: torch.Tensor  # [B, T] bool, the real targets
    # What the rule is built from, so that each kernel builds the form it needs (dense here, block-sparse in
    # model/attention.py) and nothing else.
    n_predict: int = 1
    block_size: int = 1
    masked: torch.Tensor | None = None

    @functools.cached_property
    def attn_mask(self) -> torch.Tensor:
        """[B, K*T, K*T] bool, True = visible: the mode's rule, padded keys hidden, and a row left with nothing
        visible (a padded row) seeing itself (softmax over nothing gives NaN). Built on first use, on the batch's
        device."""
        dev = self.ids.device
        if self.mode == "janus":
            structure = janus_mask(self.masked.bool() & self.tgt_mask)
        else:
            structure = structure_mask(self.mode, self.length, self.n_predict, self.block_size, device=dev)[None]
        key_valid = self.tgt_mask.repeat(1, len(self.names))
        attn_mask = structure & key_valid[:, None, :]
        empty = ~attn_mask.any(-1)  # on the device: no host sync to decide whether any row is empty
        return attn_mask | (torch.eye(attn_mask.shape[-1], dtype=torch.bool, device=dev)[None] & empty[..., None])

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"mode {self.mode!r} has no stream {name!r}; it has {self.names}")
        return self.names.index(name)

    def slice(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """The [B, T, ...] rows of one stream."""
        k = self.index(name)
        return hidden[:, k * self.length:(k + 1) * self.length]


def stream_names(mode: str, n_predict: int = 1) -> tuple[str, ...]:
    return {
        "ar": ("main",),
        "bang_ar": ("main", "predict0"),
        "bang": ("main",) + tuple(f"predict{s}" for s in range(n_predict)),
        "nar_bidir": ("slots",),
        "nar_causal": ("slots",),
        "semi_nar": ("main", "predict0"),
        "janus": ("main", "ar_query", "content", "revealed", "nar_query"),
    }[check_mode(mode)]


# --- the rule of the shape-only modes, per (row, column) ------------------------------------------------------
# Row q and column k of the [K*T, K*T] layout split into stream (q // T) and position (q % T): sq, iq, sk, jk.
# The functions take tensors of indices and broadcast, so they serve a dense grid and a FlexAttention mask_mod.

def bang_rule(sq, iq, sk, jk):
    """Main rows causal; predicting stream s = sq-1 at i sees main 0..max(i-s, 0), stream m < s at i-s+m
    (the diagonal of earlier streams) and itself. So y_i is learned with s preceding tokens masked."""
    main_limit = torch.where(sq == 0, iq, torch.clamp(iq - sq + 1, min=0))
    main = (sk == 0) & (jk <= main_limit)
    diagonal = (sk >= 1) & (sk < sq) & (jk == iq - sq + sk)
    itself = (sk == sq) & (jk == iq)
    return main | diagonal | itself


def _semi_nar_rule(sq, iq, sk, jk, k: int):
    """Block-parallel views: main rows causal; slot i of block b sees the gold prefix up to the block start
    (main 0..b*k, i.e. y_<b*k) and the slots of its block up to itself. k=1 is bang_ar; k>=T is causal NAR."""
    start = (iq // k) * k
    main_row = (sq == 0) & (sk == 0) & (jk <= iq)
    slot_row = (sq == 1) & (((sk == 0) & (jk <= start)) | ((sk == 1) & (jk >= start) & (jk <= iq)))
    return main_row | slot_row


def shape_rule(mode: str, block_size: int = 1) -> Callable:
    """(sq, iq, sk, jk) -> visible, for the modes whose rule depends only on shapes (all but janus)."""
    check_mode(mode)
    if mode == "janus":
        raise ValueError("the janus mask depends on which targets are masked: use janus_mask()")
    if mode in ("ar", "nar_causal"):
        return lambda sq, iq, sk, jk: jk <= iq
    if mode == "nar_bidir":
        return lambda sq, iq, sk, jk: jk >= 0
    if mode == "semi_nar":
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: must be at least 1")
        return lambda sq, iq, sk, jk: _semi_nar_rule(sq, iq, sk, jk, block_size)
    return bang_rule  # bang_ar, bang: the number of streams is implied by the layout


def structure_mask(mode: str, T: int, n_predict: int = 1, block_size: int = 1,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The [K*T, K*T] visibility rule of a shape-only mode (all but janus), built on `device`. Host masks are
    cached per shape; device masks are built each time (a few elementwise kernels, no copy)."""
    device = torch.device(device)
    if device.type == "cpu" and not under_fake_mode():
        return _host_structure_mask(mode, T, n_predict, block_size)
    return _evaluate_structure(mode, T, n_predict, block_size, device)


def _evaluate_structure(mode: str, T: int, n_predict: int, block_size: int, device: torch.device) -> torch.Tensor:
    rule = shape_rule(mode, block_size)
    L = len(stream_names(mode, n_predict)) * T
    idx = torch.arange(L, device=device)
    q, k = idx[:, None], idx[None, :]
    return rule(q // T, q % T, k // T, k % T).expand(L, L).contiguous()  # nar_bidir's rule reads columns only


@functools.lru_cache(maxsize=64)
def _host_structure_mask(mode: str, T: int, n_predict: int, block_size: int) -> torch.Tensor:
    return _evaluate_structure(mode, T, n_predict, block_size, torch.device("cpu"))


def under_fake_mode() -> bool:
    """A FakeTensorMode is active (a dry run, a memory plan): its tensors must not enter a process-wide cache."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def janus_mask(masked: torch.Tensor) -> torch.Tensor:
    """[B, 5T, 5T] for streams (main, ar_query, content, revealed, nar_query) given masked [B, T] (methods.md
    §3.1). AR group: bang_ar. NAR group: content rows see all content (unmasked tokens + placeholders: the
    CMLM view); the revealed row of masked y_i sees unmasked tokens, revealed tokens <= i and placeholders > i;
    the query row of masked y_i sees unmasked tokens, revealed tokens < i and placeholders >= i. Revealed and
    query rows of unmasked positions are unused and see only themselves."""
    B, T = masked.shape
    dev = masked.device
    mask = torch.zeros(B, 5 * T, 5 * T, dtype=torch.bool, device=dev)
    mask[:, :2 * T, :2 * T] = structure_mask("bang_ar", T, device=dev)
    M = masked[:, None, :]  # column j is masked
    U = ~M
    i = torch.arange(T, device=dev)[:, None]
    j = torch.arange(T, device=dev)[None, :]
    C, R, Q = slice(2 * T, 3 * T), slice(3 * T, 4 * T), slice(4 * T, 5 * T)
    mask[:, C, C] = True
    rows_used = masked[:, :, None]
    mask[:, R, C] = rows_used & (U | (M & (j > i)))
    mask[:, R, R] = rows_used & M & (j <= i)
    mask[:, Q, C] = rows_used & (U | (M & (j >= i)))
    mask[:, Q, R] = rows_used & M & (j < i)
    eye = torch.eye(T, dtype=torch.bool, device=dev)
    unused = ~masked[:, :, None] & eye
    mask[:, R, R] |= unused
    mask[:, Q, Q] |= unused
    return mask


# --- building the streams of a batch ---------------------------------------------------------------------

def build_streams(
    mode: str,
    *,
    prev_tokens: torch.Tensor | None = None,
    tgt_tokens: torch.Tensor | None = None,
    tgt_positions: torch.Tensor | None = None,
    tgt_mask: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    n_predict: int = 1,
    block_size: int = 1,
    length: int | None = None,
    batch_size: int | None = None,
) -> DecoderStreams:
    """Lay out the decoder input of one batch.

    prev_tokens [B,T]: main-stream input (the token before each target). tgt_tokens [B,T]: targets, needed
    where true tokens are shown (janus, NAR with `masked`). tgt_positions [B,T]: 1-based position ids of the
    targets (default 1..T). tgt_mask [B,T]: real targets (default all). masked [B,T]: for NAR modes, which
    targets are slots (default all); for janus, the NAR-masked targets (required).
    """
    names = stream_names(mode, n_predict)
    ref = next((t for t in (prev_tokens, tgt_tokens, tgt_positions, tgt_mask, masked) if t is not None), None)
    if ref is not None:
        B, T = ref.shape
        dev = ref.device
    elif length is not None and batch_size is not None:
        B, T, dev = batch_size, length, torch.device("cpu")
    else:
        raise ValueError("build_streams needs a [B, T] tensor or length= and batch_size=")
    if tgt_positions is None:
        tgt_positions = torch.arange(1, T + 1, device=dev).expand(B, T)
    if tgt_mask is None:
        tgt_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    tgt_mask = tgt_mask.bool()
    pad = torch.full((B, T), SPECIAL.pad, dtype=torch.long, device=dev)
    yes = torch.ones(B, T, dtype=torch.bool, device=dev)
    no = torch.zeros(B, T, dtype=torch.bool, device=dev)

    def need(t, what):
        if t is None:
            raise ValueError(f"mode {mode!r} needs {what}")
        return t

    main_pos = (tgt_positions - 1).clamp(min=0)
    rows = []  # (ids, is_slot, positions) per stream
    if mode in ("ar", "bang_ar", "bang", "semi_nar", "janus"):
        rows.append((need(prev_tokens, "prev_tokens"), no, main_pos))
        n_slots = {"ar": 0, "janus": 1, "bang": n_predict}.get(mode, 1)
        rows += [(pad, yes, tgt_positions)] * n_slots
    if mode in ("nar_bidir", "nar_causal"):
        if masked is None:
            rows.append((pad, yes, tgt_positions))
        else:
            rows.append((need(tgt_tokens, "tgt_tokens when masked= is given"), masked.bool(), tgt_positions))
    if mode == "janus":
        m = need(masked, "masked= (the NAR-masked targets)").bool()
        tgt = need(tgt_tokens, "tgt_tokens")
        rows += [(tgt, m, tgt_positions), (tgt, no, tgt_positions), (pad, yes, tgt_positions)]

    ids = torch.cat([r[0] for r in rows], dim=1)
    is_slot = torch.cat([r[1] for r in rows], dim=1)
    positions = torch.cat([r[2] for r in rows], dim=1)
    if mode == "semi_nar":
        shape_rule(mode, block_size)  # refuses a bad block size now, not when a kernel builds the mask
    return DecoderStreams(mode, names, T, ids, is_slot, positions, tgt_mask, n_predict, block_size, masked)
