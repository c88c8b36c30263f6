"""Finetuning objectives on a tiny real model: JANUS loss algebra, gradient paths, and the NAR/AR plug-ins."""
import pytest
import torch
import torch.nn.functional as F

import finetune.objectives  # noqa: F401  (registers ar, nar, bang_mixed, janus)
from finetune.objectives import JanusObjective, length_targets, symmetric_kl
from model.config import SPECIAL, ModelConfig
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams
from pretrain.core import build


def tiny_batch(seed=0, B=3, S=7, T=8):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(6, 1024, (B, S), generator=g)
    tgt = torch.randint(6, 1024, (B, T), generator=g)
    tgt[:, -1] = SPECIAL.eos
    tgt[1, -2:] = SPECIAL.pad
    tgt[1, -3] = SPECIAL.eos
    prev = torch.cat([torch.full((B, 1), SPECIAL.bos), tgt[:, :-1]], 1)
    prev[1, -2:] = SPECIAL.pad
    pos = torch.arange(1, T + 1).expand(B, T) * (tgt != SPECIAL.pad)
    return dict(src_tokens=src, tgt_tokens=tgt, prev_tokens=prev, tgt_positions=pos)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A larger init than the tiny preset's makes the three views disagree, so the KL terms are not ~0.
    return Seq2SeqModel(ModelConfig.preset("tiny", init_std=0.3))


def test_symmetric_kl_zero_for_identical_and_symmetric():
    torch.manual_seed(1)
    a = F.log_softmax(torch.randn(5, 11), -1)
    b = F.log_softmax(torch.randn(5, 11), -1)
    assert symmetric_kl(a, a).abs().max().item() < 1e-7
    assert torch.allclose(symmetric_kl(a, b), symmetric_kl(b, a), atol=1e-7)
    # Against the definition: ½[KL(P‖Q) + KL(Q‖P)] with torch's kl_div (input = log Q, target = P).
    expected = 0.5 * (F.kl_div(b, a, log_target=True, reduction="none").sum(-1)
                      + F.kl_div(a, b, log_target=True, reduction="none").sum(-1))
    assert torch.allclose(symmetric_kl(a, b), expected, atol=1e-6)
    assert (symmetric_kl(a, b) > 0).all()


def janus_terms(model, objective, batch, seed=7):
    objective.generator.manual_seed(seed)
    loss, metrics = objective.loss(model, batch)
    return loss, {k: float(v[0] / v[1]) for k, v in metrics.items()}


def test_janus_total_is_the_configured_weighted_sum(model):
    batch = tiny_batch()
    base = JanusObjective()
    loss, m = janus_terms(model, base, batch)
    expected = (m["janus/ar"] + 1 * m["janus/kl_ar_content"] + 3 * m["janus/kl_ar_query"]
                + 0.5 * (m["janus/nar_query"] + m["janus/nar_content"]) + 0.1 * m["janus/length"]
                + 1 * m["janus/kl_content_query"])
    assert abs(float(loss) - expected) < 1e-4
    assert min(m["janus/kl_ar_content"], m["janus/kl_ar_query"], m["janus/kl_content_query"]) > 1e-4
    # Changing one weight changes the loss by exactly (Δw × that term), the masking being the same.
    heavier, m2 = janus_terms(model, JanusObjective(w_ar_q=5.0), batch)
    assert abs(float(heavier) - float(loss) - 2.0 * m["janus/kl_ar_query"]) < 1e-4
    no_kl, _ = janus_terms(model, JanusObjective(w_ar_c=0, w_ar_q=0, w_c_q=0), batch)
    kl_part = m["janus/kl_ar_content"] + 3 * m["janus/kl_ar_query"] + m["janus/kl_content_query"]
    assert abs(float(loss) - float(no_kl) - kl_part) < 1e-4


