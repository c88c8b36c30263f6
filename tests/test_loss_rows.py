"""The LM head only on the rows a loss uses (issue 10, item 7), value by value against the formulas it replaced.

BANG runs the head on its trained (stream, target) rows alone, JANUS on the real target rows once per view with
one log-softmax serving its cross entropies and KL terms. The references below are the previous formulas (the
head on every row; JANUS's KLs on a second head pass over the masked rows), kept here verbatim in substance.
Losses, every metric (sum and count) and every parameter gradient agree to TOL (fp32); the head sees exactly the
rows counted on the host (span_counts / n_tokens), or every row when a batch does not carry the counts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import finetune.objectives  # noqa: F401  (registers janus)
from finetune.objectives import JanusObjective, length_targets, masked_mean
from model import parallel
from model.config import SPECIAL, ModelConfig
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams
from pretrain.objectives import build
from pretrain.core.objectives import gather_rows, masked_sum

TOL = 2e-5  # relative, fp32


@pytest.fixture(scope="module")
def model():
    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    return Seq2SeqModel(ModelConfig.preset("tiny", vocab_size=512, init_std=0.3))  # views that disagree: KL > 0


def make_batch(B: int = 4, S: int = 10, T: int = 12, seed: int = 0) -> dict:
    """Real-looking shapes: uneven padding, BANG spans of 5 (the last one cut short), host-side counts."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, T - 3, T - 5, 2])[:B]
    real = torch.arange(T)[None] < lengths[:, None]
    tgt = torch.randint(6, 500, (B, T), generator=g).masked_fill(~real, SPECIAL.pad)
    tgt[torch.arange(B), lengths - 1] = SPECIAL.eos
    prev = torch.cat([torch.full((B, 1), SPECIAL.bos), tgt[:, :-1]], 1).masked_fill(~real, SPECIAL.pad)
    span = torch.where(real, torch.arange(T).expand(B, T) % 5, torch.full((B, T), -1))
    return {"src_tokens": torch.randint(6, 500, (B, S), generator=g), "tgt_tokens": tgt, "prev_tokens": prev,
            "tgt_positions": torch.arange(1, T + 1).expand(B, T) * real, "span_index": span,
            "span_counts": torch.bincount(span[real]).tolist(), "n_tokens": int(real.sum())}


def without_counts(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("span_counts", "n_tokens")}


# --- the previous formulas ------------------------------------------------------------------------------------

def bang_reference(model, batch, n: int, weights: list[float], label_smoothing: float):
    tgt, span = batch["tgt_tokens"], batch["span_index"]
    real = tgt != SPECIAL.pad
    streams = build_streams("bang", prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                            tgt_mask=real, n_predict=n)
    hidden = model.decode(model.encode(batch["src_tokens"]), streams).hidden
    B, T = tgt.shape
    per_stream = model.token_loss(hidden[:, T:], tgt.repeat(1, n), label_smoothing).view(B, n, T).transpose(0, 1)
    total = per_stream.new_zeros(())
    metrics = {}
    for s in range(n):
        trained = real & (span >= s)
        total = total + weights[s] * (per_stream[s] * trained).sum()
        metrics[f"bang/loss_s{s}"] = masked_sum(per_stream[s], trained)
    n_real = real.sum()
    metrics["bang/loss"] = (total.detach(), n_real.to(total.dtype))
    return total / n_real.clamp(min=1), metrics


def janus_reference(objective: JanusObjective, model, batch):
    symmetric_kl = lambda a, b: 0.5 * ((a.exp() * (a - b)).sum(-1) + (b.exp() * (b - a)).sum(-1))  # noqa: E731
    tgt = batch["tgt_tokens"]
    real = tgt != SPECIAL.pad
    masked = objective.draw_masked(tgt) & real
    (h_ar, h_c, h_q), length_logits = objective.forward_views(model, batch, masked)
    ls = objective.label_smoothing
    ar, ar_e = masked_mean(model.token_loss(h_ar, tgt, ls), real)
    nar_c, c_e = masked_mean(model.token_loss(h_c, tgt, ls), masked)
    nar_q, q_e = masked_mean(model.token_loss(h_q, tgt, ls), masked)
    logp_ar, logp_c, logp_q = (F.log_softmax(model.logits(h[masked]).float(), -1) for h in (h_ar, h_c, h_q))
    kl_ar_c = symmetric_kl(logp_ar, logp_c).mean()
    kl_ar_q = symmetric_kl(logp_ar, logp_q).mean()
    kl_c_q = symmetric_kl(logp_c, logp_q).mean()
    length = F.cross_entropy(length_logits.float(), length_targets(tgt, model.cfg.n_length_classes))
    loss = (ar + objective.w_ar_c * kl_ar_c + objective.w_ar_q * kl_ar_q + 0.5 * (nar_q + nar_c)
            + objective.length_weight * length + objective.w_c_q * kl_c_q)
    one = loss.new_ones(())
    return loss, {"janus/loss": (loss.detach(), one), "janus/ar": ar_e, "janus/nar_content": c_e,
                  "janus/nar_query": q_e, "janus/length": (length.detach(), one),
                  "janus/kl_ar_content": (kl_ar_c.detach(), one), "janus/kl_ar_query": (kl_ar_q.detach(), one),
                  "janus/kl_content_query": (kl_c_q.detach(), one)}


