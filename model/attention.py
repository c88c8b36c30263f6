"""Attention kernels over one visibility rule: dense SDPA with a boolean mask, or FlexAttention with a block mask.

`attend` computes softmax(q k^T / sqrt(hd), masked) v either way. "sdpa" hands the dense boolean mask to
torch's scaled_dot_product_attention (the CPU default). "flex" hands a BlockMask to FlexAttention, which skips
the tiles (SPARSE_BLOCK x SPARSE_BLOCK) that the mask hides completely: the upper triangle of causal streams,
the main stream's view of the predicting streams, the cross-group tiles of the janus layout. Measured on torch
2.13 CPU: compiled FlexAttention runs forward only (no backward on CPU), compiles per shape in ~5-20 s, and
matches SDPA to ~5e-7 in fp32; eager FlexAttention ignores the block structure and materialises all scores.

Which kernel a call runs (`resolve_backend`): "auto" is FlexAttention on CUDA and SDPA elsewhere. FlexAttention
has no dropout (it has no hook on the probabilities after the softmax, and dropping scores before it would
renormalise, which is not dropout), so a call with attention dropout (training with attention_dropout > 0, the
base config) runs SDPA with the dense mask, which the model then builds on the device, and no BlockMask at all.

A BlockMask comes from a dense mask (`block_mask_from_dense`, any mask, cached on the mask tensor) or from the
streams' rule written as a mask_mod (`stream_block_mask`, equal to model/streams.py's build_streams mask,
padding included, and cached per shape and mode for shape-only modes without padding). On CUDA both the
BlockMask construction and FlexAttention are compiled with dynamic shapes, and the streams' length T enters every
mask_mod as a device tensor, not a Python constant: a new length (length bucketing makes many) reuses the
compiled code instead of compiling again (one compilation for five lengths, measured with a counting backend in
tests/test_attention.py; with T a Python int, each length compiled anew until the recompile limit, after which
torch silently ran the unfused eager path; now hitting the limit raises). Under a FakeTensorMode (a dry run,
a memory plan) nothing is compiled and nothing is cached.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

from model.config import check_mode
from model.streams import bang_rule, shape_rule, stream_names, structure_mask, under_fake_mode

BACKENDS = ("sdpa", "flex")
# FlexAttention's tile. With T a multiple of it, stream boundaries fall on tile boundaries and whole
# stream-to-stream blocks are skipped.
SPARSE_BLOCK = 128

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def default_backend(device: torch.device | str) -> str:
    """FlexAttention where it has a fused forward and backward (CUDA); dense SDPA elsewhere."""
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, device: torch.device | str, dropout_p: float = 0.0) -> str:
    """The kernel a call runs: `backend` ("auto", "sdpa" or "flex") on `device`, and SDPA whenever dropout_p > 0
    (FlexAttention has no dropout). The model asks this both to build the mask and to attend, so it never builds
    a mask form the kernel does not use."""
    backend = default_backend(device) if backend == "auto" else check_backend(backend)
    if backend == "flex" and dropout_p > 0:
        return "sdpa"
    return backend


# --- the kernel call ---------------------------------------------------------------------------------------

# Each mask_mod (a mode, padded or not, a dense mask) is one compiled variant; dynamo's default limit of 8 variants
# per function would drop later calls to the unfused eager path silently. Past this limit a call raises instead.
RECOMPILE_LIMIT = 64


def flex_compile_options(device_type: str) -> dict:
    """torch.compile options of FlexAttention and of BlockMask construction. CUDA: dynamic shapes, so that a new
    length is no new compilation. CPU: dynamic=False, because dynamic shapes generated C++ that failed to build
    in torch 2.13 (CPU FlexAttention serves no-grad checks only)."""
    return {"dynamic": device_type != "cpu"}


@functools.cache
def _compiled_flex(device_type: str):
    return torch.compile(flex_attention, **flex_compile_options(device_type))


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask, **flex_compile_options("cuda"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask, *,
           dropout_p: float = 0.0, backend: str = "sdpa", compiled: bool = True) -> torch.Tensor:
    """q [B, h, Lq, hd], k/v [B, h, Lk, hd] -> [B, h, Lq, hd].

    mask: bool [B or 1, Lq, Lk], True = visible (every row must see something: SDPA gives NaN on an empty row,
    Flex gives 0), or a BlockMask from this module. FlexAttention has no dropout, so dropout_p > 0 runs dense
    SDPA whatever the backend (callers that resolve_backend first hand it the dense mask). compiled=False runs
    FlexAttention eagerly (unfused; for checks only), as does a FakeTensorMode.
    """
    check_backend(backend)
    if backend == "sdpa" or dropout_p > 0:
        if backend == "flex":
            warnings.warn("FlexAttention has no attention dropout: calls with dropout_p > 0 run dense SDPA",
                          stacklevel=2)
        dense = mask if isinstance(mask, torch.Tensor) else dense_from_block_mask(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], dropout_p=dropout_p)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"attention backend 'flex' has no backward on CPU in torch {torch.__version__}: "
            "use backend='sdpa' to train on CPU, or run under torch.no_grad()")
    block_mask = mask if isinstance(mask, BlockMask) else block_mask_from_dense(mask)
    if not compiled or under_fake_mode():
        return flex_attention(q, k, v, block_mask=block_mask)
    import torch._dynamo as dynamo  # only the compiled path needs dynamo

    with dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        return _compiled_flex(q.device.type)(q, k, v, block_mask=block_mask)


# --- block masks from dense masks --------------------------------------------------------------------------

class _IdentityCache:
    """A few values keyed on the identity of live objects: the same mask object is handed to every layer of a
    forward, so its block mask (or dense mask) is built once per forward, not once per layer. A cached
    BlockMask captures its dense mask, which therefore stays alive until evicted: keep the cache small."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: dict[int, tuple[weakref.ref, object, object]] = {}

    def get(self, obj, tag):
        entry = self.entries.get(id(obj))
        if entry is not None and entry[0]() is obj and entry[1] == tag:
            return entry[2]
        return None

    def put(self, obj, tag, value) -> None:
        self.entries = {key: e for key, e in self.entries.items() if e[0]() is not None}
        while len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[id(obj)] = (weakref.ref(obj), tag, value)


