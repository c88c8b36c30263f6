"""The decoder as K streams of length T with a visibility rule per mode (methods.md §7.4).

A stream row is either a *token* row (token embedding) or a *slot* row (the learned mask vector); both add the
position embedding of the token they stand for. Masks are boolean, True where a row may attend to a column,
laid out over the concatenation [stream 0 (T) ; stream 1 (T) ; ...]. Shape-only masks are built once and cached.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

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
    attn_mask: torch.Tensor  # [B, K*T, K*T] bool, True = visible
    # What the rule was built from, so a structured kernel (model/attention.py) can rebuild it block-sparse.
    n_predict: int = 1
    block_size: int = 1
    tgt_mask: torch.Tensor | None = None
    masked: torch.Tensor | None = None

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


# --- shape-only masks ------------------------------------------------------------------------------------

def _causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


@functools.lru_cache(maxsize=64)
def structure_mask(mode: str, T: int, n_predict: int = 1, block_size: int = 1) -> torch.Tensor:
    """The [K*T, K*T] visibility rule of a mode whose rule depends only on shapes (all but janus)."""
    check_mode(mode)
    if mode == "janus":
        raise ValueError("the janus mask depends on which targets are masked: use janus_mask()")
    if mode == "ar":
        return _causal(T)
    if mode == "nar_bidir":
        return torch.ones(T, T, dtype=torch.bool)
    if mode == "nar_causal":
        return _causal(T)
    if mode == "semi_nar":
        return _semi_nar_mask(T, block_size)
    return _bang_mask(T, 1 if mode == "bang_ar" else n_predict)


def _bang_mask(T: int, n: int) -> torch.Tensor:
    """Main stream causal; predicting stream s at i sees main 0..max(i-s, 0), the diagonal states of earlier
    streams (stream m at i-s+m, m < s) and itself. So y_i is learned with s preceding tokens masked."""
    K = n + 1
    mask = torch.zeros(K * T, K * T, dtype=torch.bool)
    mask[:T, :T] = _causal(T)
    i = torch.arange(T)
    for s in range(n):
        rows = (s + 1) * T + i
        main_visible = torch.arange(T)[None, :] <= (i - s).clamp(min=0)[:, None]
        mask[rows[:, None], torch.arange(T)[None, :]] = main_visible
        for m in range(s):
            j = i - s + m
            ok = j >= 0
            mask[rows[ok], (m + 1) * T + j[ok]] = True
        mask[rows, rows] = True
    return mask


def _semi_nar_mask(T: int, k: int) -> torch.Tensor:
    """Block-parallel views: slot i in block b sees the gold prefix up to the block start (main 0..b*k, i.e.
    y_<b*k) and the slots of its block up to itself. k=1 is bang_ar; k>=T is causal NAR after BOS."""
    if k < 1:
        raise ValueError(f"block_size={k}: must be at least 1")
    mask = torch.zeros(2 * T, 2 * T, dtype=torch.bool)
    mask[:T, :T] = _causal(T)
    i = torch.arange(T)
    start = (i // k) * k
    cols = torch.arange(T)[None, :]
    mask[T:, :T] = cols <= start[:, None]
    mask[T:, T:] = (cols >= start[:, None]) & (cols <= i[:, None])
    return mask


def janus_mask(masked: torch.Tensor) -> torch.Tensor:
    """[B, 5T, 5T] for streams (main, ar_query, content, revealed, nar_query) given masked [B, T] (methods.md
    §3.1). AR group: bang_ar. NAR group: content rows see all content (unmasked tokens + placeholders: the
    CMLM view); the revealed row of masked y_i sees unmasked tokens, revealed tokens <= i and placeholders > i;
    the query row of masked y_i sees unmasked tokens, revealed tokens < i and placeholders >= i. Revealed and
    query rows of unmasked positions are unused and see only themselves."""
    B, T = masked.shape
    dev = masked.device
    mask = torch.zeros(B, 5 * T, 5 * T, dtype=torch.bool, device=dev)
    mask[:, :2 * T, :2 * T] = _bang_mask(T, 1).to(dev)
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
    if mode == "janus":
        structure = janus_mask(masked.bool() & tgt_mask)
    else:
        structure = structure_mask(mode, T, n_predict, block_size).to(dev)[None]
    key_valid = tgt_mask.repeat(1, len(names))
    attn_mask = structure & key_valid[:, None, :]
    # A row with nothing visible (a padded row) would give NaN in softmax; let it see itself.
    empty = ~attn_mask.any(-1)
    if empty.any():
        attn_mask = attn_mask | (torch.eye(attn_mask.shape[-1], dtype=torch.bool, device=dev)[None] & empty[..., None])
    return DecoderStreams(mode, names, T, ids, is_slot, positions, attn_mask, n_predict, block_size, tgt_mask, masked)
