"""The pretraining objectives, bang, elmer and their mix: each registers itself into the training core's registry
(pretrain.core: the Objective interface, `register`) when this package is imported, which `build` here ensures."""
from pretrain.core import build, registered
from pretrain.objectives import bang, elmer, mix  # noqa: F401  (each module registers its objective)

__all__ = ["build", "registered"]
