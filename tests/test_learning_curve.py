"""bench/learning_curve.py's lead-copying probe: the batch it trains on is the source's lead, laid out exactly as
the task collator lays out a real target (tgt = y + eos, prev = bos + y, positions 1..T, pads 0)."""
from __future__ import annotations

import importlib.util
import sys

import torch

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_learning_curve", REPO_ROOT / "bench" / "learning_curve.py")
curve = sys.modules["bench_learning_curve"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curve)


def test_lead_copy_batch_matches_the_collator_layout():
    batch = {"src_tokens": torch.tensor([[7, 8, 9, 10, 11], [7, 8, 0, 0, 0]]), "sample_ids": torch.tensor([3, 4])}
    out = curve.lead_copy_batch(batch, copy_len=4)
    assert out["tgt_tokens"].tolist() == [[7, 8, 9, 10, 3], [7, 8, 3, 0, 0]]
    assert out["prev_tokens"].tolist() == [[2, 7, 8, 9, 10], [2, 7, 8, 0, 0]]
    assert out["tgt_positions"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    assert out["src_tokens"] is batch["src_tokens"] and out["sample_ids"] is batch["sample_ids"]


def test_lead_baseline_scores_the_first_words():
    # The reference's 4 words are the source's first 4 of 10: lead-8 keeps them and adds 4 others -> R-1 F1 2/3.
    r1 = curve.lead_rouge1(["police arrest suspect monday in the capital after long chase"],
                           ["police arrest suspect monday"])
    assert abs(r1 - 100 * 2 / 3) < 1e-6
