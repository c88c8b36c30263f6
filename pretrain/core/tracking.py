"""Experiment tracking: a local JSONL record first, MLflow as its copy, from rank 0 only; MLflow never stalls
training.

One MLflow run per job (a resumed job reopens the run its checkpoint names). Store (`resolve_uri`): `tracking.uri`
if set, else $MLFLOW_TRACKING_URI, else the project's one store sqlite:///<repo>/runs/mlflow.db, shared by
pretraining, finetuning and evaluation so a pretraining run and the finetune runs linked to it can be compared in
one UI; a sqlite store keeps its artifacts beside the database (<db folder>/mlartifacts).

Why a background thread over the JSONL file: the training thread only appends a line to <output_dir>/metrics.jsonl
(microseconds, whatever MLflow does) and a thread replays the new lines into MLflow (pretrain.core.mlflow_sync).
Short HTTP timeouts alone would still charge every log call up to timeout x retries while a server is away (and
rank 0's stall holds every other rank at the next collective); MLflow's asynchronous logging queues in memory and
loses what fails. Replaying the file loses nothing: when MLflow fails the thread waits RETRY_S and resends from the
first line MLflow did not take, so after an outage the missing points are backfilled and the run is closed with
its true status. At the end of the job rank 0 waits up to `tracking.finish_wait_s` for that; if MLflow is still
away it prints the one command that finishes the job later: `python -m pretrain.core backfill <output_dir>`.
MLflow's HTTP limits are set short in the training process (HTTP_LIMITS, unless set in the environment) so the
thread notices an outage in seconds, not after MLflow's default ~4 minutes of retries. Each outage is reported when
it begins and ends (stderr and metrics.jsonl), and counted: the run gets tags tandem.mlflow_outages and
tandem.mlflow_outage_s (seconds away in all), and the job's end says how many there were.

A store that cannot be used at all (an unknown URI scheme) turns MLflow off for the job with a warning; the JSONL
record is kept either way.

Tags every run carries: MLflow's standard source tags (`source_tags`: mlflow.source.name / type / git.commit,
mlflow.user), and the launcher's ids (`launch_tags`): $TANDEM_LAUNCH_ID -> tandem.launch_id, $TANDEM_RESTART ->
tandem.restart (a resumed run gets the restart count of its latest attempt). The shard folders a job reads are
logged as MLflow datasets (`shard_dataset`: the manifest's sha256s make the digest).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from configs import progress
from data_pipeline.artifacts import load_manifest
from pretrain.core.mlflow_sync import Sync, Unavailable, artifact_root, client_for, sqlite_path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STORE = REPO_ROOT / "runs" / "mlflow.db"  # one store for pretraining, finetuning and evaluation
LAUNCH_ENV_TAGS = {"TANDEM_LAUNCH_ID": "tandem.launch_id", "TANDEM_RESTART": "tandem.restart"}
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a parameter value
# MLflow's HTTP client defaults (120 s timeout, 7 retries with backoff 2) stall ~4 minutes before one call fails
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
RETRY_S = 5.0  # while MLflow is away, how often the sync thread tries again
START_WAIT_S = 60.0  # how long the job waits for its run to be created before training without it
CALL_BOUND_S = 40.0  # the longest one MLflow call can take under HTTP_LIMITS (3 tries x 10 s + backoff)
BACKFILL_COMMAND = "python -m pretrain.core backfill"

__all__ = ["Tracker", "resolve_uri", "sqlite_path", "artifact_root", "flatten", "launch_tags", "source_tags",
           "shard_dataset", "git_commit", "PARAM_VALUE_LIMIT"]


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


def launch_tags(environ=os.environ) -> dict[str, str]:
    """The launcher's ids for this run, from the environment it gives every rank."""
    return {tag: environ[var] for var, tag in LAUNCH_ENV_TAGS.items() if environ.get(var)}


def source_tags(argv0: str | None = None) -> dict[str, str]:
    """MLflow's standard tags for where a run came from (what mlflow.start_run sets, which we do not use): the
    entry file (relative to the repository when inside it), type LOCAL, the repository's commit, the user."""
    entry = Path(argv0 if argv0 is not None else (sys.argv[0] if sys.argv and sys.argv[0] else "<console>"))
    try:
        name = str(entry.resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        name = str(entry)
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_commit(REPO_ROOT)}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name in this container
        pass
    return tags


