"""model/attention.py: FlexAttention with block masks gives the numbers of dense SDPA, for every stream mode.

On torch 2.13 CPU FlexAttention runs forward only (eager, and compiled through inductor's C++ template, which
skips the tiles the BlockMask marks as empty); it has no backward on CPU, so the gradient comparison runs
where CUDA is present and, on CPU, the test asserts the clear refusal instead.
"""
import copy
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

from model.attention import (attend, block_kinds, block_mask_from_dense, default_backend, dense_from_block_mask,
                             stream_block_mask, stream_mask_mod)
from model.streams import build_streams

TOL = 1e-5  # fp32 max abs difference, flex vs dense
TILE = 16  # a small sparse block so that small layouts have several tiles
B, H, HD = 2, 2, 16

# (mode, extra build_streams args, T): every layout has K*T = 60 rows, so one compiled kernel serves all.
LAYOUTS = [
    ("ar", {}, 60),
    ("nar_bidir", {}, 60),
    ("nar_causal", {}, 60),
    ("bang_ar", {}, 30),
    ("semi_nar", {"block_size": 4}, 30),
    ("bang", {"n_predict": 2}, 20),
    ("bang", {"n_predict": 3}, 15),
    ("janus", {}, 12),
]
IDS = [f"{m}{''.join(f'-{k}{v}' for k, v in kw.items())}" for m, kw, _ in LAYOUTS]


def make_streams(mode: str, kw: dict, T: int, *, pad: bool, seed: int = 0):
    """A batch of B: row 0 full length, row 1 padded after 2/3 of T (and a 1-token row for batch 3)."""
    g = torch.Generator().manual_seed(seed)
    tgt_mask = torch.ones(B, T, dtype=torch.bool)
    if pad:
        tgt_mask[1, (2 * T) // 3:] = False
    masked = (torch.rand(B, T, generator=g) < 0.6) if mode == "janus" else None
    prev = torch.randint(6, 50, (B, T), generator=g)
    tgt = torch.randint(6, 50, (B, T), generator=g)
    streams = build_streams(mode, prev_tokens=prev, tgt_tokens=tgt, tgt_mask=tgt_mask, masked=masked, **kw)
    return streams, (tgt_mask if pad else None), masked


def qkv(L: int, seed: int, requires_grad: bool = False, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, HD, generator=g).to(device).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("mode,kw,T", LAYOUTS, ids=IDS)
def test_stream_mask_mod_equals_build_streams(mode, kw, T):
    """The mask_mod of each mode is exactly the build_streams mask, with and without padding; so is the dense
    mask read back from the stream BlockMask."""
    for pad in (False, True):
        streams, tgt_mask, masked = make_streams(mode, kw, T, pad=pad)
        L = streams.attn_mask.shape[-1]
        mod = stream_mask_mod(mode, T, tgt_mask=tgt_mask, masked=masked, **kw)
        got = create_mask(mod, B, 1, L, L, device="cpu")[:, 0]
        assert torch.equal(got, streams.attn_mask.expand_as(got)), (mode, pad)
        bm = stream_block_mask(mode, T, tgt_mask=tgt_mask, masked=masked, sparse_block=TILE, **kw)
        dense = dense_from_block_mask(bm)
        assert torch.equal(dense.expand_as(streams.attn_mask), streams.attn_mask), (mode, pad)


def test_fully_padded_rows_see_themselves():
    """A batch row whose only real target is the first: build_streams lets empty rows see themselves."""
    T = 6
    tgt_mask = torch.zeros(B, T, dtype=torch.bool)
    tgt_mask[:, 0] = True
    masked = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for mode, kw in (("bang", {"n_predict": 2}), ("janus", {})):
        streams = build_streams(mode, prev_tokens=torch.full((B, T), 7), tgt_tokens=torch.full((B, T), 8),
                                tgt_mask=tgt_mask, masked=masked if mode == "janus" else None, **kw)
        L = streams.attn_mask.shape[-1]
        mod = stream_mask_mod(mode, T, tgt_mask=tgt_mask, masked=masked if mode == "janus" else None, **kw)
        assert torch.equal(create_mask(mod, B, 1, L, L, device="cpu")[:, 0], streams.attn_mask), mode


# --- block structure, derived by hand -----------------------------------------------------------------------

def kinds_of(bm: BlockMask) -> list:
    return block_kinds(bm)[:, 0].tolist()  # [B][row tile][column tile]: 0 skipped, 1 partial, 2 full


def test_causal_blocks_skip_the_upper_triangle():
    # ar, T=64, tiles of 16: diagonal tiles partial, tiles below full, tiles above skipped.
    expect = [[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]]
    assert kinds_of(stream_block_mask("ar", 64, sparse_block=TILE)) == [expect]


def test_padding_blocks():
    # ar, T=32, tiles of 16; batch row 1 has 16 real targets: its keys 16..31 are hidden, so tile (1,1) is
    # skipped and tile (1,0) (rows 16..31 see all of 0..15) is full. Row 0 is plain causal.
    tgt_mask = torch.ones(2, 32, dtype=torch.bool)
    tgt_mask[1, 16:] = False
    got = kinds_of(stream_block_mask("ar", 32, tgt_mask=tgt_mask, sparse_block=TILE))
    assert got == [[[1, 0], [2, 1]], [[1, 0], [2, 0]]]


def test_bang_blocks():
    # bang n=2, T=16 = one tile per stream. Rows: main sees main causally; predict0 sees main 0..i and itself;
    # predict1 sees main 0..i-1, predict0 at i-1 and itself. Nothing is full, the main stream's view of the
    # predicting streams and predict0's view of predict1 are skipped.
    expect = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert kinds_of(stream_block_mask("bang", 16, n_predict=2, sparse_block=TILE)) == [expect]


def test_janus_blocks_skip_cross_group_tiles_per_batch_row():
    # janus, T=16 = one tile per stream (main, ar_query, content, revealed, nar_query). The AR group never sees
    # the NAR group and vice versa; content rows see all content (full tile). Batch row 0 masks every target,
    # so no nar_query row is unused and the nar_query -> nar_query tile is skipped; batch row 1 has unmasked
    # targets whose unused query rows see themselves, so that tile is partial there.
    masked = torch.ones(2, 16, dtype=torch.bool)
    masked[1, ::2] = False
    common = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 1, 1, 0]]
    got = kinds_of(stream_block_mask("janus", 16, masked=masked, sparse_block=TILE))
    assert got == [common + [[0, 0, 1, 1, 0]], common + [[0, 0, 1, 1, 1]]]


