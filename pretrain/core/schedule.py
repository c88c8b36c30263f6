"""Learning-rate schedules: linear warmup, then a decay, as a multiplier of the peak rate per optimizer step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DECAYS = ("constant", "linear", "cosine", "inverse_sqrt")


@dataclass(frozen=True)
class WarmupDecay:
    """lr(step) = peak * factor(step), where `step` counts optimizer updates already taken (0 for the first).

    Warmup rises linearly to 1 over `warmup_steps` updates (the first update uses 1/warmup_steps, never 0).
    Then: constant; linear or cosine towards `min_ratio` (reached just after the last of `total_steps`
    updates); or inverse_sqrt (fairseq's).
    """

    decay: str
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        n = step + 1  # the update about to be taken, 1-based
        if self.warmup_steps and n <= self.warmup_steps:
            return n / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        if self.decay == "inverse_sqrt":
            return math.sqrt(max(self.warmup_steps, 1) / n)
        # The last update of the run still gets a little more than min_ratio.
        span = max(self.total_steps - self.warmup_steps, 0) + 1
        progress = min((n - self.warmup_steps) / span, 1.0)
        if self.decay == "linear":
            shape = 1.0 - progress
        elif self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"schedule.decay={self.decay!r}: choose one of {DECAYS}")
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, factor: WarmupDecay) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR DeepSpeed steps once per optimizer update and saves in its checkpoints. The factor goes in as a
    plain function, which LambdaLR does not save: a resumed run restores the step count and follows the schedule
    of its current config (the same one, for an exact continuation; a longer one, to extend a run)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
