"""MLflow never stalls training: a real `mlflow server` (sqlite backend in a temporary folder, 127.0.0.1, a free
port) is stopped in the middle of a real training run (torchrun, 2 processes, the tiny model, 30 steps logged every
2) and started again while the run goes on.

Asserted:
- no log window takes more than a few seconds longer while the server is away (the training thread only appends
  to metrics.jsonl; a background thread talks to MLflow), and the job exits 0;
- the run ends FINISHED in MLflow with every point, each equal to the one in metrics.jsonl: what was logged during
  the outage was sent when the server came back;
- a run that ends while the server is still away (a Tracker in this process, with finish_wait_s=0) says so, names
  the command, and `python -m pretrain.core backfill <output_dir>` later sends its missing points and closes it
  FINISHED (a second backfill changing nothing is tests/test_tracking.py's);
- each run counts the outage (tag tandem.mlflow_outages) and how long it lasted.

The server is killed (SIGKILL to its process group: gone at once, as in a crash) rather than asked to stop, which
also keeps the test short.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_pretrain_distributed import ENV, TINY, base_overrides, pretrain_shards  # noqa: F401  (the shard fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY = 30, 2
STOP_AT, RESTART_AFTER = 6, 14  # the server is stopped once step 6 is logged, started again once step 14 is
STALL_TOLERANCE_S = 5.0  # "a few seconds": a window during the outage may exceed the usual one by at most this
SERVER_START_S = 240  # a loaded 2-core machine can take minutes to start `mlflow server` (uvicorn + migrations)


class MlflowServer:
    """`mlflow server` with a sqlite backend and local artifacts, started and killed as a process group."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server_{self.starts}.log", "w")
        env = dict(ENV, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner process: a lighter server
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> float:
        start = time.time()
        while time.time() - start < SERVER_START_S:
            assert self.proc.poll() is None, (self.root / f"server_{self.starts}.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.time()
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"mlflow server not up after {SERVER_START_S} s")

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(out: Path) -> list[dict]:
    return [r for r in records(out) if r.get("kind") == "train"] if (out / "metrics.jsonl").is_file() else []


def wait_for_step(out: Path, step: int, job: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in train_records(out)):
            return
        assert job.poll() is None, f"the job ended before step {step}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not logged after {timeout} s:\n{log.read_text()[-4000:]}")


def the_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.fixture
def server(tmp_path):
    from conftest import free_port

    root = tmp_path / "server"
    root.mkdir()
    srv = MlflowServer(root, free_port())
    srv.start()
    srv.wait_ready()
    yield srv
    srv.kill()


def test_a_stopped_mlflow_server_never_stalls_training_and_the_run_is_completed(server, pretrain_shards, tmp_path,
                                                                                 capfd, monkeypatch):
    from mlflow.tracking import MlflowClient

    from conftest import free_port
    from pretrain.core.tracking import BACKFILL_COMMAND, HTTP_LIMITS, Tracker

    env = {k: v for k, v in ENV.items() if k not in HTTP_LIMITS}  # the job runs with the tracker's own limits
    for var, value in HTTP_LIMITS.items():  # and so does the Tracker here (restored after the test)
        monkeypatch.setenv(var, value)
    # A run in this process that will end while the server is away (the backfill command's case).
    direct = Tracker(tmp_path / "direct", active=True, uri=server.url, experiment="direct", finish_wait_s=0)
    direct_run = direct.start("direct", {"train": {"steps": 4}}, {"kind": "test"}, [])
    assert direct_run is not None
    direct.log_metrics({"loss": 4.0}, step=1)
    direct.log_metrics({"loss": 3.0}, step=2)

    out, log = tmp_path / "job", tmp_path / "job.log"
    overrides = [o for o in base_overrides(out, STEPS) if not o.startswith(("tracking.", "train.log_every"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain", "--config", TINY, *overrides,
           *pretrain_shards, f"train.log_every={LOG_EVERY}", "eval.batches=0", "data.eval_overrides=[]",
           "eval.at_end=false", "tracking.mlflow=true", f"tracking.uri={server.url}",
           "tracking.experiment=outage", "tracking.finish_wait_s=300"]
    job = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_step(out, STOP_AT, job, log)
        server.kill()
        stopped = time.time()  # the server process has exited

        direct.log_metrics({"loss": 2.0}, step=3)
        direct.log_metrics({"loss": 1.0}, step=4)
        direct.finish("FINISHED")  # finish_wait_s=0: one more try, then the command to run later
        hint = capfd.readouterr().err
        assert f"{BACKFILL_COMMAND} {tmp_path / 'direct'}" in hint, hint
        direct_events = [r["event"] for r in records(tmp_path / "direct") if "event" in r]
        assert "finish" in direct_events and direct_events[-1] == "mlflow_pending", direct_events

        wait_for_step(out, RESTART_AFTER, job, log)
        server.start()
        back = server.wait_ready()
        code = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]

    # Training went on at its pace while the server was away.
    windows = train_records(out)
    assert [r["step"] for r in windows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    gaps = [(b["time"] - a["time"], stopped < b["time"] < back) for a, b in zip(windows, windows[1:])]
    during = [gap for gap, away in gaps if away]
    assert during, f"no window logged while the server was away ({stopped} .. {back}): {gaps}"
    usual = statistics.median(gap for gap, _ in gaps)
    assert max(during) < usual + STALL_TOLERANCE_S, (max(during), usual, gaps)
    print(f"{len(during)} window(s) while the server was away for {back - stopped:.0f} s: longest {max(during):.2f} s, "
          f"median of all {usual:.2f} s")
    assert "is reachable again" in text and "training goes on" in text, text[-4000:]
    assert "was unreachable 1 time(s)" in text, text[-4000:]

    # ... and MLflow ends with the whole run, closed with its true status.
    client = MlflowClient(tracking_uri=server.url)
    run = the_run(client, "outage")
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == {r["step"]: r["loss"] for r in windows}
    events = [r["event"] for r in records(out) if "event" in r]
    assert (events.count("mlflow_unreachable"), events.count("mlflow_reachable"), events.count("mlflow_synced")) \
        == (1, 1, 1) and "mlflow_pending" not in events, events
    # The outage is counted on the run: once, for about as long as the server was down (the sync thread notices
    # within one HTTP timeout and retries every RETRY_S).
    assert run.data.tags["tandem.mlflow_outages"] == "1"
    assert back - stopped - 30 < float(run.data.tags["tandem.mlflow_outage_s"]) < back - stopped + 30

    # The run that ended during the outage: pending until the command sends the rest and closes it.
    direct_client_run = client.get_run(direct_run)
    assert direct_client_run.info.status == "RUNNING"
    assert sorted(m.step for m in client.get_metric_history(direct_run, "train/loss")) == [1, 2]
    done = subprocess.run([sys.executable, "-m", "pretrain.core", "backfill", str(tmp_path / "direct")],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "6 record(s) sent to run" in done.stdout, done.stdout + done.stderr
    closed = client.get_run(direct_run)
    assert closed.info.status == "FINISHED" and closed.data.tags["tandem.mlflow_outages"] == "1"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(direct_run, "train/loss"),
                                              key=lambda m: m.step)] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
