"""Finetuning objectives on a tiny real model: JANUS loss algebra, gradient paths, and the NAR/AR plug-ins."""
import pytest
import torch
import torch.nn.functional as F

import finetune.objectives  # noqa: F401  (registers ar, nar, bang_mixed, janus)
from finetune.objectives import JanusObjective, length_targets, symmetric_kl
from model.config import SPECIAL, ModelConfig
from model.seq2seq import Seq2SeqModel
from pretrain.objectives import build


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
    token, length = float(m["nar/token_loss"][0] / m["nar/token_loss"][1]), float(m["nar/length_loss"][0])
    assert abs(float(loss) - (token + 0.1 * length)) < 1e-4


def test_bang_mixed_ratio_extremes_pick_ar_or_nar(model):
    batch = tiny_batch()
    _, ar_metrics = build("bang_mixed", nar_ratio=0.0).loss(model, batch)
    _, nar_metrics = build("bang_mixed", nar_ratio=1.0).loss(model, batch)
    assert set(ar_metrics) == {"ar/loss"} and "nar/loss" in nar_metrics
    with pytest.raises(ValueError, match="nar_ratio"):
        build("bang_mixed", nar_ratio=1.5)
