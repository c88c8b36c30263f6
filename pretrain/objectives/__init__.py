"""Objectives as plug-ins: `loss(model, batch) -> (loss, metrics)` behind one interface, found by name."""
from pretrain.objectives import bang, elmer, mix  # noqa: F401  (registers them)
from pretrain.objectives.base import Metrics, Objective, build, register, registered

__all__ = ["Metrics", "Objective", "build", "register", "registered"]
