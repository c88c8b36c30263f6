"""Decoder stream masks (model/streams.py) against matrices derived by hand from methods.md §1.3, §3.1, §7.4.

Layout: rows and columns run over [stream 0 (T) ; stream 1 (T) ; ...]; 1 = the row may attend to the column.
The main stream at index j holds y_{j-1} (index 0 is BOS); a predicting slot at index i stands for y_i.
"""
import pytest
import torch

from model.config import ModelConfig
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams, stream_names, structure_mask

T = 4


def grid(*rows: str) -> torch.Tensor:
    """'1000 1000' -> a bool row; spaces only separate streams for the reader."""
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows], dtype=torch.bool)


def mask_of(mode: str, T: int = T, **kw) -> torch.Tensor:
    """The batch mask of one unpadded sequence, as build_streams lays it out."""
    prev = torch.full((1, T), 7, dtype=torch.long)
    s = build_streams(mode, prev_tokens=prev, tgt_tokens=prev, **kw)
    return s.attn_mask[0]


CAUSAL = ["1000", "1100", "1110", "1111"]

# Main stream causal; predicting stream s at i: main 0..max(i-s, 0), stream m < s at i-s+m, itself.
BANG_AR = grid(
    "1000 0000", "1100 0000", "1110 0000", "1111 0000",
    "1000 1000", "1100 0100", "1110 0010", "1111 0001",
)
BANG_N2 = grid(
    "1000 0000 0000", "1100 0000 0000", "1110 0000 0000", "1111 0000 0000",  # main
    "1000 1000 0000", "1100 0100 0000", "1110 0010 0000", "1111 0001 0000",  # predict0: y_<i
    "1000 0000 1000", "1000 1000 0100", "1100 0100 0010", "1110 0010 0001",  # predict1: y_<i-1 + predict0 at i-1
)
# n=3, derived row by row from the rule above (stream s at i: main 0..max(i-s, 0), stream m at i-s+m for every
# m < s, itself). predict2 at i=2 sees predict0 at 0 AND predict1 at 1; at i=3 predict0 at 1 and predict1 at 2.
# A rule where stream s sees only stream s-1's diagonal drops the predict0 columns of rows predict2 i=2, 3.
BANG_N3 = grid(
    "1000 0000 0000 0000", "1100 0000 0000 0000", "1110 0000 0000 0000", "1111 0000 0000 0000",  # main
    "1000 1000 0000 0000", "1100 0100 0000 0000", "1110 0010 0000 0000", "1111 0001 0000 0000",  # predict0
    "1000 0000 1000 0000", "1000 1000 0100 0000", "1100 0100 0010 0000", "1110 0010 0001 0000",  # predict1
    "1000 0000 0000 1000", "1000 0000 1000 0100", "1000 1000 0100 0010", "1100 0100 0010 0001",  # predict2
)
# Semi-NAR block size k: slot i (block start b = k*(i//k)) sees main 0..b (BOS, y_<b) and slots b..i.
SEMI_K2 = grid(
    "1000 0000", "1100 0000", "1110 0000", "1111 0000",
    "1000 1000", "1000 1100", "1110 0010", "1110 0011",
)
SEMI_K4 = grid(
    "1000 0000", "1100 0000", "1110 0000", "1111 0000",
    "1000 1000", "1000 1100", "1000 1110", "1000 1111",
)
# JANUS (main, ar_query, content, revealed, nar_query), masked = [0, 1, 1, 0]. AR group = bang_ar.
# content rows: all content (unmasked tokens + placeholders). revealed row of masked i: unmasked content,
# placeholders > i, revealed (true) masked tokens <= i. query row of masked i: unmasked content, placeholders >= i,
# revealed masked tokens < i. Rows of unmasked positions in revealed/query are unused: they see only themselves.
JANUS_0110 = grid(
    "1000 0000 0000 0000 0000", "1100 0000 0000 0000 0000", "1110 0000 0000 0000 0000", "1111 0000 0000 0000 0000",
    "1000 1000 0000 0000 0000", "1100 0100 0000 0000 0000", "1110 0010 0000 0000 0000", "1111 0001 0000 0000 0000",
    "0000 0000 1111 0000 0000", "0000 0000 1111 0000 0000", "0000 0000 1111 0000 0000", "0000 0000 1111 0000 0000",
    "0000 0000 0000 1000 0000", "0000 0000 1011 0100 0000", "0000 0000 1001 0110 0000", "0000 0000 0000 0001 0000",
    "0000 0000 0000 0000 1000", "0000 0000 1111 0000 0000", "0000 0000 1011 0100 0000", "0000 0000 0000 0000 0001",
)
# masked = [1, 1, 0, 1]: the NAR part (content, revealed, nar_query rows x the same columns).
JANUS_1101_NAR = grid(
    "1111 0000 0000", "1111 0000 0000", "1111 0000 0000", "1111 0000 0000",
    "0111 1000 0000", "0011 1100 0000", "0000 0010 0000", "0010 1101 0000",
    "1111 0000 0000", "0111 1000 0000", "0000 0000 0010", "0011 1100 0000",
)