@pytest.mark.parametrize("mode,kw,T", LAYOUTS, ids=IDS)
def test_dense_and_stream_block_masks_agree(mode, kw, T):
    streams, tgt_mask, masked = make_streams(mode, kw, T, pad=True)
    from_dense = block_kinds(block_mask_from_dense(streams.attn_mask, TILE))
    from_rule = block_kinds(stream_block_mask(mode, T, tgt_mask=tgt_mask, masked=masked, sparse_block=TILE, **kw))
    assert torch.equal(from_dense, from_rule.expand_as(from_dense))


# --- numbers: flex equals dense SDPA ------------------------------------------------------------------------

@pytest.mark.parametrize("mode,kw,T", LAYOUTS, ids=IDS)
def test_flex_eager_equals_sdpa(mode, kw, T):
    """Eager FlexAttention evaluates the stream mask_mod everywhere: checks the padded rule, not tile skipping."""
    streams, tgt_mask, masked = make_streams(mode, kw, T, pad=True, seed=1)
    q, k, v = qkv(streams.attn_mask.shape[-1], seed=2)
    dense = attend(q, k, v, streams.attn_mask, backend="sdpa")
    bm = stream_block_mask(mode, T, tgt_mask=tgt_mask, masked=masked, sparse_block=TILE, **kw)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = attend(q, k, v, bm, backend="flex", compiled=False)
    assert (flex - dense).abs().max().item() <= TOL, mode


