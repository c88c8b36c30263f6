"""Lead copying: steps whose target is the opening of each example's own source, beside any finetuning objective.

Why it exists (BENCHMARKS.md, "What the model has not learned: copying"): on the 10,000 Gigaword pairs the demo
has, no objective of the methods (BANG, ELMER, JANUS) teaches a small model to copy from its source within minutes
of CPU. The model learns a headline language model first and names the topic, while copying the source's first
8 words already scores ROUGE-1 31.8. Given copying as a task, a model learns it in about 100 steps; the headline
task then erases it within about 100 more. So copy steps come first (`warmup_steps`), then one step in `every`
keeps the skill while the task shapes it.

This is an aid outside the methods (their published results use no such steps), off by default (objective.lead_copy).

A copy step trains the wrapped objective, unchanged, on a batch whose targets are each source's first `tokens` tokens
plus EOS. bang_mixed then learns copying in its AR or NAR form, as that step's draw says. Whether a step copies
depends on its number only, so a resumed run makes the same choices. Evaluation batches are never rewritten. A copy
step's figures are logged under copy/ (copy/ar/loss, copy/nar/loss, ...), so the objective's own names follow the
task alone; the step's `loss` averages both.
"""
from __future__ import annotations

from typing import Any

import torch

from model.config import SPECIAL
from pretrain.core import Metrics, Objective

MARK = "lead_copy"  # set on a rewritten batch, so that preparing it twice rewrites it once
PREFIX = "copy/"


def lead_copy_batch(batch: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The batch with each source's first `tokens` tokens (+ EOS) as its target, in the collator's layout: tgt
    (y + eos), prev (bos + y), positions 1..T (0 at pad), n_tokens. Host tensors (before the batch moves)."""
    lead = batch["src_tokens"][:, :tokens]
    lengths = (lead != SPECIAL.pad).sum(1)
    rows = torch.arange(lead.shape[0])
    tgt = torch.cat([lead, torch.full_like(lead[:, :1], SPECIAL.pad)], 1)
    tgt[rows, lengths] = SPECIAL.eos
    real = tgt != SPECIAL.pad
    prev = torch.cat([torch.full_like(lead[:, :1], SPECIAL.bos), lead], 1) * real
    positions = torch.arange(1, tgt.shape[1] + 1)[None] * real
    return {**batch, "tgt_tokens": tgt, "prev_tokens": prev, "tgt_positions": positions,
            "n_tokens": int(real.sum()), MARK: True}


def enabled(section) -> bool:
    """Whether objective.lead_copy (finetune.config.LeadCopySection) asks for any copy step."""
    return section.warmup_steps > 0 or section.every > 0


def schedule_text(section) -> str:
    """The copy steps in words, for the `config ok:` line: "12 tokens: steps 1-150, then one step in 3"."""
    when = []
    if section.warmup_steps > 0:
        when.append(f"steps 1-{section.warmup_steps}")
    if section.every > 0:
        when.append(f"one step in {section.every}")
    return f"{section.tokens} tokens: {', then '.join(when)}"


class LeadCopy(Objective):
    """`objective` on every step, with the batches of copy steps rewritten by lead_copy_batch: steps 1..warmup_steps,
    then every `every`-th step (0: none after the warm-up). finetune.run validates the settings."""

    def __init__(self, objective: Objective, warmup_steps: int, every: int, tokens: int):
        self.objective, self.warmup_steps, self.every, self.tokens = objective, warmup_steps, every, tokens
        self.name = objective.name
        self.copies = False  # this step's choice (start_step)

    def is_copy_step(self, step: int) -> bool:
        return step <= self.warmup_steps or (self.every > 0 and step % self.every == 0)

    def start_step(self, step: int) -> None:
        self.copies = self.is_copy_step(step)
        self.objective.start_step(step)

    def prepare(self, batch: dict[str, Any], evaluate: bool = False) -> dict[str, Any]:
        if self.copies and not evaluate and not batch.get(MARK):
            batch = lead_copy_batch(batch, self.tokens)
        return self.objective.prepare(batch, evaluate=evaluate)

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = self.objective.loss(model, batch)
        if batch.get(MARK):
            metrics = {PREFIX + name: value for name, value in metrics.items()}
        return loss, metrics

    def eval_metrics(self, model, batch: dict[str, Any]) -> Metrics:
        return self.objective.eval_metrics(model, batch)

    def metric_names(self) -> list[str]:
        names = self.objective.metric_names()
        return names + [PREFIX + name for name in names]

    def eval_metric_names(self) -> list[str]:
        return self.objective.eval_metric_names()

    def num_targets(self, batch: dict[str, Any]) -> int:
        return self.objective.num_targets(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state)
