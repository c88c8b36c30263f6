"""Training and evaluation figures summed as (total, count) per name and reduced over data-parallel ranks."""
from __future__ import annotations

import torch

from model import parallel
from pretrain.core import distributed


class MetricSums:
    """(sum, count) per metric name in a fixed order, reduced over data-parallel ranks in one all-reduce."""

    def __init__(self, names: list[str], extra: tuple[str, ...] = ()):
        self.names = list(names)
        self.extra = list(extra)
        self.values = torch.zeros(2 * len(self.names) + len(self.extra), dtype=torch.float64)
        self._index = {n: i for i, n in enumerate(self.names)}

    def add(self, metrics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (total, count) in metrics.items():
            i = self._index[name]
            self.values[2 * i] += float(total)
            self.values[2 * i + 1] += float(count)

    def add_extra(self, name: str, value: float) -> None:
        self.values[2 * len(self.names) + self.extra.index(name)] += value

    def reduce(self) -> tuple[dict[str, float], dict[str, float]]:
        """All-reduce over data parallel; returns (means of metrics seen, extra sums)."""
        values = distributed.all_reduce_sum(self.values.clone(), group=parallel.dp_group())
        means = {}
        for i, name in enumerate(self.names):
            if values[2 * i + 1] > 0:
                means[name] = float(values[2 * i] / values[2 * i + 1])
        extras = {name: float(values[2 * len(self.names) + j]) for j, name in enumerate(self.extra)}
        return means, extras