def test_ar_nar_masks_by_hand():
    assert torch.equal(mask_of("ar"), grid(*CAUSAL))
    assert torch.equal(mask_of("nar_causal"), grid(*CAUSAL))
    assert torch.equal(mask_of("nar_bidir"), grid("1111", "1111", "1111", "1111"))


def test_bang_masks_by_hand():
    assert torch.equal(mask_of("bang_ar"), BANG_AR)
    assert torch.equal(mask_of("bang", n_predict=1), BANG_AR)
    assert torch.equal(mask_of("bang", n_predict=2), BANG_N2)
    assert torch.equal(mask_of("bang", n_predict=3), BANG_N3)
    assert torch.equal(BANG_N3[:3 * T, :3 * T], BANG_N2)  # streams 0..2 do not depend on later streams


def test_semi_nar_masks_by_hand():
    assert torch.equal(mask_of("semi_nar", block_size=1), BANG_AR)  # k=1 is BANG AR
    assert torch.equal(mask_of("semi_nar", block_size=1), mask_of("bang_ar"))
    assert torch.equal(mask_of("semi_nar", block_size=2), SEMI_K2)
    assert torch.equal(mask_of("semi_nar", block_size=4), SEMI_K4)
    assert torch.equal(mask_of("semi_nar", block_size=9), SEMI_K4)  # k >= T: one block
    with pytest.raises(ValueError, match="block_size"):
        mask_of("semi_nar", block_size=0)


def test_janus_masks_by_hand():
    masked = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    tgt = torch.arange(10, 10 + 2 * T).view(2, T)
    s = build_streams("janus", prev_tokens=tgt, tgt_tokens=tgt, masked=masked)
    assert s.names == ("main", "ar_query", "content", "revealed", "nar_query")
    assert torch.equal(s.attn_mask[0], JANUS_0110)
    assert torch.equal(s.attn_mask[1, :2 * T], JANUS_0110[:2 * T])  # the AR group ignores `masked`
    assert not s.attn_mask[1, 2 * T:, :2 * T].any() and not s.attn_mask[1, :2 * T, 2 * T:].any()
    assert torch.equal(s.attn_mask[1, 2 * T:, 2 * T:], JANUS_1101_NAR)
    # Content rows show placeholders (slots) exactly at the masked positions, true tokens elsewhere.
    assert torch.equal(s.is_slot[:, 2 * T:3 * T], masked)
    assert not s.is_slot[:, 3 * T:4 * T].any() and s.is_slot[:, 4 * T:].all() and s.is_slot[:, T:2 * T].all()
    with pytest.raises(ValueError, match="masked"):
        build_streams("janus", prev_tokens=tgt, tgt_tokens=tgt)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("length", [4, 6])
def test_bang_rule_gold_prefix_through_any_depth(n, length):
    """Stream s at i sees exactly the gold tokens y_<i-s (main columns 0..max(i-s, 0)), directly and through any
    number of layers (cross-stream paths must not leak a later gold token): s = 0..n-1 preceding tokens masked."""
    mask = mask_of("bang", T=length, n_predict=n)
    K = n + 1
    assert mask.shape == (K * length, K * length)
    for s in range(n):
        for i in range(length):
            row = (s + 1) * length + i
            expected = set(range(0, max(i - s, 0) + 1))
            direct = {int(j) for j in torch.nonzero(mask[row, :length])[:, 0]}
            assert direct == expected, (s, i)
            # Main columns 1..m hold y_0..y_{m-1}: of the i preceding targets, exactly min(s, i) are hidden.
            assert i - (len(direct) - 1) == min(s, i), (s, i)
            reach = torch.zeros(K * length, dtype=torch.bool)
            reach[row] = True
            for _ in range(K * length):  # transitive closure
                reach = reach | mask[reach].any(0)
            assert {int(j) for j in torch.nonzero(reach[:length])[:, 0]} == expected, (s, i)


