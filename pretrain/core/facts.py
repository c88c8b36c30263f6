"""What a stage tells the launcher about itself: `python -m <stage> --validate-only --json [--world-size N]`.

launch/ imports no training package, so it asks the stage instead of mirroring the stage's rules (where it writes,
where its checkpoints and their `latest` pointer go, its tensor-parallel size, its MLflow store, the shard folders
it reads). The stage answers with its own code, so the answer cannot drift from what training does. One JSON
object on stdout, also when the config is refused (exit code 2), so the launcher can report the refusal together
with its other findings:

    {"stage": "pretrain", "world_size": 2, "ok": false, "error": "<why the config is refused>", "message": null,
     "config_file": "/abs/configs/pretrain/tiny.yaml", "output_dir": "/abs/runs/pretrain/tiny",
     "checkpoint_dir": "/abs/runs/pretrain/tiny/checkpoints", "latest_pointer": "latest", "tensor_parallel": 1,
     "mlflow": true, "tracking_uri": "sqlite:////abs/runs/mlflow.db",
     "inputs": [{"field": "deepspeed.config", "path": "/abs/configs/deepspeed/zero1.json"}, ...],
     "shards": [{"field": "data.config", "dir": "/abs/runs/data/tiny/shards", "training": true, "num_workers": 0,
                 "build": "python -m data_pipeline prepare ...", "num_shards": 3, "num_samples": 2866,
                 "problem": null}, ...]}

`message` is the `config ok:` text when the config is accepted. Paths are absolute (relative ones are relative to
the stage's working directory). When the config cannot even be loaded, the report stops after `error`. The engine
half of the facts is here (`engine_facts`); each recipe adds its input files and shard folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from configs import config_path
from data_pipeline.errors import DataError
from data_pipeline.artifacts import MANIFEST, load_manifest
from pretrain.core.checkpoint import POINTER
from pretrain.core.tracking import resolve_uri


def absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().absolute())


def engine_facts(cfg) -> dict[str, Any]:
    """Where an EngineConfig's job writes, its parallel layout, its MLflow store and the DeepSpeed JSON it reads."""
    return {"config_file": absolute(cfg.config_file) if cfg.config_file else "",
            "output_dir": absolute(cfg.output_dir), "checkpoint_dir": absolute(cfg.checkpoint_dir()),
            "latest_pointer": POINTER, "tensor_parallel": cfg.parallel.tensor_parallel,
            "mlflow": cfg.tracking.mlflow, "tracking_uri": resolve_uri(cfg.tracking.uri),
            "inputs": [input_file("deepspeed.config", config_path(cfg.deepspeed.config))]}


def input_file(field: str, path: str | Path) -> dict[str, str]:
    """A file or folder the job reads and must find, with the config field (or option) that names it."""
    return {"field": field, "path": absolute(path)}


def shard_folder(field: str, shard_dir: Path, *, training: bool, num_workers: int, build: str) -> dict[str, Any]:
    """A shard folder the job reads: its size from manifest.json (None, with the problem, when it cannot be read),
    the loader workers each data-parallel rank runs on it, whether it is the training stream (held-out sets are
    read a few batches at a time) and the command that builds it."""
    entry = {"field": field, "dir": absolute(shard_dir), "training": training, "num_workers": num_workers,
             "build": build, "num_shards": None, "num_samples": None, "problem": None}
    if not (Path(shard_dir) / MANIFEST).is_file():
        entry["problem"] = f"{MANIFEST} missing"
        return entry
    try:
        manifest = load_manifest(shard_dir)
        entry.update(num_shards=len(manifest["shards"]), num_samples=int(manifest["num_samples"]))
    except (DataError, KeyError, TypeError, ValueError) as err:
        entry["problem"] = f"unreadable {MANIFEST} ({type(err).__name__}: {err})"
    return entry


def report(kind: str, world_size: int, cfg, error: str | None, message: str | None,
           recipe_facts: Callable[[Any], dict[str, list]]) -> dict[str, Any]:
    """The --json answer: the verdict, then (when the config loaded) the engine's and the recipe's facts
    (recipe_facts(cfg) -> {"inputs": [input_file ...], "shards": [shard_folder ...]})."""
    out: dict[str, Any] = {"stage": kind, "world_size": world_size, "ok": error is None, "error": error,
                           "message": message}
    if cfg is not None:
        recipe = recipe_facts(cfg)
        out.update(engine_facts(cfg))
        out["inputs"] += recipe["inputs"]
        out["shards"] = recipe["shards"]
    return out
