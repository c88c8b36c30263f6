"""Training and evaluation figures summed as (total, count) per name and reduced over data-parallel ranks.

Tensor entries (what objectives return) are summed on their device, never read on the host while a window
lasts: a read would make the host wait for the device every micro-step. Plain numbers (target, token and sample
counts the host already knows) are summed on the host. `reduce` joins both, all-reduces one device vector over
data parallel and reads it back once: the window's figures reach the host there, and only there.
"""
from __future__ import annotations

import torch

from model import parallel
from pretrain.core import distributed


class MetricSums:
    """(sum, count) per metric name in a fixed order, plus extra host sums, reduced in one all-reduce."""

    def __init__(self, names: list[str], extra: tuple[str, ...] = (), device: torch.device | str = "cpu"):
        self.names = list(names)
        self.extra = list(extra)
        self.device = torch.device(device)
        self.on_device = torch.zeros(2 * len(self.names), dtype=torch.float64, device=self.device)
        self.on_host = [0.0] * (2 * len(self.names) + len(self.extra))
        self._index = {n: i for i, n in enumerate(self.names)}

    def add(self, metrics: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]) -> None:
        for name, pair in metrics.items():
            i = self._index[name]
            for slot, value in zip((2 * i, 2 * i + 1), pair):
                if isinstance(value, torch.Tensor):
                    self.on_device[slot] += value.detach()
                else:
                    self.on_host[slot] += float(value)

    def add_extra(self, name: str, value: float) -> None:
        self.on_host[2 * len(self.names) + self.extra.index(name)] += float(value)

    def reduce(self) -> tuple[dict[str, float], dict[str, float]]:
        """All-reduce over data parallel; returns (means of metrics seen, extra sums). One host read."""
        host = torch.tensor(self.on_host, dtype=torch.float64)
        values = torch.cat([self.on_device, torch.zeros(len(self.extra), dtype=torch.float64, device=self.device)])
        values += host.to(self.device)
        values = distributed.all_reduce_sum(values, group=parallel.dp_group()).tolist()
        means = {}
        for i, name in enumerate(self.names):
            if values[2 * i + 1] > 0:
                means[name] = values[2 * i] / values[2 * i + 1]
        extras = {name: values[2 * len(self.names) + j] for j, name in enumerate(self.extra)}
        return means, extras
