"""Which weights a run exports, and checkpoint averaging (fairseq's average_checkpoints).

`checkpoint.export_from` picks the source of <output_dir>/final_model.pt: `last`, the weights at the end of the run
(the default), or `best`, the best checkpoint by checkpoint.keep_best (pretrain.core.best). `checkpoint.average` = N
> 1 exports the parameter-wise mean of N model states instead: with `last`, the final weights and the N-1 newest
checkpoints saved before them; with `best`, the N best checkpoints. Like fairseq's scripts/average_checkpoints.py,
the mean runs over the model's floating-point tensors only (no optimizer state); it is accumulated in fp32 and cast
back to the training dtype of the module, which is what an export holds.

The final weights come from the engine's export path (TP shards merged, ZeRO-3 partitions gathered); a saved
checkpoint is read back from its files by pretrain.core.weights (DeepSpeed's model states, ZeRO-3 partitions rebuilt
with zero_to_fp32, TP shards concatenated), on rank 0 only, one checkpoint at a time beside the running sum.

`ExportSource` says where the export came from; the engine writes `record()` into the export payload (key
`export`, read back by pretrain.core.weights) and `params()` into the MLflow run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from configs import progress
from pretrain.core.best import BestCheckpoints
from pretrain.core.checkpoint import TAG_PATTERN, read_pointer, tag_for



@dataclass
class ExportSource:
    source: str  # "last" | "best"
    steps: list[int]  # the steps whose weights are exported (averaged when more than one): newest or best first
    final_step: int  # the step the run ended at
    metric: str = ""  # keep_best's metric, and its value at each of `steps` where it was evaluated
    values: dict[int, float] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The step an export names as its own: that of its weights (the newest of an average)."""
        return max(self.steps)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "steps": list(self.steps), "averaged": len(self.steps),
                "final_step": self.final_step, "metric": self.metric or None,
                "values": [self.values.get(s) for s in self.steps]}

    def params(self) -> dict[str, Any]:
        return {"export": {"source": self.source, "steps": ",".join(map(str, self.steps)),
                           "averaged": len(self.steps), "final_step": self.final_step,
                           **({"metric": self.metric} if self.metric else {})}}

    def describe(self) -> str:
        what = "the final weights" if self.steps == [self.final_step] and self.source == "last" else \
            f"{'the mean of ' if len(self.steps) > 1 else ''}step(s) {', '.join(map(str, self.steps))}"
        return f"{what} ({self.source}{f' by {self.metric}' if self.metric else ''})"


def saved_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in ckpt_dir: tag folders up to the one `latest` names (a later folder is a
    save that never completed)."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_pointer(ckpt_dir) if ckpt_dir.is_dir() else None
    if latest is None:
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir()
                  if p.is_dir() and (m := TAG_PATTERN.match(p.name)) and p.name <= latest)


def choose(ckpt_cfg, best: BestCheckpoints | None, ckpt_dir: Path, final_step: int) -> ExportSource:
    """The weights to export under checkpoint.export_from / checkpoint.average (validated by the engine config)."""
    n = max(1, ckpt_cfg.average)
    values = {e.step: e.value for e in best.entries} if best is not None else {}
    metric = best.metric if best is not None else ""
    if ckpt_cfg.export_from == "best":
        if best is None or not best.entries:
            raise ValueError("checkpoint.export_from=best: no evaluation ranked a checkpoint (checkpoint.keep_best)")
        return ExportSource("best", best.steps(n), final_step, metric, values)
    earlier = [s for s in saved_steps(ckpt_dir) if s < final_step]
    return ExportSource("last", [final_step, *sorted(earlier, reverse=True)[:n - 1]], final_step, metric, values)


def average_states(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Parameter-wise mean of full state dicts with the same keys: floating-point tensors summed in fp32 and divided
    by their number; every other entry (integer tensors, megatron's `_extra_state`) taken from the first."""
    total: dict[str, Any] = {}
    count = 0
    for state in states:
        if count and state.keys() != total.keys():
            raise ValueError(f"checkpoints to average hold different tensors: {sorted(state.keys() ^ total.keys())}")
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if count == 0:
                    total[name] = value.detach().to(torch.float32, copy=True)
                elif value.shape != total[name].shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} vs {tuple(total[name].shape)} in the "
                                     "checkpoints to average")
                else:
                    total[name] += value.detach().to(torch.float32)
            elif count == 0:
                total[name] = value
        count += 1
    if count == 0:
        raise ValueError("no checkpoints to average")
    return {k: v / count if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in total.items()}


def saved_state(ckpt_dir: Path, step: int, model: torch.nn.Module) -> dict[str, Any]:
    """The full weights of the checkpoint at `step` (read from its files; TP shards merged along `model`'s
    partition dims)."""
    from pretrain.core.weights import full_weights, read_weights

    return full_weights(read_weights(Path(ckpt_dir) / tag_for(step)), model)


def export_state(choice: ExportSource, final: dict[str, Any], ckpt_dir: Path,
                 model: torch.nn.Module) -> dict[str, Any]:
    """The state dict to export: `final` (the run's last weights, full) where the choice is the final step alone,
    else the chosen checkpoint(s), averaged, in the dtypes of `final`."""
    if choice.steps == [choice.final_step]:
        return final
    states = (final if step == choice.final_step else saved_state(ckpt_dir, step, model)
              for step in progress.iterate(choice.steps, desc="average", unit="ckpt"))
    mean = average_states(states)
    return {k: v.to(final[k].dtype) if isinstance(v, torch.Tensor) and isinstance(final.get(k), torch.Tensor) else v
            for k, v in mean.items()}
