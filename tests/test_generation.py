"""Decoding modes (model/generation/) on tiny random models: the main-stream KV cache against the full forward,
batching, beam search rules, semi-NAR, NAR post-processing, mask-predict and ELMER early exit.

Random weights use init_std=0.2 so that argmax decisions are clear (logit gaps far above float noise), and a
scaled-down decoder input embedding so that outputs vary (see tiny_model).
Tolerance for logits compared value by value: 1e-5 (fp32).
"""
import math

import pytest
import torch

from model.config import SPECIAL, ModelConfig
from model.generation import MODES, DecodeOptions, decode, get_mode
from model.generation.common import constrain_step, log_probs
from model.generation.incremental import ArStepper, run_block
from model.generation.lengths import length_beam
from model.generation.postprocess import collapse_repeats, cut_at_eos, finish_text, nar_postprocess
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams

TOL = 1e-5
EOS, BOS, PAD = SPECIAL.eos, SPECIAL.bos, SPECIAL.pad


def tiny_model(norm: str = "pre", seed: int = 0) -> Seq2SeqModel:
    """A random model whose outputs vary: with the decoder input embedding scaled down, a random model no
    longer just echoes its input token through the tied embedding (pre-LN keeps the logit gaps wide)."""
    torch.manual_seed(seed)
    model = Seq2SeqModel(ModelConfig.preset("tiny", norm=norm, init_std=0.2, n_decoder_layers=3)).eval()
    with torch.no_grad():
        model.decoder_embed_norm.weight.mul_(0.1)
    return model