def test_flex_compiled_equals_sdpa_every_mode():
    """Compiled FlexAttention (inductor's C++ kernel on CPU) skips the empty tiles: equal to dense SDPA for every
    mode's padded mask. All layouts are 60x60, so one compilation serves them all."""
    with torch.no_grad():
        for i, (mode, kw, T) in enumerate(LAYOUTS):
            streams, _, _ = make_streams(mode, kw, T, pad=True, seed=3 + i)
            q, k, v = qkv(60, seed=20 + i)
            bm = block_mask_from_dense(streams.attn_mask, TILE)
            if mode != "nar_bidir":
                assert (block_kinds(bm) == 0).any(), f"{mode}: expected skipped tiles"
            flex = attend(q, k, v, streams.attn_mask, backend="flex")
            dense = attend(q, k, v, streams.attn_mask, backend="sdpa")
            assert (flex - dense).abs().max().item() <= TOL, mode

        # The compiled kernel really skips tiles: give it a mask_mod that shows everything but a block list
        # that is causal at tile level; the result is tile-causal attention, not full attention.
        everything = block_mask_from_dense(torch.ones(B, 60, 60, dtype=torch.bool), TILE)
        causal = block_mask_from_dense(torch.ones(60, 60, dtype=torch.bool).tril().expand(B, 60, 60).clone(), TILE)
        tiles_only = copy.copy(causal)  # same tensors, so the same compiled kernel
        tiles_only.mask_mod = everything.mask_mod
        q, k, v = qkv(60, seed=40)
        tile = torch.arange(60) // TILE
        tile_causal = (tile[:, None] >= tile[None, :]).expand(B, 60, 60)
        got = attend(q, k, v, tiles_only, backend="flex")
        assert (got - attend(q, k, v, tile_causal, backend="sdpa")).abs().max().item() <= TOL
        assert (got - attend(q, k, v, torch.ones(B, 60, 60, dtype=torch.bool))).abs().max().item() > 0.1


def test_flex_compiled_janus_stream_mask_mod():
    """The janus rule compiled as arithmetic on (row, column) plus per-batch masked/padding tensors."""
    streams, tgt_mask, masked = make_streams("janus", {}, 12, pad=True, seed=50)
    bm = stream_block_mask("janus", 12, tgt_mask=tgt_mask, masked=masked, sparse_block=TILE)
    q, k, v = qkv(60, seed=51)
    with torch.no_grad():
        flex = attend(q, k, v, bm, backend="flex")
    dense = attend(q, k, v, streams.attn_mask, backend="sdpa")
    assert (flex - dense).abs().max().item() <= TOL