def shard_dataset(folder: Path, context: str) -> dict[str, Any]:
    """A shard folder as an MLflow dataset: name (its last two path parts, e.g. "pretrain/shards"), digest (sha256
    over the manifest's shard sha256s, lengths file and tokenizer checksum: any change to the shards changes it;
    32 hex digits, MLflow keeps 36), source (the folder), context ("training" | "validation"), schema and profile
    (fields, token dtype; samples, tokens, shards) as JSON."""
    folder = Path(folder).resolve()
    manifest = load_manifest(folder)
    h = hashlib.sha256()
    for shard in manifest["shards"]:
        h.update(f"{shard['name']}:{shard.get('sha256') or shard.get('bytes')}\n".encode())
    h.update(f"{manifest.get('lengths_sha256')}:{manifest.get('tokenizer', {}).get('checksum')}".encode())
    return {"name": f"{folder.parent.name}/{folder.name}", "digest": h.hexdigest()[:32], "source": str(folder),
            "context": context,
            "schema": json.dumps({"kind": manifest.get("kind"), "fields": manifest.get("fields"),
                                  "token_dtype": manifest.get("token_dtype")}),
            "profile": json.dumps({"num_samples": manifest.get("num_samples"),
                                   "num_tokens": manifest.get("num_tokens"), "num_shards": len(manifest["shards"])})}