def test_bang_rule_in_the_model():
    """Changing gold token y_{j-1} (main index j >= 1) changes stream s's output at i iff j <= i - s."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=128, d_model=32, n_heads=4, d_ffn=64, n_decoder_layers=3)
    model = Seq2SeqModel(cfg).eval()
    n, L = 3, 6
    src = torch.randint(6, 128, (1, 5))
    prev = torch.randint(6, 128, (1, L))
    enc = model.encode(src)
    with torch.no_grad():
        base = model.decode(enc, build_streams("bang", prev_tokens=prev, n_predict=n)).hidden
        for j in range(1, L):
            changed = prev.clone()
            changed[0, j] = 6 + (int(prev[0, j]) - 5) % 122  # a different ordinary token
            out = model.decode(enc, build_streams("bang", prev_tokens=changed, n_predict=n)).hidden
            for s in range(n):
                for i in range(L):
                    row = (s + 1) * L + i
                    diff = float((out[0, row] - base[0, row]).abs().max())
                    if j <= i - s:
                        assert diff > 1e-4, (j, s, i, diff)
                    else:
                        assert diff == 0.0, (j, s, i, diff)


@pytest.mark.parametrize("mode,kw", [
    ("ar", {}), ("bang_ar", {}), ("bang", {"n_predict": 2}), ("bang", {"n_predict": 3}), ("nar_bidir", {}),
    ("nar_causal", {}), ("semi_nar", {"block_size": 2}), ("janus", {}),
])
def test_padding_masks_keys_and_never_empties_a_row(mode, kw):
    tgt_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    tgt = torch.arange(20, 32).view(3, T)
    masked = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    extra = {"masked": masked} if mode == "janus" else {}
    padded = build_streams(mode, prev_tokens=tgt, tgt_tokens=tgt, tgt_mask=tgt_mask, **kw, **extra)
    K = len(padded.names)
    key_valid = tgt_mask.repeat(1, K)
    m = padded.attn_mask
    assert m.shape == (3, K * T, K * T)
    assert m.any(-1).all(), "a row sees nothing"
    eye = torch.eye(K * T, dtype=torch.bool)
    for b in range(3):
        # Real rows: the unpadded structure with padded key columns removed.
        ref_extra = {"masked": masked[b:b + 1]} if mode == "janus" else {}
        full = build_streams(mode, prev_tokens=tgt[b:b + 1], tgt_tokens=tgt[b:b + 1], **kw, **ref_extra).attn_mask[0]
        want = full & key_valid[b][None, :]
        real = key_valid[b]
        assert torch.equal(m[b][real], want[real]), b
        # Every row: a padded key column is seen only by its own row, and then it is the only column that row sees.
        pad_cols = m[b] & ~key_valid[b][None, :]
        assert not (pad_cols & ~eye).any(), b
        self_only = pad_cols.any(-1)
        assert (m[b][self_only].sum(-1) == 1).all(), b
    assert torch.equal(m[0], build_streams(mode, prev_tokens=tgt[:1], tgt_tokens=tgt[:1], **kw,
                                           **({"masked": masked[:1]} if mode == "janus" else {})).attn_mask[0])
    assert torch.equal(m[2], torch.eye(K * T, dtype=torch.bool))  # an empty target: every row sees itself


def test_ar_padding_by_hand():
    s = build_streams("ar", prev_tokens=torch.ones(1, T, dtype=torch.long), tgt_mask=torch.tensor([[1, 1, 0, 0]]))
    assert torch.equal(s.attn_mask[0], grid("1000", "1100", "1100", "1100"))
    s = build_streams("nar_bidir", length=T, batch_size=1, tgt_mask=torch.tensor([[1, 1, 1, 0]]))
    assert torch.equal(s.attn_mask[0], grid("1110", "1110", "1110", "1110"))


def test_stream_layout_positions_and_slots():
    prev = torch.tensor([[2, 11, 12, 13]])
    pos = torch.tensor([[1, 2, 3, 4]])
    s = build_streams("bang", prev_tokens=prev, tgt_positions=pos, n_predict=2)
    assert s.names == ("main", "predict0", "predict1") and s.length == T
    assert s.positions.tolist() == [[0, 1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4]]  # main: pos-1, slots: pos
    assert s.is_slot.tolist() == [[False] * 4 + [True] * 8]
    assert s.ids[0, :T].tolist() == [2, 11, 12, 13]
    h = torch.arange(12.0).view(1, 12, 1)
    assert s.slice(h, "predict1").flatten().tolist() == [8.0, 9.0, 10.0, 11.0]
    nar = build_streams("nar_bidir", length=3, batch_size=2)
    assert nar.names == ("slots",) and nar.positions.tolist() == [[1, 2, 3]] * 2 and nar.is_slot.all()
    for mode, names in [("ar", ("main",)), ("bang_ar", ("main", "predict0")), ("semi_nar", ("main", "predict0")),
                        ("nar_causal", ("slots",))]:
        assert stream_names(mode) == names
    with pytest.raises(KeyError, match="predict2"):
        s.index("predict2")


def test_host_masks_are_cached_device_masks_built_there_and_streams_build_theirs_on_demand():
    a = structure_mask("bang", 5, 2, 1)
    assert structure_mask("bang", 5, 2, 1) is a
    assert structure_mask("semi_nar", 5, 1, 2) is structure_mask("semi_nar", 5, 1, 2)
    assert structure_mask("bang", 6, 2, 1) is not a and structure_mask("bang", 6, 2, 1).shape == (18, 18)
    on_meta = structure_mask("bang", 5, 2, 1, device="meta")  # built there from the rule, not copied
    assert on_meta.device.type == "meta" and on_meta.shape == a.shape and on_meta is not a
    streams = build_streams("bang", prev_tokens=torch.ones(2, 5, dtype=torch.long), n_predict=2)
    assert "attn_mask" not in vars(streams)  # a FlexAttention forward never asks for the dense mask
    assert torch.equal(streams.attn_mask[0], a) and "attn_mask" in vars(streams)
    with pytest.raises(ValueError, match="janus"):
        structure_mask("janus", 4)