def test_janus_gradients_reach_ar_and_nar_paths(model):
    """The KL term alone sends gradient into both the AR query view and the NAR views: through the slot vector
    (used only by predicting / placeholder / query rows) and the main-stream token path (AR prefix)."""
    batch = tiny_batch()
    objective = JanusObjective()
    objective.generator.manual_seed(3)
    masked = objective.draw_masked(batch["tgt_tokens"]) & (batch["tgt_tokens"] != SPECIAL.pad)
    (h_ar, h_c, h_q), _ = objective.forward_views(model, batch, masked)
    kl = symmetric_kl(F.log_softmax(model.logits(h_ar[masked]), -1), F.log_softmax(model.logits(h_c[masked]), -1))
    h_ar.retain_grad(), h_c.retain_grad()
    model.zero_grad()
    kl.mean().backward()
    assert h_ar.grad[masked].abs().sum() > 0 and h_c.grad[masked].abs().sum() > 0
    assert model.slot_embed.grad.abs().sum() > 0


def test_janus_masking_spares_final_eos_and_hits_ratio():
    objective = JanusObjective(mask_ratio=0.5, seed=5)
    tgt = torch.randint(6, 100, (4, 21))
    tgt[:, -1] = SPECIAL.eos
    masked = objective.draw_masked(tgt)
    assert not masked[:, -1].any()
    assert (masked[:, :-1].sum(-1) >= 10).all()  # round(0.5 * 20) maskable targets at least


def test_nar_uniform_masking_and_length_loss(model):
    batch = tiny_batch()
    objective = build("nar", masking="uniform", seed=2)
    masked = objective.draw_masked(batch["tgt_tokens"])
    real = batch["tgt_tokens"] != SPECIAL.pad
    assert (masked <= real).all() and (masked.sum(-1) >= 1).all()
    assert length_targets(batch["tgt_tokens"], 64).tolist() == [8, 6, 8]
    loss, m = objective.loss(model, batch)
    token = float(m["nar/token_loss"][0] / m["nar/token_loss"][1])
    # The length term: each example's length cross entropy once per target token (8, 6, 8 targets).
    with torch.no_grad():
        ce = F.cross_entropy(model.length_logits(model.encode(batch["src_tokens"])), torch.tensor([8, 6, 8]),
                             reduction="none")
    assert abs(float(m["nar/length_loss"][0] / m["nar/length_loss"][1]) - float(ce.mean())) < 1e-5  # per example
    length = float((ce * torch.tensor([8.0, 6.0, 8.0])).sum() / 22)
    assert abs(float(loss) - (token + 0.1 * length)) < 1e-4


def nar_parts(model, batch):
    """Encoder output, nar_bidir streams over every target, the real-target mask and the length term by hand."""
    tgt = batch["tgt_tokens"]
    real = tgt != SPECIAL.pad
    enc = model.encode(batch["src_tokens"])
    streams = build_streams("nar_bidir", tgt_tokens=tgt, tgt_positions=batch["tgt_positions"], tgt_mask=real)
    ce = F.cross_entropy(model.length_logits(enc), length_targets(tgt, 64), reduction="none")
    n_targets = real.sum(-1).float()
    return enc, streams, real, float((ce * n_targets).sum() / n_targets.sum())


def test_nar_all_exits_average_every_layers_cross_entropy(model):
    """exits="all" (ELMER's finetuning): token term = mean over layers l of the label-smoothed CE of layer l's
    off-ramp, each computed here through the model's exit path (every slot exiting at l)."""
    batch = tiny_batch()
    loss, m = build("nar", exits="all").loss(model, batch)
    with torch.no_grad():
        enc, streams, real, length = nar_parts(model, batch)
        per_layer = []
        for layer in range(1, model.cfg.n_decoder_layers + 1):
            exits = torch.full_like(batch["tgt_tokens"], layer)
            hidden = model.decode(enc, streams, exit_layers=exits).hidden
            per_token = model.token_loss(hidden, batch["tgt_tokens"], 0.1)
            per_layer.append(float((per_token * real).sum() / real.sum()))
        _, last = build("nar", exits="last").loss(model, batch)
    assert len(per_layer) == 2 and abs(per_layer[0] - per_layer[1]) > 0.01  # the off-ramps differ
    token = sum(per_layer) / len(per_layer)
    assert abs(float(m["nar/token_loss"][0] / m["nar/token_loss"][1]) - token) < 1e-5
    assert abs(float(loss) - (token + 0.1 * length)) < 1e-5
    last_layer = float(m["nar/last_layer_loss"][0] / m["nar/last_layer_loss"][1])
    assert abs(last_layer - per_layer[-1]) < 1e-5
    assert abs(last_layer - float(last["nar/token_loss"][0] / last["nar/token_loss"][1])) < 1e-5