# --- comparison -------------------------------------------------------------------------------------------------

def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss, metrics = fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def assert_same(new, old):
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = new, old
    assert torch.allclose(loss, ref_loss, rtol=TOL, atol=0), (float(loss), float(ref_loss))
    assert metrics.keys() == ref_metrics.keys()
    for name, (total, count) in metrics.items():
        assert torch.allclose(total, ref_metrics[name][0], rtol=TOL, atol=1e-6), name
        assert float(count) == float(ref_metrics[name][1]), name
    assert grads.keys() == ref_grads.keys() and len(grads) >= 20
    for name, g in grads.items():
        scale = float(ref_grads[name].abs().max())
        assert float((g - ref_grads[name]).abs().max()) <= TOL * max(scale, 1e-3), name


@pytest.fixture
def head_rows(model, monkeypatch):
    """The number of rows each call of the LM head (logits_local) receives."""
    rows = []
    original = model.logits_local

    def counting(hidden):
        rows.append(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        return original(hidden)

    monkeypatch.setattr(model, "logits_local", counting)
    return rows


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("counted", [True, False])
def test_bang_head_on_trained_rows_only_equals_every_row(model, head_rows, label_smoothing, counted):
    batch = make_batch()
    weights = [1.0, 0.7, 0.4]
    bang = build("bang", n_streams=3, stream_weights=weights, label_smoothing=label_smoothing)
    new = loss_and_grads(model, lambda: bang.loss(model, batch if counted else without_counts(batch)))
    head_new = list(head_rows)
    old = loss_and_grads(model, lambda: bang_reference(model, batch, 3, weights, label_smoothing))
    assert_same(new, old)
    real, span = batch["tgt_tokens"] != SPECIAL.pad, batch["span_index"]
    trained = sum(int((real & (span >= s)).sum()) for s in range(3))
    B, T = batch["tgt_tokens"].shape
    assert trained == bang.trained_rows(batch) < 3 * B * T // 2  # fewer than half the rows carry a loss here
    assert head_new == [trained if counted else 3 * B * T]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("counted", [True, False])
def test_janus_one_log_softmax_per_view_on_real_rows_equals_the_former_loss(model, head_rows, label_smoothing,
                                                                              counted):
    batch = make_batch(seed=1)
    janus = JanusObjective(label_smoothing=label_smoothing, seed=5)
    new = loss_and_grads(model, lambda: janus.loss(model, batch if counted else without_counts(batch)))
    head_new = list(head_rows)
    head_rows.clear()
    janus.generator.manual_seed(5)  # the same masks
    old = loss_and_grads(model, lambda: janus_reference(janus, model, batch))
    assert_same(new, old)
    assert min(float(new[1][k][0]) for k in ("janus/kl_ar_content", "janus/kl_ar_query")) > 1e-3
    B, T = batch["tgt_tokens"].shape
    n_real = batch["n_tokens"]
    assert head_new == [n_real if counted else B * T] * 3  # once per view
    assert head_rows[:3] == [B * T] * 3 and len(head_rows) == 6  # formerly: every row, then the masked rows again
    assert n_real < B * T


def test_gather_rows_keeps_order_pads_to_the_host_size_and_never_reads_the_data():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    rows, valid = gather_rows(mask, 4)
    assert rows.tolist() == [1, 2, 4, 7] and valid.all()
    rows, valid = gather_rows(mask, 6)  # a bound above the count: padded with row 0, marked invalid
    assert rows[:4].tolist() == [1, 2, 4, 7] and rows[4:].tolist() == [0, 3] and valid.tolist() == [1] * 4 + [0] * 2
    # On the meta device nothing has a value: an output shape that depended on the data (nonzero, h[mask]) would
    # fail here, as it would make a CUDA step wait for the count.
    rows, valid = gather_rows(torch.empty(3, 50, dtype=torch.bool, device="meta"), 40)
    assert rows.shape == valid.shape == (40,) and rows.device.type == "meta"
