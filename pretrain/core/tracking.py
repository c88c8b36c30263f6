"""Experiment tracking: MLflow from rank 0 only, with a local JSONL record that always survives.

One MLflow run per job (a resumed job reopens the run its checkpoint names). Store (`resolve_uri`): `tracking.uri`
if set, else $MLFLOW_TRACKING_URI, else the project's one store sqlite:///<repo>/runs/mlflow.db, shared by
pretraining, finetuning and evaluation so a pretraining run and the finetune runs linked to it can be compared in
one UI; a sqlite store keeps its artifacts beside the database (<db folder>/mlartifacts). Every record also goes
to <output_dir>/metrics.jsonl; if MLflow fails at any point the tracker warns once, stops calling MLflow and keeps
writing the JSONL file, so tracking can never stop training.

Runs started by the launcher carry its ids (`launch_tags`): $TANDEM_LAUNCH_ID -> tag tandem.launch_id,
$TANDEM_RESTART -> tag tandem.restart (a resumed run gets the restart count of its latest attempt).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STORE = REPO_ROOT / "runs" / "mlflow.db"  # one store for pretraining, finetuning and evaluation
LAUNCH_ENV_TAGS = {"TANDEM_LAUNCH_ID": "tandem.launch_id", "TANDEM_RESTART": "tandem.restart"}
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter value
BATCH_LIMIT = 100  # params per log_batch call


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def resolve_uri(configured: str | None) -> str:
    """tracking.uri if set, else $MLFLOW_TRACKING_URI, else sqlite:///<repo>/runs/mlflow.db (an absolute path, so
    every job finds the same store whatever folder it runs from)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{DEFAULT_STORE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store (sqlite:////abs/path or sqlite:///relative/path); else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database (not in ./mlruns of whatever folder the
    job runs from); None (MLflow's default) for other stores."""
    db = sqlite_path(uri)
    return db.parent / "mlartifacts" if db is not None else None


def launch_tags(environ=os.environ) -> dict[str, str]:
    """The launcher's ids for this run, from the environment it gives every rank."""
    return {tag: environ[var] for var, tag in LAUNCH_ENV_TAGS.items() if environ.get(var)}


class Tracker:
    """Call every method on every rank; only rank 0 (`active`) records anything."""

    def __init__(self, output_dir: Path, active: bool, use_mlflow: bool = True, uri: str | None = None,
                 experiment: str = "tandem-pretrain"):
        self.output_dir = Path(output_dir)
        self.active = active
        self.use_mlflow = use_mlflow and active
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None
        self._jsonl = None
        if active:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.output_dir / "metrics.jsonl", "a", buffering=1)

    # --- MLflow, guarded -----------------------------------------------------------------------------------

    def _mlflow(self, what: str, fn, *args, **kwargs):
        if not self.use_mlflow:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            warnings.warn(f"MLflow {what} failed ({type(err).__name__}: {err}); tracking continues only in "
                          f"{self.output_dir / 'metrics.jsonl'}", RuntimeWarning, stacklevel=2)
            self._record({"event": "tracking_failed", "during": what, "error": f"{type(err).__name__}: {err}"})
            self.use_mlflow = False
            return None

    def _start_mlflow(self, run_name: str, tags: dict[str, str], resume_run_id: str | None) -> str:
        from mlflow.tracking import MlflowClient

        db = sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            root = artifact_root(self.uri)
            experiment_id = client.create_experiment(self.experiment, artifact_location=root.resolve().as_uri()
                                                     if root is not None else None)
        else:
            experiment_id = experiment.experiment_id
        run_id = None
        if resume_run_id:
            try:
                client.get_run(resume_run_id)
                run_id = resume_run_id
                client.update_run(run_id, status="RUNNING")
            except Exception:  # noqa: BLE001 - a run from another store: start a new one
                warnings.warn(f"MLflow run {resume_run_id} not found at {self.uri}; starting a new run", stacklevel=2)
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))
        self._client = client
        return run_id

    # --- public -------------------------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, Any],
              artifacts: list[tuple[Path, str | None]], resume_run_id: str | None = None) -> str | None:
        if not self.active:
            return None
        self._record({"event": "start", "run_name": run_name, "tags": {k: str(v) for k, v in tags.items()},
                      "time": time.time()})
        self.run_id = self._mlflow("start", self._start_mlflow, run_name, tags, resume_run_id)
        if self.run_id is None:
            return None
        if resume_run_id != self.run_id:  # a reopened run already holds its params
            self.log_params(params)
        for path, folder in artifacts:
            self.log_artifact(Path(path), folder)
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active or self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in flatten(params).items()]
        for i in range(0, len(items), BATCH_LIMIT):
            self._mlflow("log_params", self._client.log_batch, self.run_id, params=items[i:i + BATCH_LIMIT])

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "train") -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._record({"kind": kind, "step": step, **{k: float(v) for k, v in metrics.items()}})
        if self.run_id is None or not clean:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{kind}/{k}", v, now, step) for k, v in clean.items()]
        for i in range(0, len(batch), 1000):
            self._mlflow("log_metrics", self._client.log_batch, self.run_id, metrics=batch[i:i + 1000])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        if not self.active or self.run_id is None:
            return
        self._mlflow("log_artifact", self._client.log_artifact, self.run_id, str(path), subdir)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self._record({"event": "finish", "status": status, "time": time.time()})
        if self.run_id is not None:
            self._mlflow("finish", self._client.set_terminated, self.run_id, status)
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def _record(self, entry: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(entry, default=str) + "\n")