def test_flex_gradients():
    """Where CUDA is present: flex gradients equal dense ones. On CPU torch 2.13 has no FlexAttention backward,
    and attend says so instead of failing somewhere inside torch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    streams, tgt_mask, masked = make_streams("janus", {}, 12, pad=True, seed=60)
    bm = stream_block_mask("janus", 12, tgt_mask=tgt_mask.to(device), masked=masked.to(device), device=device,
                           sparse_block=TILE)
    q, k, v = qkv(60, seed=61, requires_grad=True, device=device)
    if device == "cpu":
        with pytest.raises(NotImplementedError, match="no backward on CPU"):
            attend(q, k, v, bm, backend="flex")
        return
    grads = []
    for backend, mask in (("flex", bm), ("sdpa", streams.attn_mask.to(device))):
        out = attend(q, k, v, mask, backend=backend)
        grads.append(torch.autograd.grad((out * out).sum(), (q, k, v)))
    for g_flex, g_dense in zip(*grads):
        assert (g_flex - g_dense).abs().max().item() <= TOL


def test_flex_with_dropout_runs_dense_sdpa():
    streams, _, _ = make_streams("bang", {"n_predict": 2}, 20, pad=True, seed=70)
    q, k, v = qkv(60, seed=71)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="no attention dropout"):
        flex = attend(q, k, v, block_mask_from_dense(streams.attn_mask, TILE), dropout_p=0.3, backend="flex")
    torch.manual_seed(5)
    dense = attend(q, k, v, streams.attn_mask, dropout_p=0.3, backend="sdpa")
    assert torch.equal(flex, dense)


def test_block_mask_cache_follows_the_mask_tensor():
    mask = torch.ones(1, 32, 32, dtype=torch.bool).tril()
    first = block_mask_from_dense(mask, TILE)
    assert block_mask_from_dense(mask, TILE) is first  # every layer of a forward reuses it
    mask[0, 0, 1] = True  # changed in place: rebuilt
    assert block_mask_from_dense(mask, TILE) is not first
    assert stream_block_mask("ar", 32, sparse_block=TILE) is stream_block_mask("ar", 32, sparse_block=TILE)


def test_backend_choice():
    assert default_backend("cpu") == "sdpa"
    assert default_backend(torch.device("cuda", 0)) == "flex"
    q, k, v = qkv(4, seed=0)
    with pytest.raises(ValueError, match="attention backend 'xformers' is unknown"):
        attend(q, k, v, torch.ones(1, 4, 4, dtype=torch.bool), backend="xformers")


def test_dropout_takes_sdpa_and_only_the_dense_mask_is_built():
    """FlexAttention has no dropout: a training forward with attention dropout resolves to SDPA, so the model
    hands its layers the dense mask and builds no BlockMask; without dropout (eval) flex gets only a BlockMask."""
    from model.attention import resolve_backend
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel

    assert resolve_backend("auto", "cuda", 0.0) == "flex" and resolve_backend("auto", "cuda", 0.1) == "sdpa"
    assert resolve_backend("flex", "cpu", 0.0) == "flex" and resolve_backend("auto", "cpu", 0.0) == "sdpa"
    model = Seq2SeqModel(ModelConfig.preset("tiny", attention_backend="flex", attention_dropout=0.1))
    streams, _, _ = make_streams("bang", {"n_predict": 2}, 20, pad=True)
    mask = model.train().self_attention_mask(streams, torch.device("cpu"))
    assert isinstance(mask, torch.Tensor) and mask is streams.attn_mask
    fresh, _, _ = make_streams("bang", {"n_predict": 2}, 20, pad=True)
    assert isinstance(model.eval().self_attention_mask(fresh, torch.device("cpu")), BlockMask)
    assert "attn_mask" not in vars(fresh)  # the flex forward never built the dense mask


def test_a_new_length_compiles_nothing_new():
    """The stream length enters every mask_mod as a tensor, and CUDA compiles with dynamic shapes
    (flex_compile_options): after the second length (the mask_mod's per-batch tensors turn dynamic there), later
    lengths compile nothing. Counted with a backend that records compilations (runs on CPU; dynamo's guards are
    the same on CUDA). With T a Python int in the mask_mod, every length compiled anew."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from model.attention import flex_compile_options, stream_mask_mod

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    options = flex_compile_options("cuda")
    flex = torch.compile(flex_attention, backend=counting, **options)
    build = torch.compile(create_block_mask, backend=counting, **options)
    after_two = None
    for i, T in enumerate((16, 24, 40, 56, 72)):
        if i == 2:
            after_two = len(graphs)
        L = 3 * T
        tgt_mask = torch.ones(B, T, dtype=torch.bool)
        tgt_mask[1, T // 2:] = False
        mask_mod = stream_mask_mod("bang", T, n_predict=2, tgt_mask=tgt_mask)
        bm = build(mask_mod, B, None, L, L, device="cpu", BLOCK_SIZE=TILE)
        reference = create_block_mask(mask_mod, B, None, L, L, device="cpu", BLOCK_SIZE=TILE)
        assert torch.equal(bm.kv_num_blocks, reference.kv_num_blocks)
        assert torch.equal(bm.kv_indices, reference.kv_indices)
        q, k, v = qkv(L, seed=T)
        with torch.no_grad():
            out = flex(q, k, v, block_mask=bm)
        streams = build_streams("bang", prev_tokens=torch.ones(B, T, dtype=torch.long), tgt_mask=tgt_mask,
                                n_predict=2)
        assert (out - attend(q, k, v, streams.attn_mask)).abs().max().item() <= TOL
    assert after_two <= 3 and len(graphs) == after_two, (after_two, len(graphs))
