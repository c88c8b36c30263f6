"""Keep-best bookkeeping: which checkpoints score best on a named validation metric, and when to stop early.

`checkpoint.keep_best` names a metric of the engine's evaluation (`nar/loss`, `gen/rouge1`, ... as logged, with or
without the `eval/` prefix of MLflow); whether higher or lower is better comes from pretrain.core.directions, the
one table of metric directions. After every evaluation the engine passes the metric to `BestCheckpoints.observe`: a step whose
value ranks among the `checkpoint.keep_best_count` best so far is saved as a checkpoint and kept: the engine hands
`tags()` to checkpoint.save, whose pruning (keep_last) never removes them. A checkpoint that drops out of the best
is pruned like any other. `train.early_stop_patience` = P stops training after P evaluations in a row without a
new best (fairseq's --patience). Ties keep the earlier step; a NaN value never counts as better.

The state (ranking, evaluations since the best) travels in every checkpoint's client state, so a resumed run goes
on with the same ranking and patience; rank 0 mirrors it to <checkpoint dir>/best.json for people and tools.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pretrain.core.checkpoint import tag_for, write_atomically
from pretrain.core.directions import MAX, MIN, direction, metric_key  # noqa: F401  (MIN: part of the API)

BEST_FILE = "best.json"


def check_keep_best(name: str, available: Sequence[str]) -> None:
    """ValueError unless the evaluation will report `name` (and its direction is known)."""
    direction(name)
    if metric_key(name) not in available:
        raise ValueError(f"{name!r} is not among the metrics this job's evaluation reports: {sorted(available)}")


@dataclass
class Entry:
    step: int
    value: float


class BestCheckpoints:
    """The `count` best evaluated steps on one metric, and the evaluations since the last new best."""

    def __init__(self, metric: str, count: int = 1, patience: int = 0):
        self.metric = metric_key(metric)
        self.direction = direction(metric)
        self.count = count
        self.patience = patience
        self.entries: list[Entry] = []  # best first: entries[0] is the best so far
        self.since_best = 0  # evaluations since the best so far
        self.last_step = -1  # the last step observed: the end-of-run evaluation may repeat an evaluated step

    def better(self, a: float, b: float) -> bool:
        """a strictly better than b (NaN never is)."""
        return a > b if self.direction == MAX else a < b

    def value(self, metrics: dict[str, float]) -> float:
        if self.metric not in metrics:
            raise ValueError(f"checkpoint.keep_best={self.metric!r}: the evaluation reported {sorted(metrics)}")
        return float(metrics[self.metric])

    def observe(self, step: int, value: float) -> bool:
        """Record the evaluation at `step`; True when the step ranks among the best (save and keep its checkpoint)."""
        if step == self.last_step:
            return any(e.step == step for e in self.entries)
        self.last_step = step
        if math.isnan(value):
            self.since_best += 1
            return False
        improved = not self.entries or self.better(value, self.entries[0].value)
        self.since_best = 0 if improved else self.since_best + 1
        if len(self.entries) >= self.count and not self.better(value, self.entries[-1].value):
            return False
        self.entries.append(Entry(step, value))
        # stable sort: among equal values the earlier step stays ahead
        self.entries.sort(key=lambda e: -e.value if self.direction == MAX else e.value)
        del self.entries[self.count:]
        return True

    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def tags(self) -> set[str]:
        """The checkpoint tags pruning must never remove."""
        return {tag_for(e.step) for e in self.entries}

    def steps(self, n: int) -> list[int]:
        """The n best steps, best first."""
        return [e.step for e in self.entries[:n]]

    def describe(self) -> str:
        best = f"{self.entries[0].value:.4f} at step {self.entries[0].step}" if self.entries else "none yet"
        return f"{self.metric} ({self.direction}) best {best}"

    # --- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": self.direction, "count": self.count,
                "entries": [vars(e) for e in self.entries], "since_best": self.since_best, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Take over a saved state; False (and nothing taken) when it ranked another metric."""
        if state.get("metric") != self.metric:
            return False
        self.entries = [Entry(int(e["step"]), float(e["value"])) for e in state["entries"]]
        self.entries.sort(key=lambda e: -e.value if self.direction == MAX else e.value)
        del self.entries[self.count:]
        self.since_best = int(state.get("since_best", 0))
        self.last_step = int(state.get("last_step", -1))
        return True

    def write(self, ckpt_dir: Path) -> None:
        """The mirror for people and tools (rank 0): <checkpoint dir>/best.json."""
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        state = {**self.state_dict(), "tags": [tag_for(e.step) for e in self.entries]}
        write_atomically(Path(ckpt_dir) / BEST_FILE, json.dumps(state, indent=1))


def from_config(cfg) -> BestCheckpoints | None:
    """The bookkeeping an EngineConfig asks for (checkpoint.keep_best), None when it asks for none."""
    c = cfg.checkpoint
    if not c.keep_best:
        return None
    return BestCheckpoints(c.keep_best, c.keep_best_count, cfg.train.early_stop_patience)
