"""Lead copying (finetune/lead_copy.py): a copy step's batch is the batch the task collator builds when each
example's target is its source's first `tokens` tokens; copy steps are the warm-up and every `every`-th step, and
only training batches of those steps are rewritten. And the lead baseline the demo's closing screen prints for
scale (finetune/showcase.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import finetune.objectives  # noqa: F401  (registers ar, nar, bang_mixed, janus)
from data_pipeline.tasks import TaskCollator
from finetune.config import LeadCopySection
from finetune.lead_copy import LeadCopy, enabled, lead_copy_batch, schedule_text
from finetune.showcase import lead_scores
from model.config import ModelConfig
from model.seq2seq import Seq2SeqModel
from pretrain.core import build

TOKENS = 5


def as_tensors(batch: dict) -> dict:
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def sources_and_targets():
    rng = np.random.default_rng(0)
    # lengths around TOKENS: a source shorter than the lead, one as long, longer ones
    srcs = [rng.integers(10, 200, n) for n in (3, 5, 9, 12)]
    tgts = [rng.integers(10, 200, n) for n in (4, 2, 7, 3)]
    return srcs, tgts


def collate(srcs, tgts) -> dict:
    return as_tensors(TaskCollator()([(i, {"src": s, "tgt": t}) for i, (s, t) in enumerate(zip(srcs, tgts))], 0, 0))


def test_lead_copy_batch_layout():
    batch = {"src_tokens": torch.tensor([[7, 8, 9, 10, 11], [7, 8, 0, 0, 0]]), "sample_ids": torch.tensor([3, 4])}
    out = lead_copy_batch(batch, tokens=4)
    assert out["tgt_tokens"].tolist() == [[7, 8, 9, 10, 3], [7, 8, 3, 0, 0]]
    assert out["prev_tokens"].tolist() == [[2, 7, 8, 9, 10], [2, 7, 8, 0, 0]]
    assert out["tgt_positions"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    assert out["n_tokens"] == 8
    assert out["src_tokens"] is batch["src_tokens"] and out["sample_ids"] is batch["sample_ids"]


def test_a_copy_batch_is_the_collated_batch_of_the_source_leads():
    srcs, tgts = sources_and_targets()
    copied = lead_copy_batch(collate(srcs, tgts), TOKENS)
    expected = collate(srcs, [s[:TOKENS] for s in srcs])
    for key in ("src_tokens", "tgt_tokens", "prev_tokens", "tgt_positions", "sample_ids"):
        assert torch.equal(copied[key], expected[key]), key
    assert copied["n_tokens"] == expected["n_tokens"] == 3 + 1 + 3 * (TOKENS + 1)


def test_copy_steps_are_the_warmup_and_every_kth_step_and_evaluation_is_never_rewritten():
    objective = LeadCopy(build("ar", stream="ar", label_smoothing=0.1), warmup_steps=3, every=4, tokens=TOKENS)
    assert [s for s in range(1, 17) if objective.is_copy_step(s)] == [1, 2, 3, 4, 8, 12, 16]
    assert [s for s in range(1, 9) if LeadCopy(objective.objective, 2, 0, TOKENS).is_copy_step(s)] == [1, 2]

    assert not enabled(LeadCopySection()) and enabled(LeadCopySection(every=3))
    assert schedule_text(LeadCopySection(warmup_steps=150, every=3, tokens=12)) == \
        "12 tokens: steps 1-150, then one step in 3"
    assert schedule_text(LeadCopySection(every=3)) == "16 tokens: one step in 3"

    srcs, tgts = sources_and_targets()
    batch = collate(srcs, tgts)
    objective.start_step(5)
    assert objective.prepare(batch) is batch
    objective.start_step(8)
    training = objective.prepare(batch)
    assert torch.equal(training["tgt_tokens"], lead_copy_batch(batch, TOKENS)["tgt_tokens"])
    assert objective.num_targets(training) == training["n_tokens"]
    assert objective.prepare(training) is training  # prepared twice, rewritten once
    assert torch.equal(objective.prepare(batch, evaluate=True)["tgt_tokens"], batch["tgt_tokens"])


@pytest.mark.parametrize("name,kwargs", [("ar", {"stream": "ar", "label_smoothing": 0.1}),
                                         ("bang_mixed", {"nar_ratio": 1.0, "seed": 3}),
                                         ("janus", {"seed": 3})])
def test_a_copy_step_is_the_wrapped_objective_on_the_copy_batch(name, kwargs):
    torch.manual_seed(0)
    model = Seq2SeqModel(ModelConfig.preset("tiny", vocab_size=256))
    srcs, tgts = sources_and_targets()
    batch = collate(srcs, tgts)
    wrapped = LeadCopy(build(name, **kwargs), warmup_steps=1, every=0, tokens=TOKENS)
    wrapped.start_step(1)
    loss, metrics = wrapped.loss(model, wrapped.prepare(batch))
    plain = build(name, **kwargs)
    plain.start_step(1)
    expected, expected_metrics = plain.loss(model, plain.prepare(lead_copy_batch(batch, TOKENS)))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert metrics.keys() == {f"copy/{name}" for name in expected_metrics}  # logged apart from the task's figures
    for name, (total, count) in expected_metrics.items():
        torch.testing.assert_close(metrics[f"copy/{name}"][0], total, rtol=0, atol=0)
    assert wrapped.metric_names() == plain.metric_names() + [f"copy/{n}" for n in plain.metric_names()]
    assert wrapped.eval_metric_names() == plain.eval_metric_names()
    assert wrapped.state_dict().keys() == plain.state_dict().keys()


def test_lead_baseline_scores_the_first_words_with_the_tasks_metric():
    # The reference's 4 words are the source's first 4 of 10: lead-8 keeps them and adds 4 others -> R-1 F1 2/3;
    # and R-2: 3 reference bigrams of 7 -> F1 2 * (3/7) * 1 / (3/7 + 1) = 0.6.
    scores = lead_scores("gigaword", ["police arrest suspect monday in the capital after long chase"],
                         ["police arrest suspect monday"])
    assert abs(scores["rouge1"] - 100 * 2 / 3) < 1e-6 and abs(scores["rouge2"] - 60.0) < 1e-6
    assert lead_scores("squadqg", ["a source"], ["a question"]) is None  # not a ROUGE-1/2/L task