def test_nar_random_exits_are_lplm(model):
    """exits="random": each scored slot exits at a layer drawn uniformly from 1..L on the batch's device (shown
    and pad slots at L); the loss is the CE at those exits through model.decode(exit_layers=...). The draw repeats
    from the seed (resume, every rank) and every layer runs (no host sync, the same layers on every rank)."""
    objective = build("nar", exits="random", seed=3)
    scored = torch.rand(64, 50, generator=torch.Generator().manual_seed(0)) < 0.8
    exits = objective.draw_exits(scored, 6)
    assert (exits[~scored] == 6).all()
    share = torch.stack([(exits[scored] == layer).float().mean() for layer in range(1, 7)])
    n = int(scored.sum())
    assert (share - 1 / 6).abs().max() < 4 * (5 / 36 / n) ** 0.5  # uniform over 1..6 (4 standard deviations)

    batch = tiny_batch()
    with torch.no_grad():
        loss, m = build("nar", exits="random", seed=5).loss(model, batch)
        again, _ = build("nar", exits="random", seed=5).loss(model, batch)
        other, _ = build("nar", exits="random", seed=6).loss(model, batch)
        enc, streams, real, length = nar_parts(model, batch)
        exits = build("nar", exits="random", seed=5).draw_exits(real, model.cfg.n_decoder_layers)
        assert set(exits[real].tolist()) == {1, 2}
        out = model.decode(enc, streams, exit_layers=exits, keep_layer_states=True, stop_when_all_exited=False)
        per_token = model.token_loss(out.hidden, batch["tgt_tokens"], 0.1)
        token = float((per_token * real).sum() / real.sum())
    assert float(loss) == float(again) and float(loss) != float(other)
    assert abs(float(m["nar/token_loss"][0] / m["nar/token_loss"][1]) - token) < 1e-6
    assert abs(float(loss) - (token + 0.1 * length)) < 1e-5
    with torch.no_grad():  # all slots out at layer 1: the default stops there, training runs every layer
        ones = torch.ones_like(batch["tgt_tokens"])
        assert len(model.decode(enc, streams, exit_layers=ones, keep_layer_states=True).layer_states) == 1
        full = model.decode(enc, streams, exit_layers=ones, keep_layer_states=True, stop_when_all_exited=False)
        assert len(full.layer_states) == model.cfg.n_decoder_layers
    with pytest.raises(ValueError, match="objective.exits='some'"):
        build("nar", exits="some")


