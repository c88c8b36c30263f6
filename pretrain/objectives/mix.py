"""Several objectives over one model; the loader samples which one each batch trains (batch["objective"]), with
the configured weights, so the choice is part of the data stream's checkpointed state."""
from __future__ import annotations

from typing import Any

from pretrain.core.objectives import Metrics, Objective, register


@register("mix")
class MixObjective(Objective):
    def __init__(self, parts: dict[str, Objective], weights: dict[str, float]):
        missing = sorted(set(weights) - set(parts))
        if missing:
            raise ValueError(f"objective.weights names {missing}, which have no objective")
        self.parts = parts
        self.weights = dict(weights)

    def _part(self, batch: dict[str, Any]) -> Objective:
        name = batch["objective"]
        if name not in self.parts:
            raise ValueError(f"batch objective {name!r} is not one of the mix {sorted(self.parts)}")
        return self.parts[name]

    def start_step(self, step: int) -> None:
        for part in self.parts.values():
            part.start_step(step)

    def prepare(self, batch: dict[str, Any], evaluate: bool = False) -> dict[str, Any]:
        return self._part(batch).prepare(batch, evaluate)

    def loss(self, model, batch: dict[str, Any]):
        return self._part(batch).loss(model, batch)

    def eval_metrics(self, model, batch: dict[str, Any]) -> Metrics:
        return self._part(batch).eval_metrics(model, batch)

    def num_targets(self, batch: dict[str, Any]) -> int:
        return self._part(batch).num_targets(batch)

    def metric_names(self) -> list[str]:
        return [n for part in self.parts.values() for n in part.metric_names()]

    def eval_metric_names(self) -> list[str]:
        return [n for part in self.parts.values() for n in part.eval_metric_names()]

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state.get(name, {}))