_from_dense = _IdentityCache()
_to_dense = _IdentityCache()


def _build_block_mask(mask_mod: MaskMod, B: int | None, Lq: int, Lk: int, device: torch.device,
                      sparse_block: int) -> BlockMask:
    # Heads share the mask (H=None). create_block_mask evaluates mask_mod densely once per call (compiled on CUDA,
    # so that the [B, Lq, Lk] evaluation is fused and not materialised); callers cache.
    build = create_block_mask
    if torch.device(device).type == "cuda" and not under_fake_mode():
        build = _compiled_create_block_mask()
    return build(mask_mod, B, None, Lq, Lk, device=device, BLOCK_SIZE=sparse_block)


def block_mask_from_dense(mask: torch.Tensor, sparse_block: int = SPARSE_BLOCK) -> BlockMask:
    """A BlockMask equal to a boolean mask [B or 1, Lq, Lk] (True = visible); cached on the mask tensor."""
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be a bool tensor [B, Lq, Lk], got {mask.dtype} {tuple(mask.shape)}")
    tag = (mask._version, sparse_block)
    cached = _from_dense.get(mask, tag)
    if cached is not None:
        return cached
    B, Lq, Lk = mask.shape

    def visible(b, h, q_idx, kv_idx):
        return mask[b, q_idx, kv_idx]

    block_mask = _build_block_mask(visible, B, Lq, Lk, mask.device, sparse_block)
    _from_dense.put(mask, tag, block_mask)
    return block_mask


def dense_from_block_mask(block_mask: BlockMask) -> torch.Tensor:
    """The [B, Lq, Lk] boolean mask of a BlockMask built here (its mask_mod is the whole rule); cached."""
    cached = _to_dense.get(block_mask, 0)
    if cached is not None:
        return cached
    B = block_mask.kv_num_blocks.shape[0]
    Lq, Lk = block_mask.seq_lengths
    dense = create_mask(block_mask.mask_mod, B, 1, Lq, Lk, device=block_mask.kv_num_blocks.device)[:, 0]
    _to_dense.put(block_mask, 0, dense)
    return dense