def concatenated(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


@pytest.mark.parametrize("name,kwargs", [("ar", {"stream": "ar"}), ("nar", {"masking": "all"}),
                                         ("nar", {"exits": "all"}), ("bang_mixed", {"nar_ratio": 1.0}),
                                         ("bang_mixed", {"nar_ratio": 0.0})])
def test_losses_split_over_ranks_like_the_global_batch(model, name, kwargs):
    """What the engine relies on (DP=2 and one process agree): the loss of a global batch equals its halves'
    losses weighted by their target counts; ar, nar (all slots, length term included) and bang_mixed."""
    first, second = tiny_batch(seed=1), tiny_batch(seed=2)
    second["tgt_tokens"][2, -4:] = SPECIAL.pad  # different target counts in the two halves
    second["prev_tokens"][2, -3:] = SPECIAL.pad
    second["tgt_positions"][2, -4:] = 0
    second["tgt_tokens"][2, -5] = SPECIAL.eos
    objective = build(name, **kwargs)
    with torch.no_grad():
        whole = float(objective.loss(model, concatenated(first, second))[0])
        parts = [(float(objective.loss(model, b)[0]), objective.num_targets(b)) for b in (first, second)]
    assert parts[0][1] != parts[1][1]
    weighted = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    assert abs(whole - weighted) < 1e-5, (whole, weighted, parts)


def test_evaluation_leaves_the_training_draws_alone(model):
    """eval_metrics draws from a fixed-seed copy: the same figures at every evaluation, and the training
    generator where it was (bang_mixed evaluates both paths; janus and CMLM-masked nar draw masks)."""
    batch = tiny_batch()
    for objective in (JanusObjective(seed=4), build("nar", masking="uniform", seed=4),
                      build("nar", exits="random", seed=4), build("bang_mixed", seed=4)):
        objective.uniform(3)  # training has drawn something
        before = objective.generator.get_state()
        with torch.no_grad():
            first = objective.eval_metrics(model, batch)
            second = objective.eval_metrics(model, batch)
        assert torch.equal(objective.generator.get_state(), before), objective.name
        assert {k: float(v[0]) for k, v in first.items()} == {k: float(v[0]) for k, v in second.items()}
    assert {"ar/loss", "nar/loss"} <= set(first)  # bang_mixed: both paths


def test_bang_mixed_ratio_extremes_pick_ar_or_nar(model):
    batch = tiny_batch()
    _, ar_metrics = build("bang_mixed", nar_ratio=0.0).loss(model, batch)
    _, nar_metrics = build("bang_mixed", nar_ratio=1.0).loss(model, batch)
    assert set(ar_metrics) == {"ar/loss"} and "nar/loss" in nar_metrics
    with pytest.raises(ValueError, match="nar_ratio"):
        build("bang_mixed", nar_ratio=1.5)


def sequential_span_masks(tgt: torch.Tensor, mask_ratio: float, span_lambda: float, generator) -> torch.Tensor:
    """The reference process, one example and one span at a time (what draw_masked did before it was vectorised)."""
    B, T = tgt.shape
    n_real = (tgt != SPECIAL.pad).sum(-1)
    masked = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        maskable = max(int(n_real[b]) - 1, 1)
        goal = max(1, round(mask_ratio * maskable))
        while int(masked[b, :maskable].sum()) < goal:
            span = max(1, int(torch.poisson(torch.tensor([span_lambda]), generator=generator)))
            start = int(torch.randint(0, maskable, (1,), generator=generator))
            masked[b, start:min(start + span, maskable)] = True
    return masked


def mask_statistics(masked: torch.Tensor) -> dict:
    runs = (masked[:, 1:] & ~masked[:, :-1]).sum(-1) + masked[:, 0].long()
    return {"count": masked.sum(-1).float(), "position": masked.float().mean(0), "runs": runs.float()}


def test_janus_vectorised_span_masking_keeps_the_sequential_statistics():
    """draw_masked draws all examples at once; the masks differ from the one-span-at-a-time process, but their
    law must not: masked counts (mean, histogram), per-position frequencies and the number of masked runs agree
    over 1000 examples of each of three lengths, within sampling noise (measured over three seeds: at most 0.09,
    0.07, 0.07, 0.05; a law that trims the last span to land exactly on the goal misses by 0.23 or more on the
    count mean and histogram; the same holds at mask_ratio 0.3, span_lambda 3.5). The invariants hold on every
    example. JANUS's defaults: mask_ratio 0.7, span_lambda 2."""
    mask_ratio, span_lambda = 0.7, 2.0
    lengths = [22, 14, 6]
    tgt = torch.full((3000, 24), SPECIAL.pad)
    for i, n in enumerate(lengths * 1000):
        tgt[i, :n] = 7
        tgt[i, n - 1] = SPECIAL.eos
    objective = JanusObjective(mask_ratio=mask_ratio, span_lambda=span_lambda, seed=11)
    fast = objective.draw_masked(tgt)
    slow = sequential_span_masks(tgt, mask_ratio, span_lambda, torch.Generator().manual_seed(12))
    real = tgt != SPECIAL.pad
    for n in lengths:
        rows = real.sum(-1) == n
        maskable, goal = n - 1, max(1, round(mask_ratio * (n - 1)))
        assert not fast[rows][:, maskable:].any()  # the final eos and the pads are never masked
        assert (fast[rows].sum(-1) >= goal).all()
        a, b = mask_statistics(fast[rows]), mask_statistics(slow[rows])
        assert abs(float(a["count"].mean() - b["count"].mean())) < 0.15, n
        histogram = lambda c: torch.bincount(c.long(), minlength=n + 1).float() / len(c)  # noqa: E731
        assert float((histogram(a["count"]) - histogram(b["count"])).abs().sum()) / 2 < 0.10, n  # total variation
        assert float((a["position"] - b["position"]).abs().max()) < 0.09, n
        assert abs(float(a["runs"].mean() - b["runs"].mean())) < 0.08, n
