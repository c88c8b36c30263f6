"""MLflow for finetuning: the project's one store (pretrain.core.resolve_uri: tracking.uri, else
$MLFLOW_TRACKING_URI, else sqlite:///<repo>/runs/mlflow.db, shared with pretraining so a pretraining run and the
finetune runs linked to it sit in one UI, and `compare` finds every finetune and evaluation), the tags that tie a
run to its task, difficulty, objective, decoding mode and pretraining run, and evaluation runs.

Tags every finetune and evaluation run carries: kind (finetune | evaluation | glge_summary), task, difficulty,
objective, decoding_mode, pretrain_run_id, pretrain_checkpoint, pretrain_step; evaluation runs also split and
finetune_run_id (and mlflow.parentRunId, so the UI nests them under their finetune run).
"""
from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pretrain import core


def resolve_uri(configured: str) -> str:
    """pretrain.core.resolve_uri, with a sqlite store's folder created (MLflow creates only the file)."""
    uri = core.resolve_uri(configured)
    db = core.sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def client(uri: str):
    return core.client_for(uri)


def log_json_artifact(uri: str, run_id: str, data: dict[str, Any], name: str, folder: str | None = None) -> None:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=1, default=str))
            client(uri).log_artifact(run_id, str(path), folder)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"MLflow log_artifact {name} failed ({type(err).__name__}: {err})", RuntimeWarning)


def run_exists(uri: str, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client(uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - a run of another store
        return False


def log_run(uri: str, experiment: str, run_name: str, tags: dict[str, Any], params: dict[str, Any],
            metrics: dict[str, float], artifacts: list[tuple[Path, str | None]]) -> str:
    """One finished run with everything at once; returns its id. Errors propagate: an evaluation that cannot be
    recorded should say so."""
    from mlflow.entities import Metric, Param, RunTag

    c = client(uri)
    exp_id = core.ensure_experiment(c, experiment, uri)
    run = c.create_run(exp_id, run_name=run_name)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    flat = [Param(k, str(v)[:core.PARAM_VALUE_LIMIT]) for k, v in core.flatten(params).items()]
    for i in range(0, len(flat), 100):
        c.log_batch(run_id, params=flat[i:i + 100])
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
                tags=[RunTag(k, str(v)) for k, v in {**core.source_tags(), **tags}.items()])
    for path, folder in artifacts:
        if Path(path).is_file():
            c.log_artifact(run_id, str(path), folder)
    c.set_terminated(run_id, "FINISHED")
    return run_id
