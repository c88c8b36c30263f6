"""The pretraining config: the engine's sections (pretrain.core.EngineConfig) plus the model, the data and the
objective. One YAML per model size in configs/pretrain/; `key=value` overrides on top.

Validation of these sections (`pretrain.run.prepare`) runs before any process group starts and names the field or
file at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pretrain import core


@dataclass
class ModelSection:
    preset: str = "tiny"  # model.config presets: tiny, base
    overrides: dict[str, Any] = field(default_factory=dict)  # any ModelConfig field; vocab_size comes from the data


@dataclass
class DataSection:
    config: str = "configs/data/tiny.yaml"  # the data pipeline's config: shards, tokenizer, loader, corruption
    overrides: list[str] = field(default_factory=list)  # key=value applied to that config
    # Held-out text for evaluation: more key=value applied on top (e.g. another loader.shard_dir); empty: none.
    eval_overrides: list[str] = field(default_factory=list)
    num_workers: int = 0  # loader worker processes per rank


@dataclass
class BangSection:
    n_streams: int = 0  # 0: the model's n_predict
    stream_weights: list[float] = field(default_factory=list)  # empty: 1.0 each (BANG weighs streams equally)
    label_smoothing: float = 0.0


@dataclass
class ElmerSection:
    label_smoothing: float = 0.0


@dataclass
class ObjectiveSection:
    name: str = "mix"  # bang, elmer or mix
    weights: dict[str, float] = field(default_factory=lambda: {"bang": 0.5, "elmer": 0.5})  # mix: per-batch odds
    bang: BangSection = field(default_factory=BangSection)
    elmer: ElmerSection = field(default_factory=ElmerSection)

    def active(self) -> dict[str, float]:
        """The objectives the loader samples, with their weights."""
        if self.name == "mix":
            return {k: float(v) for k, v in self.weights.items() if v > 0}
        return {self.name: 1.0}


@dataclass
class PretrainConfig(core.EngineConfig):
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)


def load(path: str | Path, overrides: Sequence[str] = ()) -> PretrainConfig:
    """YAML file + `key=value` overrides -> a PretrainConfig (not yet validated); ConfigError names the file or key."""
    return core.load_config(path, overrides, PretrainConfig)