class Tracker:
    """Call every method on every rank; only rank 0 (`active`) records anything. Nothing here waits for MLflow
    except `start` (for the run to exist, at most START_WAIT_S) and `finish` (at most finish_wait_s)."""

    def __init__(self, output_dir: Path, active: bool, use_mlflow: bool = True, uri: str | None = None,
                 experiment: str = "tandem-pretrain", finish_wait_s: float = 60.0):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.active = active
        self.use_mlflow = use_mlflow and active
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.finish_wait_s = finish_wait_s
        self.segment: str | None = None
        self._lock = threading.Lock()  # the training thread and the sync thread both append lines
        self._jsonl = None
        self._sync: Sync | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._first_try = threading.Event()
        self._deadline = 0.0
        self._down_since: float | None = None
        self.outages = 0  # times MLflow went away during this job (the sync thread counts them)
        self.outage_s = 0.0  # seconds it was away, outages that ended
        if active:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.path, "a", buffering=1)

    @property
    def run_id(self) -> str | None:
        return self._sync.run_id if self._sync is not None else None

    @property
    def closed_in_mlflow(self) -> bool:
        """After `finish`: every record of the run, its end included, reached MLflow (not left for backfill)."""
        return self._sync is not None and self._sync.finished

    def _record(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str) + "\n"
        with self._lock:
            if self._jsonl is not None:
                self._jsonl.write(line)
            else:  # after finish: the sync thread's last notes
                with open(self.path, "a") as f:
                    f.write(line)
        self._wake.set()

    # --- public -------------------------------------------------------------------------------------------

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, Any],
              artifacts: list[tuple[Path, str | None]], resume_run_id: str | None = None,
              datasets: list[tuple[Path, str]] = (), step: int = 0) -> str | None:
        """Record the job's start (params flattened, tags, artifacts: (file, folder in the run), datasets: (shard
        folder, context)) and open its MLflow run: a new one, or resume_run_id reopened. Returns the run id, or
        None when MLflow is off or did not answer (the run is then created when it does)."""
        if not self.active:
            return None
        self.segment = uuid.uuid4().hex[:16]
        with self._lock:
            offset = self._jsonl.tell()
        self._record({"event": "start", "segment": self.segment, "time": time.time(), "run_name": run_name,
                      "experiment": self.experiment, "uri": self.uri if self.use_mlflow else None,
                      "resume_run_id": resume_run_id, "step": step, "tags": {k: str(v) for k, v in tags.items()},
                      "params": {k: str(v)[:PARAM_VALUE_LIMIT] for k, v in flatten(params).items()}})
        for path, folder in artifacts:
            self.log_artifact(Path(path), folder)
        if datasets:
            self._record({"event": "datasets", "segment": self.segment,
                          "datasets": [shard_dataset(folder, context) for folder, context in datasets]})
        if not self.use_mlflow:
            return None
        for var, value in HTTP_LIMITS.items():
            os.environ.setdefault(var, value)
        try:
            client = client_for(self.uri)
        except Exception as err:  # noqa: BLE001 - a store MLflow cannot open at all: no point retrying
            warnings.warn(f"MLflow start failed ({type(err).__name__}: {err}); tracking continues only in "
                          f"{self.path}", RuntimeWarning, stacklevel=2)
            self._record({"event": "tracking_failed", "during": "start", "error": f"{type(err).__name__}: {err}"})
            self.use_mlflow = False
            return None
        self._sync = Sync(self.path, offset, self._record, uri=self.uri, live=True, client=client,
                          outage=self._outage_counts)
        self._thread = threading.Thread(target=self._run_sync, name="mlflow-sync", daemon=True)
        self._thread.start()
        self._first_try.wait(START_WAIT_S)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int, kind: str = "train") -> None:
        """One log window's figures (metric names become "<kind>/<name>" in MLflow; NaN and inf stay in the JSONL
        only)."""
        if self.active:
            self._record({"kind": kind, "step": step, "time": time.time(),
                          **{k: float(v) for k, v in metrics.items() if v is not None}})

    def log_params(self, params: dict[str, Any]) -> None:
        """Params known only during the job (flattened like start's: the export's steps, an early stop)."""
        if self.active:
            self._record({"event": "params", "segment": self.segment,
                          "params": {k: str(v)[:PARAM_VALUE_LIMIT] for k, v in flatten(params).items()}})

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        """A file for the run's artifacts (sent when MLflow takes it: the file must stay until then)."""
        if self.active:
            self._record({"event": "artifact", "segment": self.segment, "path": str(Path(path).absolute()),
                          "folder": subdir})

    def finish(self, status: str = "FINISHED") -> None:
        """Record the job's end and close its MLflow run with `status` once every line before it is in MLflow,
        waiting at most finish_wait_s (plus one MLflow call) for a server that is away."""
        if not self.active:
            return
        outage = self._outage_counts()  # as of now; the sync thread sends the counts it has when it closes the run
        self._record({"event": "finish", "segment": self.segment, "status": status, "time": time.time(), **outage})
        if self._thread is not None:
            self._deadline = time.monotonic() + self.finish_wait_s
            self._closing.set()
            self._wake.set()
            self._thread.join(self.finish_wait_s + CALL_BOUND_S)
            if not self._sync.finished:
                self._record({"event": "mlflow_pending", "segment": self.segment, "time": time.time(),
                              **self._outage_counts()})
                print(f"[tracking] MLflow at {self.uri} is still unreachable; {self._sync.pending()} record(s) of "
                      f"this run are only in {self.path}. Once it is back, send them and close the run with:\n"
                      f"    {BACKFILL_COMMAND} {self.output_dir}", file=sys.stderr, flush=True)
            elif self.outages:
                outage = self._outage_counts()
                print(f"[tracking] MLflow at {self.uri} was unreachable {outage['mlflow_outages']} time(s), "
                      f"{outage['mlflow_outage_s']:.0f} s in all; every record kept meanwhile is in run {self.run_id}",
                      file=sys.stderr, flush=True)
        with self._lock:
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None

    def _outage_counts(self) -> dict[str, Any]:
        """{"mlflow_outages": n, "mlflow_outage_s": seconds} (an outage still going counted up to now); {} if none."""
        down = self._down_since
        if not self.outages:
            return {}
        return {"mlflow_outages": self.outages,
                "mlflow_outage_s": round(self.outage_s + (time.time() - down if down is not None else 0.0), 1)}

    # --- the sync thread -----------------------------------------------------------------------------------

    def _run_sync(self) -> None:
        """Send new lines whenever the training thread writes one; while MLflow is away, retry every RETRY_S. Ends
        when the `finish` line is in MLflow, or after finish() once its deadline has passed."""
        while True:
            closing = self._closing.is_set()
            tried = time.time()  # an outage is counted from the start of the call that found MLflow away
            try:
                sent = self._sync.send()
                if self._down_since is not None:
                    away = time.time() - self._down_since
                    self.outage_s += away
                    self._down_since = None
                    self._record({"event": "mlflow_reachable", "segment": self.segment, "away_s": round(away, 1),
                                  "sent": sent, "time": time.time()})
                    progress.write(f"[tracking] MLflow at {self.uri} is reachable again after {away:.0f} s; sent the "
                                   f"{sent} record(s) kept meanwhile", file=sys.stderr)  # through the training bar
            except Unavailable as err:
                if self._down_since is None:
                    self._down_since = tried
                    self.outages += 1
                    self._record({"event": "mlflow_unreachable", "segment": self.segment, "during": err.what,
                                  "error": err.error[:2000], "time": self._down_since})
                    progress.write(f"[tracking] {err}; training goes on, figures are kept in {self.path} and sent "
                                   f"when MLflow is back (retrying every {RETRY_S:.0f} s)", file=sys.stderr)
            self._first_try.set()
            if self._sync.finished or (closing and (self._down_since is None or time.monotonic() >= self._deadline)):
                return
            if self._down_since is None:  # up: send as soon as a line is written
                self._wake.wait()
                self._wake.clear()
            elif not closing:  # away: try again every RETRY_S (new lines wait for it); finish() wakes it at once
                self._closing.wait(RETRY_S)
            else:
                time.sleep(max(0.0, min(RETRY_S, self._deadline - time.monotonic())))
