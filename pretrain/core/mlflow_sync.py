"""MLflow as a copy of a job's metrics.jsonl: the lines a job records are replayed into its MLflow run.

A training job writes everything it tracks to <output_dir>/metrics.jsonl first (pretrain.core.tracking.Tracker);
`Sync` sends the lines after a file offset to MLflow, in order, and advances the offset past each line once MLflow
has it. When MLflow fails (server stopped, network, timeout) `send` raises `Unavailable` and the offset stays: the
next `send` starts from the first line not yet sent. So the Tracker's background thread can simply call `send`
again later, and `backfill` (`python -m pretrain.core backfill <output_dir>`) can finish the job for a run that
ended while the server was away.

One job's lines form a segment, opened by its `start` line (a resumed job appends a new segment to the same file):

    {"event": "start", "segment": id, "time": t, "run_name", "experiment", "uri", "resume_run_id", "step",
     "tags": {...}, "params": {flattened, as strings}}                     -> the run is created or reopened
    {"event": "artifact", "segment", "path", "folder"}                     -> log_artifact
    {"event": "datasets", "segment", "datasets": [{name, digest, source, context, schema, profile}]} -> log_inputs
    {"kind": "train" | "eval" | "data", "step": n, "time": t, name: value, ...} -> metrics "<kind>/<name>" at step n
    {"event": "finish", "segment", "status", "time"}                       -> set_terminated(status)
        (+ "mlflow_outages", "mlflow_outage_s" when MLflow was away during the job -> tags tandem.mlflow_outage*)
and what the sync itself notes (skipped when replaying): `mlflow_run` (the run the segment went to), `mlflow_synced`
(everything up to `finish` is in MLflow), `mlflow_unreachable` / `mlflow_reachable` (an outage began / ended: its
length and the records sent after it), `mlflow_refused` (MLflow rejected a line: it is skipped, not retried),
`mlflow_pending` (the job ended before MLflow came back; with the outage counts at that time).

Replaying is idempotent, so a line sent twice (a batch cut by a failure, a backfill over a segment that was partly
sent) changes nothing: a metric point carries the time it was recorded and MLflow keeps one copy of an identical
(key, step, time, value); params are logged with the same value; tags and artifacts are overwritten with the same
content; datasets are deduplicated by name and digest.

A reopened run (a resumed job) keeps its params: MLflow params cannot change. The values this attempt changed are
logged under `resume.<n>.<key>` with `resume.<n>.at_step` (n counts the resumes that changed something), so the run
shows what every part of it was trained with; the diff is taken against the original values overlaid by the earlier
`resume.*` entries, which is also what makes a replayed `start` log nothing twice.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3.x: which UI opens the experiment (GenAI or training)
TRAINING_EXPERIMENT = "custom_model_development"  # MLflow's value for classic model-training experiments
DATASET_CONTEXT_TAG = "mlflow.data.context"
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
PARAMS_PER_BATCH = 100
WINDOWS_PER_CALL = 50  # log windows sent together when catching up
# MLflow error codes that mean "this request is wrong", not "MLflow is away": the line is skipped, not retried
REFUSED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS",
           "RESOURCE_DOES_NOT_EXIST"}
BOOKKEEPING = {"mlflow_run", "mlflow_params", "mlflow_synced", "mlflow_unreachable", "mlflow_reachable",
               "mlflow_refused", "mlflow_pending", "tracking_failed"}
OUTAGE_TAGS = {"mlflow_outages": "tandem.mlflow_outages", "mlflow_outage_s": "tandem.mlflow_outage_s"}
RESUME_KEY = re.compile(r"^resume\.(\d+)\.(.+)$")


class Unavailable(Exception):
    """MLflow did not take a line (server away, timeout, store error); the same line is sent again next time."""

    def __init__(self, what: str, err: BaseException):
        self.what = what
        self.error = f"{type(err).__name__}: {err}"
        super().__init__(f"MLflow {what} failed ({self.error})")


def refused(err: BaseException) -> bool:
    return getattr(err, "error_code", None) in REFUSED


def millis(seconds: float) -> int:
    return int(seconds * 1000)


def is_figures(record: dict[str, Any]) -> bool:
    """A log window's figures (Tracker.log_metrics), as opposed to an event."""
    return "kind" in record and "step" in record and "event" not in record


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store (sqlite:////abs/path or sqlite:///relative/path); else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database (not in ./mlruns of whatever folder the
    job runs from); None (MLflow's default) for other stores."""
    db = sqlite_path(uri)
    return db.parent / "mlartifacts" if db is not None else None


def client_for(uri: str):
    """An MlflowClient for the store; a sqlite store's folder is created (MLflow creates only the file)."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created if missing (a sqlite store's artifacts beside the database) as a classic
    training experiment: MLflow 3 opens an experiment without the kind tag in its GenAI view. An existing
    experiment without the tag gets it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(uri)
        return client.create_experiment(name, artifact_location=root.resolve().as_uri() if root else None,
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
    return experiment.experiment_id


def resume_changes(existing: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    """The params of this attempt that differ from what the run says now (its first values overlaid by every
    `resume.<n>.*` in order), keyed for the next resume number: {"resume.<n>.<key>": value}; {} when none."""
    effective = {k: v for k, v in existing.items() if not RESUME_KEY.match(k)}
    numbers = sorted({int(m.group(1)) for k in existing if (m := RESUME_KEY.match(k))})
    for n in numbers:
        effective.update({m.group(2): v for k, v in existing.items()
                          if (m := RESUME_KEY.match(k)) and int(m.group(1)) == n and m.group(2) != "at_step"})
    changed = {k: v for k, v in params.items() if effective.get(k) != v}
    n = (numbers[-1] if numbers else 0) + 1
    return {f"resume.{n}.{k}": v for k, v in changed.items()}


@dataclass
class Line:
    record: dict[str, Any]
    end: int  # file offset just after this line


def read_lines(path: Path, start: int, stop: int | None = None) -> list[Line]:
    """The complete lines of `path` from byte `start` (to `stop`); a last line still being written is left out."""
    lines = []
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read() if stop is None else f.read(max(stop - start, 0))
    position = start
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        position += len(raw)
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # not ours to send
        if isinstance(record, dict):
            lines.append(Line(record, position))
    return lines


@dataclass
class Sync:
    """Sends one segment of a metrics.jsonl to MLflow. live: the job is running now (a reopened run is set RUNNING;
    a backfill leaves the status to the segment's `finish`). note(record) appends a bookkeeping line to the file.
    A backfill also says what an earlier send already decided: the run (run_id), the resume params it logged
    (resume_params: the `mlflow_params` note) and whether a later job went on with the same run (latest=False:
    that job's tags and status are the run's, so this segment's are not sent)."""

    path: Path
    offset: int  # first byte not yet sent
    note: Callable[[dict[str, Any]], None]
    stop: int | None = None  # end of the segment (None: the end of the file, which a live job keeps extending)
    uri: str | None = None  # None: the store the start line names
    live: bool = True
    run_id: str | None = None
    resume_params: dict[str, str] | None = None
    latest: bool = True
    segment: str | None = None
    finished: bool = False  # the segment's `finish` reached MLflow
    status: str | None = None  # the status the run was closed with
    sent: int = 0  # records taken by MLflow so far
    client: Any = None  # an MlflowClient for `uri` (made on first use when None)
    # the outage counts the closed run is tagged with: live, the Tracker's at that moment (an outage that ends as the
    # finish line is sent is longer than the line says); a backfill, the job's last (`segments`); None: the line's
    outage: Callable[[], dict[str, Any]] | None = None
    _start: dict[str, Any] = field(default_factory=dict)

    def pending(self) -> int:
        """Records after the offset, not yet in MLflow."""
        return sum(1 for line in read_lines(self.path, self.offset, self.stop)
                   if line.record.get("event") not in BOOKKEEPING)

    def send(self) -> int:
        """Send every complete line after the offset; returns how many went. Raises Unavailable, leaving the offset
        at the first line MLflow did not take."""
        lines = read_lines(self.path, self.offset, self.stop)
        before = self.sent
        i = 0
        while i < len(lines):
            record = lines[i].record
            event = record.get("event")
            if event == "start":
                self._do("start", self._open_run, record)
            elif self.run_id is None or event in BOOKKEEPING:
                pass  # notes; or lines of a run MLflow refused to create, which have nowhere to go
            elif is_figures(record):
                j = i + 1  # one call per log window would be slow to catch up: consecutive windows go together
                while j < len(lines) and j - i < WINDOWS_PER_CALL and is_figures(lines[j].record):
                    j += 1
                self._do("log_metrics", self._metrics, [line.record for line in lines[i:j]])
                self._advance(lines[i:j])
                i = j
                continue
            elif event == "artifact":
                self._do("log_artifact", self._artifact, record)
            elif event == "datasets":
                self._do("log_inputs", self._datasets, record)
            elif event == "finish":
                self._do("finish", self._finish, record)
            self._advance(lines[i:i + 1])
            i += 1
        return self.sent - before

    # --- one line at a time ---------------------------------------------------------------------------------

    def _advance(self, lines: list[Line]) -> None:
        self.offset = lines[-1].end
        self.sent += sum(1 for line in lines if line.record.get("event") not in BOOKKEEPING)

    def _do(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - MLflow's and the transport's errors alike
            if not refused(err):
                raise Unavailable(what, err) from err
            self.note({"event": "mlflow_refused", "segment": self.segment, "during": what,
                       "error": f"{type(err).__name__}: {err}"[:2000], "time": time.time()})

    def mlflow(self):
        if self.client is None:
            self.client = client_for(self.uri)
        return self.client

    def _open_run(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        self._start = record
        self.segment = record.get("segment")
        self.uri = self.uri or record.get("uri")
        client = self.mlflow()
        experiment_id = ensure_experiment(client, record["experiment"], self.uri)
        resume = record.get("resume_run_id")
        known = self.run_id
        if self.run_id is None and resume:
            try:
                client.get_run(resume)
                self.run_id = resume
            except Exception as err:  # noqa: BLE001
                if not refused(err):
                    raise
                print(f"[tracking] MLflow run {resume} not found at {self.uri}; starting a new run", flush=True)
        tags = {k: str(v) for k, v in record.get("tags", {}).items()}
        reopened = self.run_id is not None and self.run_id == resume
        if self.run_id is None:
            run = client.create_run(experiment_id, start_time=millis(record["time"]), tags=tags,
                                    run_name=record.get("run_name") or None)
            self.run_id = run.info.run_id
        elif self.live and reopened:
            client.update_run(self.run_id, status="RUNNING")
        if known is None:
            self.note({"event": "mlflow_run", "segment": self.segment, "run_id": self.run_id, "uri": self.uri,
                       "time": time.time()})
        if tags and self.latest:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        params = record.get("params", {})
        if reopened and self.resume_params is not None:
            params = self.resume_params  # decided when this job's start was first sent (the run has moved on since)
        elif reopened:
            changes = resume_changes(client.get_run(self.run_id).data.params, params)
            n = next(iter(changes)).split(".")[1] if changes else None
            params = {**changes, f"resume.{n}.at_step": str(record.get("step", 0))} if changes else {}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=items[i:i + PARAMS_PER_BATCH])
        if reopened and self.resume_params is None:
            self.resume_params = params
            self.note({"event": "mlflow_params", "segment": self.segment, "params": params})

    def _metrics(self, records: list[dict[str, Any]]) -> None:
        import math

        from mlflow.entities import Metric

        batch = []
        start_time = self._start.get("time", 0.0)
        for record in records:
            stamp = millis(record.get("time", start_time))
            for key, value in record.items():
                if key in ("kind", "step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if math.isfinite(value):
                    batch.append(Metric(f"{record['kind']}/{key}", float(value), stamp, int(record["step"])))
        for i in range(0, len(batch), METRICS_PER_BATCH):
            self.mlflow().log_batch(self.run_id, metrics=batch[i:i + METRICS_PER_BATCH])

    def _artifact(self, record: dict[str, Any]) -> None:
        if Path(record["path"]).is_file():
            self.mlflow().log_artifact(self.run_id, record["path"], record.get("folder"))
        else:
            self.note({"event": "mlflow_refused", "segment": self.segment, "during": "log_artifact",
                       "error": f"{record['path']} no longer exists", "time": time.time()})

    def _datasets(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(d["name"], d["digest"], "local", json.dumps({"uri": d["source"]}),
                                       d.get("schema"), d.get("profile")),
                               [InputTag(DATASET_CONTEXT_TAG, d["context"])]) for d in record["datasets"]]
        self.mlflow().log_inputs(self.run_id, datasets=inputs)

    def _finish(self, record: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        counts = self.outage() if self.outage is not None else record
        outage = [RunTag(tag, str(counts[key])) for key, tag in OUTAGE_TAGS.items() if key in counts]
        if outage and self.latest:
            self.mlflow().log_batch(self.run_id, tags=outage)
        if self.latest:
            self.mlflow().set_terminated(self.run_id, record["status"], end_time=millis(record["time"]))
        self.finished, self.status = True, record["status"]
        self.note({"event": "mlflow_synced", "segment": self.segment, "run_id": self.run_id, "time": time.time()})


# --- backfill: a run that ended while MLflow was away ----------------------------------------------------------

@dataclass
class Segment:
    id: str
    start: int  # offset of its start line
    stop: int  # offset after its last line
    uri: str | None  # the store the job used (None: MLflow off)
    resume_run_id: str | None  # the run the job was told to reopen
    run_id: str | None = None  # the run its lines went to (a `mlflow_run` note)
    resume_params: dict[str, str] | None = None  # what reopening it logged (a `mlflow_params` note)
    synced: bool = False
    finished: bool = False  # the job wrote its `finish` line
    outage: dict[str, Any] = field(default_factory=dict)  # OUTAGE_TAGS' counts, the latest the job wrote


def segments(path: Path) -> list[Segment]:
    """The jobs recorded in a metrics.jsonl, in file order."""
    found: list[Segment] = []
    by_id: dict[str, Segment] = {}
    previous_end = 0
    for line in read_lines(path, 0):
        record, event = line.record, line.record.get("event")
        if event == "start" and record.get("segment"):
            found.append(Segment(record["segment"], previous_end, line.end, record.get("uri"),
                                 record.get("resume_run_id")))
            by_id[record["segment"]] = found[-1]
        elif found:
            found[-1].stop = line.end
        owner = by_id.get(record.get("segment")) if event in BOOKKEEPING | {"finish"} else None
        if owner is not None:
            if event == "mlflow_run":
                owner.run_id = record["run_id"]
            elif event == "mlflow_params":
                owner.resume_params = record["params"]
            elif event == "mlflow_synced":
                owner.synced = True
            elif event == "finish":
                owner.finished = True
            owner.outage.update({key: record[key] for key in OUTAGE_TAGS if key in record})
        previous_end = line.end
    return found


def backfill(output_dir: Path, uri: str | None = None, echo=print) -> bool:
    """Send what MLflow is missing of every job recorded in <output_dir>/metrics.jsonl and close each finished job's
    run with the status it ended with. uri: the store (default: the one each job used; a job that ran with MLflow
    off is sent only to a store named here). True when every job is in MLflow and closed; a job still running (no
    `finish` line yet) is sent as far as it got. Raises Unavailable while MLflow is still away."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {output_dir} a job's output_dir?)")

    def note(record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    complete = True
    jobs = segments(path)
    todo = [s for s in jobs if not s.synced]
    if not todo:
        echo(f"[backfill] {path}: every job recorded there is already in MLflow")
    for seg in todo:
        job_uri = uri or seg.uri
        if not job_uri:
            echo(f"[backfill] job {seg.id} ran with MLflow off: name a store with --tracking-uri to send it")
            complete = False
            continue
        later = jobs[jobs.index(seg) + 1:]
        latest = seg.run_id is None or not any(seg.run_id in (j.run_id, j.resume_run_id) for j in later)
        sync = Sync(path, seg.start, note, stop=seg.stop, uri=job_uri, live=False, run_id=seg.run_id,
                    resume_params=seg.resume_params, latest=latest, outage=lambda counts=seg.outage: counts)
        sync.send()
        state = ("left open: the job wrote no finish line (still running, or killed)" if not sync.finished else
                 f"closed as {sync.status}" if latest else "a later job continued the run and set its status")
        echo(f"[backfill] job {seg.id}: {sync.sent} record(s) sent to run {sync.run_id} at {job_uri}; {state}")
        complete &= sync.finished
    return complete