def sources(seed: int = 1, batch: int = 4, length: int = 9) -> torch.Tensor:
    """Random sources ending in EOS, with different amounts of right padding."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(6, 1024, (batch, length), generator=g)
    for b in range(batch):
        real = length - (b % 3) * 2
        src[b, real - 1] = EOS
        src[b, real:] = PAD
    return src


def boost_eos(model: Seq2SeqModel, strength: float = 3.0) -> Seq2SeqModel:
    """Make EOS the likely token everywhere: the bias of the decoder's last norm and the (tied) EOS embedding
    row share a direction, so every hidden state gets strength*|u|^2 extra on the EOS logit (TP=1 only)."""
    last_norm = model.decoder_final_norm if model.cfg.norm == "pre" else model.decoder_layers[-1].ffn.norm
    u = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        last_norm.bias.copy_(u)
        model.embed_tokens.weight[EOS] = strength * u
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def src():
    return sources()


def has_repeated_ngram(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


# --- KV cache against the full forward -------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("source", ["ar", "bang_ar"])
def test_cached_steps_equal_full_forward(norm, source):
    model = tiny_model(norm)
    src = sources()
    steps = 10
    opts = DecodeOptions(ar_logits=source, min_len=steps, max_len=steps)
    out = decode("ar_greedy", model, src, opts).tokens
    assert all(len(row) == steps for row in out)
    target = torch.tensor([row + [EOS] for row in out])  # [B, steps+1]
    prev = torch.cat([torch.full((len(out), 1), BOS), target[:, :-1]], dim=1)
    with torch.no_grad():
        enc = model.encode(src)
        streams = build_streams(source, prev_tokens=prev)
        hidden = model.decode(enc, streams).hidden
        full = model.logits(streams.slice(hidden, "main" if source == "ar" else "predict0"))
        stepper = ArStepper(model, enc, source)
        for t in range(steps + 1):
            step_logits = model.logits(stepper.step(prev[:, t]))
            assert (step_logits - full[:, t]).abs().max().item() <= TOL, f"step {t}"
        # greedy's tokens are the argmax of the full forward under the same constraints
        logp = log_probs(model, streams.slice(hidden, "main" if source == "ar" else "predict0"))
        for t in range(steps + 1):
            constrain_step(logp[:, t], t, steps, opts)
        assert torch.equal(logp.argmax(-1), target)
    assert stepper.cache.length == steps + 1  # only main-stream rows were cached


def test_semi_nar_blocks_equal_full_semi_nar_forward(model, src):
    k, steps = 3, 8
    opts = DecodeOptions(block_size=k, min_len=steps, max_len=steps, postprocess=False)
    result = decode("semi_nar", model, src, opts)
    assert result.figures["decoder_passes"] == math.ceil((steps + 1) / k)
    target = torch.tensor([row + [EOS] for row in result.tokens])
    prev = torch.cat([torch.full((len(target), 1), BOS), target[:, :-1]], dim=1)
    with torch.no_grad():
        enc = model.encode(src)
        streams = build_streams("semi_nar", prev_tokens=prev, block_size=k)
        full_hidden = streams.slice(model.decode(enc, streams).hidden, "predict0")
        cache, main = model.new_cache(), prev[:, :1]
        for start in range(0, steps + 1, k):
            n = min(k, steps + 1 - start)
            block = run_block(model, enc, cache, main, n)[:, -n:]
            diff = (model.logits(block) - model.logits(full_hidden[:, start:start + n])).abs().max().item()
            assert diff <= TOL, f"block at {start}"
            main = target[:, start:start + n]
        logp = log_probs(model, full_hidden)
        for t in range(steps + 1):
            constrain_step(logp[:, t], t, steps, opts)
        assert torch.equal(logp.argmax(-1), target)


# --- batching and beam search ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODES))
def test_batched_equals_one_by_one(model, src, name):
    opts = DecodeOptions(max_len=12, beam_size=3, length_beam=2, block_size=3, iterations=3, exit_entropy=5.6,
                         no_repeat_ngram_size=3 if name.startswith("ar") else 0)
    batched = decode(name, model, src, opts)
    for b in range(src.shape[0]):
        alone_src = src[b:b + 1, :int((src[b] != PAD).sum())]  # alone: no padding at all
        alone = decode(name, model, alone_src, opts)
        assert alone.tokens[0] == batched.tokens[b], f"example {b}"
        if batched.scores is not None:
            assert abs(alone.scores[0] - batched.scores[b]) <= TOL


@pytest.mark.parametrize("source", ["ar", "bang_ar"])
@pytest.mark.parametrize("extra", [{}, {"no_repeat_ngram_size": 2, "min_len": 3}])
def test_beam_one_equals_greedy(model, src, source, extra):
    opts = DecodeOptions(ar_logits=source, max_len=12, beam_size=1, length_penalty=1.3, **extra)
    assert decode("ar_beam", model, src, opts).tokens == decode("ar_greedy", model, src, opts).tokens


def test_beam_scores_are_length_normalised_log_probs(model, src):
    """The reported score equals sum log p(y + EOS) / (len+1)**lenpen recomputed by a full forward."""
    lenpen = 1.5
    result = decode("ar_beam", model, src, DecodeOptions(max_len=6, beam_size=3, length_penalty=lenpen))
    with torch.no_grad():
        enc = model.encode(src)
        for b, (ids, score) in enumerate(zip(result.tokens, result.scores)):
            target = torch.tensor([ids + [EOS]])
            prev = torch.cat([torch.tensor([[BOS]]), target[:, :-1]], dim=1)
            streams = build_streams("ar", prev_tokens=prev)
            one = type(enc)(enc.states[b:b + 1], enc.pad_mask[b:b + 1])
            logp = log_probs(model, model.decode(one, streams).hidden)
            for t in range(target.shape[1]):
                constrain_step(logp[:, t], t, 6, DecodeOptions(max_len=6))
            total = logp[0].gather(1, target[0][:, None]).sum().item()
            assert abs(total / target.shape[1] ** lenpen - score) <= 1e-4


@pytest.mark.parametrize("name", ["ar_greedy", "ar_beam"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_is_honoured(model, src, name, n):
    plain = decode(name, model, src, DecodeOptions(max_len=16, beam_size=3)).tokens
    assert any(has_repeated_ngram(row, n) for row in plain)  # the random model does repeat itself
    out = decode(name, model, src, DecodeOptions(max_len=16, beam_size=3, no_repeat_ngram_size=n)).tokens
    assert all(len(row) == 16 and not has_repeated_ngram(row, n) for row in out)


@pytest.mark.parametrize("name", ["ar_greedy", "ar_beam", "semi_nar"])
def test_min_and_max_length_are_honoured(src, name):
    eager = boost_eos(tiny_model())  # EOS is the argmax everywhere unless banned
    assert all(row == [] for row in decode(name, eager, src, DecodeOptions(beam_size=3)).tokens)
    out = decode(name, eager, src, DecodeOptions(beam_size=3, min_len=4, max_len=9, postprocess=False)).tokens
    assert all(len(row) == 4 for row in out)
    out = decode(name, tiny_model(), src, DecodeOptions(beam_size=3, max_len=7, postprocess=False)).tokens
    assert all(len(row) == 7 for row in out)  # the plain random model never emits EOS by itself: EOS forced


# --- semi-NAR ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"min_len": 4}])
def test_semi_nar_block_one_equals_bang_ar_greedy(model, src, extra):
    opts = DecodeOptions(block_size=1, max_len=12, ar_logits="bang_ar", postprocess=False, **extra)
    semi = decode("semi_nar", model, src, opts)
    greedy = decode("ar_greedy", model, src, opts)
    assert semi.tokens == greedy.tokens
    assert semi.figures["decoder_passes"] == greedy.figures["decoder_passes"]


def test_semi_nar_one_block_is_one_pass_after_bos(model, src):
    """With k > max_len there is one block: by the semi_nar mask every slot sees main row 0 (BOS) and the slots
    before it, so it equals the predict0 stream of a full semi_nar forward whatever the later main tokens are."""
    max_len = 10
    opts = DecodeOptions(block_size=max_len + 1, max_len=max_len, postprocess=False)
    result = decode("semi_nar", model, src, opts)
    assert result.figures["decoder_passes"] == 1
    B, T = src.shape[0], max_len + 1
    prev = torch.randint(6, 1024, (B, T), generator=torch.Generator().manual_seed(3))
    prev[:, 0] = BOS
    with torch.no_grad():
        streams = build_streams("semi_nar", prev_tokens=prev, block_size=T)
        logp = log_probs(model, streams.slice(model.decode(model.encode(src), streams).hidden, "predict0"))
        cached = run_block(model, model.encode(src), model.new_cache(), prev[:, :1], T)[:, 1:]
        full = model.logits(streams.slice(model.decode(model.encode(src), streams).hidden, "predict0"))
        assert (model.logits(cached) - full).abs().max().item() <= TOL
    logp[:, -1, :EOS] = -math.inf  # EOS forced at max_len
    logp[:, -1, EOS + 1:] = -math.inf
    assert result.tokens == [cut_at_eos(row) for row in logp.argmax(-1).tolist()]


# --- NAR ---------------------------------------------------------------------------------------------------

def test_nar_postprocessing_by_hand():
    e, b, p, m = EOS, BOS, PAD, SPECIAL.mask
    assert nar_postprocess([7, 7, 8, e, 9]) == [7, 8]
    assert nar_postprocess([e, 7, e, 8]) == [7]  # a leading EOS does not end an empty output
    assert nar_postprocess([e, e]) == []
    assert nar_postprocess([7, b, 7, 8, 8, m, p, p]) == [7, 8]  # repeats collapse across skipped ids
    assert nar_postprocess([7, 8, 7, 7]) == [7, 8, 7]
    assert nar_postprocess([9, 9, 9]) == [9]
    assert cut_at_eos([7, 7, e, 8]) == [7, 7]
    assert cut_at_eos([e, 7]) == []
    assert cut_at_eos([7, p, 8]) == [7, 8]
    assert collapse_repeats([5, 5, 6, 5, 5]) == [5, 6, 5]


def test_nar_postprocessing_on_pieces_and_on_words_with_real_sentencepiece(tiny):
    """BANG cleans the pieces and again the merged words; ELMER collapses repeated words. With the data pipeline's
    sentencepiece model, 'Woodhouse' is two pieces, so 'Woodhouse Woodhouse' has no repeated piece and only the
    word pass collapses it, while 'the the' is one repeated piece."""
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny.in_work("tokenizer"))
    woodhouse = tok.encode("Woodhouse")
    assert len(woodhouse) > 1 and tok.encode("Woodhouse Woodhouse") == woodhouse * 2  # ▁Wood house ▁Wood house
    the = tok.encode("the")
    assert len(the) == 1
    row = [EOS] + tok.encode("Woodhouse Woodhouse said the the news") + [EOS] + tok.encode("later")
    pieces = nar_postprocess(row)  # leading EOS skipped, cut at the second, ▁the ▁the collapsed
    assert pieces == tok.encode("Woodhouse Woodhouse said the news")
    text = tok.decode(pieces)
    assert text == "Woodhouse Woodhouse said the news"
    for mode in ("nar", "mask_predict", "early_exit", "semi_nar"):
        assert finish_text(text, mode, postprocess=True) == "Woodhouse said the news"
        assert finish_text(text, mode, postprocess=False) == text
    assert finish_text(text, "ar_beam", postprocess=True) == text  # AR outputs are never post-processed
    assert finish_text("Woodhouse  Woodhouse,\nWoodhouse", "nar", True) == "Woodhouse Woodhouse, Woodhouse"
    assert finish_text("a b a a\n", "nar", True) == "a b a"  # consecutive repeats only, one line


@pytest.mark.parametrize("nar_mode", ["nar_bidir", "nar_causal"])
@pytest.mark.parametrize("length_source", ["length_head", "source"])
@pytest.mark.parametrize("postprocess", [True, False])
def test_nar_one_pass_is_argmax_at_predicted_length(model, src, nar_mode, length_source, postprocess):
    opts = DecodeOptions(nar_mode=nar_mode, length_source=length_source, postprocess=postprocess)
    result = decode("nar", model, src, opts)
    with torch.no_grad():
        enc = model.encode(src)
        if length_source == "length_head":
            head = model.length_logits(enc)
            head[:, 0] = -math.inf
            lengths = head.argmax(1).tolist()
        else:
            lengths = (src != PAD).sum(1).tolist()
        for b, L in enumerate(lengths):
            one = type(enc)(enc.states[b:b + 1], enc.pad_mask[b:b + 1])
            streams = build_streams(nar_mode, length=L, batch_size=1)
            ids = log_probs(model, model.decode(one, streams).hidden).argmax(-1)[0].tolist()
            assert result.tokens[b] == (nar_postprocess(ids) if postprocess else cut_at_eos(ids))
    assert result.figures["decoder_passes"] == 1


def test_length_beam_is_argmax_plus_offsets_as_fairseq():
    """fairseq's length beam (IterativeRefinementGenerator): best + (-(l//2) .. l-1-l//2), clamped (to 1..cap
    here: one slot is the EOS alone)."""
    best = torch.tensor([1, 5, 9])
    assert length_beam(best, 3, cap=9).tolist() == [[1, 1, 2], [4, 5, 6], [8, 9, 9]]
    assert length_beam(best, 4, cap=9).tolist() == [[1, 1, 1, 2], [3, 4, 5, 6], [7, 8, 9, 9]]
    assert length_beam(best, 1, cap=9).tolist() == [[1], [5], [9]]


@pytest.mark.parametrize("rule", ["offsets", "top"])
def test_nar_length_beam_picks_best_mean_log_prob(model, src, rule):
    """The candidates: fairseq's argmax -1, 0, +1 by default, the 3 likeliest classes with length_candidates=top
    (the two differ on every row here); the candidate with the best mean log-prob wins."""
    beam = decode("nar", model, src, DecodeOptions(length_beam=3, postprocess=False, length_candidates=rule))
    with torch.no_grad():
        head = model.length_logits(model.encode(src))
        head[:, 0] = -math.inf
        top = head.topk(3, dim=1).indices.tolist()
        offsets = [[max(L - 1, 1), L, L + 1] for L in head.argmax(1).tolist()]  # an argmax of 1 gives 1, 1, 2
        assert all(sorted(a) != sorted(b) for a, b in zip(offsets, top))
    candidates = offsets if rule == "offsets" else top
    single = {L: decode("nar", model, src, DecodeOptions(length_source="fixed", fixed_length=L, postprocess=False))
              for L in {L for row in candidates for L in row}}
    for b in range(src.shape[0]):
        best = max(candidates[b], key=lambda L: single[L].scores[b])
        assert beam.tokens[b] == single[best].tokens[b]
        assert abs(beam.scores[b] - single[best].scores[b]) <= TOL


def test_mask_predict_one_iteration_equals_nar_pass(model, src):
    for extra in ({"length_beam": 2}, {"length_source": "fixed", "fixed_length": 7}):
        opts = DecodeOptions(iterations=1, nar_mode="nar_bidir", **extra)
        mp, one = decode("mask_predict", model, src, opts), decode("nar", model, src, opts)
        assert mp.tokens == one.tokens and mp.scores == pytest.approx(one.scores, abs=TOL)
        assert mp.figures["decoder_passes"] == 1


@pytest.mark.parametrize("slots", ["content", "all"])
def test_mask_predict_refines_only_the_least_confident(model, src, slots):
    """Two iterations by hand: pass 0 over all slots, re-mask the floor((L-1)/2) least confident content slots
    (fairseq counts content tokens; the last slot, EOS, is never re-masked), predict those again. With
    remask_slots=all: the floor(L/2) least confident of all L slots."""
    L = 8
    opts = DecodeOptions(iterations=2, length_source="fixed", fixed_length=L, postprocess=False, remask_slots=slots)
    result = decode("mask_predict", model, src, opts)
    assert result.figures["decoder_passes"] == 2
    eligible = L - 1 if slots == "content" else L
    with torch.no_grad():
        enc = model.encode(src)
        streams = build_streams("nar_bidir", length=L, batch_size=src.shape[0])
        p0, tok0 = log_probs(model, model.decode(enc, streams).hidden).max(-1)
        remask = torch.zeros_like(tok0, dtype=torch.bool)
        remask.scatter_(1, p0[:, :eligible].argsort(1)[:, :eligible // 2], True)  # 3 of 7, or 4 of 8
        assert (p0[:, L - 1] < p0[:, :L - 1].sort(1).values[:, 3]).any()  # the EOS slot is among the 4 lowest
        streams = build_streams("nar_bidir", tgt_tokens=tok0, masked=remask)
        p1, tok1 = log_probs(model, model.decode(enc, streams).hidden).max(-1)
        final = torch.where(remask, tok1, tok0)
        score = torch.where(remask, p1, p0).mean(1)
    assert result.tokens == [cut_at_eos(row) for row in final.tolist()]
    assert result.scores == pytest.approx(score.tolist(), abs=TOL)


# --- ELMER early exit --------------------------------------------------------------------------------------

def test_early_exit_infinite_threshold_exits_at_layer_one(model, src):
    opts = DecodeOptions(exit_entropy=math.inf, postprocess=False, length_source="source")
    result = decode("early_exit", model, src, opts)
    assert result.figures["mean_exit_layer"] == 1.0 and result.figures["layers_run"] == 1
    with torch.no_grad():
        enc = model.encode(src)
        for b, L in enumerate((src != PAD).sum(1).tolist()):
            one = type(enc)(enc.states[b:b + 1], enc.pad_mask[b:b + 1])
            streams = build_streams("nar_bidir", length=L, batch_size=1)
            layer1 = model.decode(one, streams, keep_layer_states=True).layer_states[0]
            ids = log_probs(model, model.decoder_final_norm(layer1)).argmax(-1)[0].tolist()
            assert result.tokens[b] == cut_at_eos(ids)


def test_early_exit_fixed_layer(model, src):
    """exit_layer=k: every slot leaves at layer k (k layers run), its tokens the argmax of layer k's off-ramp;
    k = L is the plain NAR pass. The entropy threshold is then unused."""
    L = model.cfg.n_decoder_layers
    real = torch.arange(src.shape[1])[None] < (src != PAD).sum(1)[:, None]
    with torch.no_grad():
        states = model.decode(model.encode(src), build_streams("nar_bidir", tgt_mask=real),
                              keep_layer_states=True).layer_states
    outputs = {}
    for k in range(1, L + 1):
        opts = DecodeOptions(exit_layer=k, exit_entropy=math.inf, length_source="source", postprocess=False)
        result = decode("early_exit", model, src, opts)
        assert result.figures["mean_exit_layer"] == k and result.figures["layers_run"] == k
        ids = log_probs(model, model.decoder_final_norm(states[k - 1])).argmax(-1).tolist()
        assert result.tokens == [cut_at_eos(row[:n]) for row, n in zip(ids, real.sum(1).tolist())]
        outputs[k] = result.tokens
    assert outputs[1] != outputs[L]  # the layers' off-ramps disagree: the test tells them apart
    nar = decode("nar", model, src, DecodeOptions(length_source="source", postprocess=False, nar_mode="nar_bidir"))
    assert result.tokens == nar.tokens and result.scores == pytest.approx(nar.scores, abs=TOL)
    with pytest.raises(ValueError, match=f"decode.exit_layer={L + 1}: the model has {L} decoder layers"):
        decode("early_exit", model, src, DecodeOptions(exit_layer=L + 1))


def test_early_exit_minus_infinity_equals_nar_pass(model, src):
    opts = DecodeOptions(exit_entropy=-math.inf, length_beam=2, nar_mode="nar_bidir")
    result = decode("early_exit", model, src, opts)
    assert result.figures["mean_exit_layer"] == model.cfg.n_decoder_layers
    plain = decode("nar", model, src, opts)
    assert result.tokens == plain.tokens
    assert result.scores == pytest.approx(plain.scores, abs=TOL)


def test_early_exit_threshold_in_between(model, src):
    """A threshold at the median layer-1 entropy sends about half the slots out at layer 1."""
    with torch.no_grad():
        enc = model.encode(src)
        real = torch.arange(src.shape[1])[None] < (src != PAD).sum(1)[:, None]
        streams = build_streams("nar_bidir", tgt_mask=real)
        layer1 = model.decode(enc, streams, keep_layer_states=True).layer_states[0]
        logp = torch.log_softmax(model.logits(model.decoder_final_norm(layer1)), -1)
        entropy = -(logp.exp() * logp).sum(-1)[real]
    threshold = entropy.median().item() + 1e-4
    result = decode("early_exit", model, src, DecodeOptions(length_source="source", exit_entropy=threshold))
    share_at_one = (entropy < threshold).float().mean().item()
    assert 0.4 <= share_at_one <= 0.7
    assert 1.0 < result.figures["mean_exit_layer"] < model.cfg.n_decoder_layers


# --- interface ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("beam_size", 0), ("min_len", -1), ("max_len", 0), ("no_repeat_ngram_size", -2), ("length_beam", 0),
    ("block_size", 0), ("iterations", 0), ("ar_logits", "bang"), ("nar_mode", "janus"),
    ("length_source", "oracle"), ("exit_entropy", float("nan")), ("postprocess", "yes"), ("exit_layer", 0),
    ("exit_layer", 1.5), ("length_candidates", "best"), ("remask_slots", "eos"),
])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"decode.{field}="):
        DecodeOptions(**{field: value}).validate()


def test_interface_errors(model, src):
    with pytest.raises(ValueError, match="decode.min_len="):
        DecodeOptions(min_len=5, max_len=4).validate()
    with pytest.raises(ValueError, match="decode.min_len="):
        decode("ar_greedy", model, src, DecodeOptions(min_len=300, max_len=400))  # max_target_positions=256
    with pytest.raises(ValueError, match="decode.fixed_length="):
        decode("nar", model, src, DecodeOptions(length_source="fixed"))
    with pytest.raises(ValueError, match="decode.length_beam="):
        decode("nar", model, src, DecodeOptions(length_beam=5, max_len=3))
    with pytest.raises(ValueError, match="decoding mode 'beam'"):
        get_mode("beam")
    model.train()
    decode("ar_greedy", model, src, DecodeOptions(max_len=2))
    assert model.training  # the caller's mode is restored
    model.eval()