def block_kinds(block_mask: BlockMask) -> torch.Tensor:
    """[B, H, n_q_blocks, n_kv_blocks] int: 0 = skipped, 1 = partial (mask_mod applied), 2 = full."""
    B, H, n_q = block_mask.kv_num_blocks.shape
    Lq, Lk = block_mask.seq_lengths
    n_kv = -(-Lk // block_mask.BLOCK_SIZE[1])
    kinds = torch.zeros(B, H, n_q, n_kv, dtype=torch.long)

    def mark(num, idx, value):
        if num is None:
            return
        num, idx = num.cpu(), idx.cpu()
        for b in range(B):
            for h in range(H):
                for r in range(n_q):
                    kinds[b, h, r, idx[b, h, r, :num[b, h, r]].long()] = value

    mark(block_mask.kv_num_blocks, block_mask.kv_indices, 1)
    mark(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2)
    return kinds


# --- the streams' rule as a mask_mod -----------------------------------------------------------------------
# Index q (row) and kv (column) of the [K*T, K*T] layout split into stream (q // T) and position (q % T). The
# shape-only modes use model/streams.py's shape_rule; janus's rule, per (row, column), is written here (its dense
# form is model/streams.py's janus_mask; tests/test_attention.py checks they agree).

def _janus_rule(sq, iq, sk, jk, m_row, m_col):
    """Streams (main, ar_query, content, revealed, nar_query); m_row / m_col: is target iq / jk NAR-masked."""
    ar_group = (sq < 2) & (sk < 2) & bang_rule(sq, iq, sk, jk)
    content = (sq == 2) & (sk == 2)
    revealed = (sq == 3) & (
        (m_row & (((sk == 2) & (~m_col | (jk > iq))) | ((sk == 3) & m_col & (jk <= iq))))
        | (~m_row & (sk == 3) & (jk == iq)))
    query = (sq == 4) & (
        (m_row & (((sk == 2) & (~m_col | (jk >= iq))) | ((sk == 3) & m_col & (jk < iq))))
        | (~m_row & (sk == 4) & (jk == iq)))
    return ar_group | content | revealed | query


def stream_mask_mod(mode: str, T: int, *, n_predict: int = 1, block_size: int = 1,
                    tgt_mask: torch.Tensor | None = None, masked: torch.Tensor | None = None,
                    device: torch.device | str | None = None) -> MaskMod:
    """The visibility rule of build_streams(mode, ...) as a FlexAttention mask_mod over [K*T, K*T].

    tgt_mask [B, T]: real targets (keys at padded positions are hidden; a row left with nothing visible sees
    itself, as in build_streams). masked [B, T]: the NAR-masked targets (janus only; required there). T enters
    as a tensor on the device (that of tgt_mask / masked, else `device`, else cpu), so compiled code does not
    specialise on it.
    """
    check_mode(mode)
    ref = tgt_mask if tgt_mask is not None else masked
    device = ref.device if ref is not None else torch.device(device or "cpu")
    length = torch.full((), T, dtype=torch.int64, device=device)
    if mode == "janus":
        if masked is None:
            raise ValueError("mode 'janus' needs masked= (the NAR-masked targets)")
        nar = masked.bool() if tgt_mask is None else masked.bool() & tgt_mask.bool()

        def rule(b, sq, iq, sk, jk):
            return _janus_rule(sq, iq, sk, jk, nar[b, iq], nar[b, jk])
    else:
        shaped = shape_rule(mode, block_size)

        def rule(b, sq, iq, sk, jk):
            return shaped(sq, iq, sk, jk)

    if tgt_mask is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return rule(b, q_idx // length, q_idx % length, kv_idx // length, kv_idx % length)
        return mask_mod

    valid = tgt_mask.bool()
    empty = _empty_rows(mode, T, n_predict, block_size, valid)

    def padded_mask_mod(b, h, q_idx, kv_idx):
        seen = rule(b, q_idx // length, q_idx % length, kv_idx // length, kv_idx % length) & \
            valid[b, kv_idx % length]
        return seen | ((q_idx == kv_idx) & empty[b, q_idx])

    return padded_mask_mod


def _empty_rows(mode: str, T: int, n_predict: int, block_size: int, valid: torch.Tensor) -> torch.Tensor:
    """[B, K*T] rows that see no valid key, without building the [B, K*T, K*T] mask."""
    K = len(stream_names(mode, n_predict))
    if mode != "janus":
        structure = structure_mask(mode, T, n_predict, block_size, device=valid.device)
        seen = valid.repeat(1, K).float() @ structure.float().T  # [B, K*T] count of visible valid keys
        return seen == 0
    # janus (see _janus_rule): main and ar_query rows at i see the valid main keys 0..i; content rows see all
    # valid content keys; a revealed / query row at i sees its own valid key i (masked rows see more).
    prefix_empty = valid.cumsum(1) == 0
    none_valid = ~valid.any(1, keepdim=True).expand_as(valid)
    return torch.cat([prefix_empty, prefix_empty, none_valid, ~valid, ~valid], dim=1)


def stream_block_mask(mode: str, T: int, *, n_predict: int = 1, block_size: int = 1,
                      tgt_mask: torch.Tensor | None = None, masked: torch.Tensor | None = None,
                      device: torch.device | str = "cpu", sparse_block: int = SPARSE_BLOCK) -> BlockMask:
    """The BlockMask of build_streams(mode, ...). For shape-only modes without tgt_mask it is built once per
    (mode, T, n_predict, block_size, device) and broadcast over the batch; otherwise once per call (per batch).
    Whether a given tgt_mask pads anything is not asked: that would read device values on the host."""
    check_mode(mode)
    L = len(stream_names(mode, n_predict)) * T
    if mode != "janus" and tgt_mask is None:
        n_predict = n_predict if mode == "bang" else 1
        block_size = block_size if mode == "semi_nar" else 1
        if under_fake_mode():
            return _shape_block_mask.__wrapped__(mode, T, n_predict, block_size, str(torch.device(device)),
                                                 sparse_block)
        return _shape_block_mask(mode, T, n_predict, block_size, str(torch.device(device)), sparse_block)
    mask_mod = stream_mask_mod(mode, T, n_predict=n_predict, block_size=block_size, tgt_mask=tgt_mask,
                               masked=masked)
    B = (tgt_mask if tgt_mask is not None else masked).shape[0]
    return _build_block_mask(mask_mod, B, L, L, torch.device(device), sparse_block)


@functools.lru_cache(maxsize=64)
def _shape_block_mask(mode: str, T: int, n_predict: int, block_size: int, device: str,
                      sparse_block: int) -> BlockMask:
    L = len(stream_names(mode, n_predict)) * T
    mask_mod = stream_mask_mod(mode, T, n_predict=n_predict, block_size=block_size, device=device)
    return _build_block_mask(mask_mod, None, L, L, torch.device(device), sparse_block)
