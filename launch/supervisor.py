"""Auto-resume: run the launcher; when the job dies (a killed rank, a lost node), start it again from the latest
complete checkpoint, up to `max_restarts` times.

Each attempt runs in its own process group, so whatever the dead attempt leaves behind (ranks the launcher did
not reap) is stopped before the next one starts and cannot hold the master port. Restarts add the stage's resume
flag; the stage loads the checkpoint its `latest` pointer names (written only after every rank finished saving)
and reopens its MLflow run. Every attempt and restart is printed, appended to <job dir>/supervisor.jsonl, and
recorded on the job's MLflow run (tags launch.restarts and launch.restart_<n>, metric launch/restarts) by node 0.

SIGINT / SIGTERM (Ctrl-C, Slurm preemption) are passed to the job and end supervision: no restart.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from launch.stage import StageInfo

# A stage exits 2 when its config is wrong (before any process group starts): restarting cannot help.
NO_RESTART_CODES = frozenset({2})
GRACE_S = 15.0  # how long leftover processes of a dead attempt get after SIGTERM before SIGKILL


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(code: int) -> str:
    """A launcher's exit status in words. Launchers fold a rank's death by signal into their own exit code:
    shells and torchrun as 128 + signal, the deepspeed launcher as 256 - signal (sys.exit of the negative code)."""
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if 128 < code < 160:
        return f"exit code {code} (128 + {code - 128}: a process ended by {_signal_name(code - 128)}?)"
    if 224 < code < 256:
        return f"exit code {code} (256 - {256 - code}: a rank ended by {_signal_name(256 - code)}?)"
    return f"exit code {code}"


@dataclass
class Restart:
    number: int  # 1, 2, ...
    failed_attempt_exit: int
    resumed_from: str  # checkpoint tag, or "" when no complete checkpoint existed (the job starts over)
    time: float

    @property
    def resumed_step(self) -> int:
        return int(self.resumed_from.split("_")[-1]) if self.resumed_from else 0

    def text(self) -> str:
        start = (f"resumed from {self.resumed_from}" if self.resumed_from
                 else "restarted from step 0 (no checkpoint yet)")
        return f"attempt {self.number} {describe_exit(self.failed_attempt_exit)}; {start}"


class Supervisor:
    def __init__(self, argv_for: Callable[[bool], list[str]], env: dict[str, str], cwd: Path, stage: StageInfo, *,
                 max_restarts: int, backoff_s: float, log_path: Path, resume_first: bool = False,
                 record_mlflow: bool = True, echo: Callable[[str], None] | None = None):
        self.argv_for = argv_for  # resume? -> the launcher's argv
        self.env = env
        self.cwd = cwd
        self.stage = stage
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.log_path = log_path
        self.resume_first = resume_first
        self.record_mlflow = record_mlflow and stage.mlflow
        self.echo = echo or (lambda text: print(f"[launch] {text}", flush=True))
        self.restarts: list[Restart] = []
        self.started_ms = int(time.time() * 1000)
        self._proc: subprocess.Popen | None = None
        self._stop_signal: int | None = None
        self._recorded = 0  # restarts already logged as MLflow metrics

    # --- logging -----------------------------------------------------------------------------------------

    def _log(self, event: str, **fields) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n")

    # --- signals -----------------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    def _reap_group(self, pgid: int) -> None:
        """Stop what is left of an attempt's process group (ranks a dead launcher did not reap)."""
        for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)

    # --- the loop ----------------------------------------------------------------------------------------

    def run_attempt(self, argv: Sequence[str]) -> int:
        self._proc = subprocess.Popen(list(argv), cwd=self.cwd, env={**os.environ, **self.env},
                                      start_new_session=True)
        try:
            code = self._proc.wait()
        finally:
            self._reap_group(self._proc.pid)
        return code

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _loop(self) -> int:
        attempt, resume = 1, self.resume_first
        while True:
            argv = self.argv_for(resume)
            self.echo(f"attempt {attempt}/{self.max_restarts + 1}: {shlex.join(argv)}")
            self._log("attempt_start", attempt=attempt, argv=argv, resume=resume)
            started = time.monotonic()
            code = self.run_attempt(argv)
            self._log("attempt_end", attempt=attempt, code=code, seconds=round(time.monotonic() - started, 1))
            if code == 0:
                self.echo(f"attempt {attempt} finished" + (f" after {len(self.restarts)} restart(s)"
                                                            if self.restarts else ""))
                self.record()
                return 0
            if self._stop_signal is not None:
                self.echo(f"stopped by {signal.Signals(self._stop_signal).name}; not restarting")
                self._log("stopped", signal=self._stop_signal)
                return 128 + self._stop_signal
            if code in NO_RESTART_CODES:
                self.echo(f"attempt {attempt} failed ({describe_exit(code)}: the stage rejected its config); "
                          "not restarting")
                return code
            if len(self.restarts) >= self.max_restarts:
                self.echo(f"attempt {attempt} failed ({describe_exit(code)}); no restarts left "
                          f"(max_restarts={self.max_restarts})")
                self._log("gave_up", attempt=attempt, code=code)
                self.record()
                return code if code > 0 else 128 - code
            tag = self.stage.latest_checkpoint() or ""
            restart = Restart(len(self.restarts) + 1, code, tag, time.time())
            self.restarts.append(restart)
            where = f"{self.stage.checkpoint_dir / tag}" if tag else "step 0 (no complete checkpoint yet)"
            self.echo(f"attempt {attempt} failed ({describe_exit(code)}); restart {restart.number}/{self.max_restarts} "
                      f"from {where} in {self.backoff_s:g}s")
            self._log("restart", **asdict(restart))
            self.record()
            self._sleep(self.backoff_s)
            if self._stop_signal is not None:
                return 128 + self._stop_signal
            attempt, resume = attempt + 1, True

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._stop_signal is None:
            time.sleep(min(0.2, seconds))

    # --- MLflow ------------------------------------------------------------------------------------------

    def record(self) -> None:
        """Write the restarts so far onto the job's MLflow run (the newest run of the stage's experiment and run
        name started since this supervisor began). Failures only warn: tracking never stops a job."""
        if not self.record_mlflow:
            return
        try:
            run_id = record_restarts(self.stage, self.restarts, self.started_ms, already=self._recorded)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop the job
            warnings.warn(f"could not record restarts in MLflow ({type(err).__name__}: {err})", RuntimeWarning,
                          stacklevel=2)
            return
        if run_id is not None:
            self._recorded = len(self.restarts)
            self._log("mlflow", run_id=run_id, restarts=len(self.restarts))


def find_job_run(client, stage: StageInfo, since_ms: int):
    experiment = client.get_experiment_by_name(stage.experiment)
    if experiment is None:
        return None
    name = stage.run_name.replace("'", "\\'")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.run_name = '{name}' and attributes.start_time >= {since_ms}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:  # a resumed job reopens the run its checkpoint names, which may have started earlier
        runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        runs = [r for r in runs if (r.info.end_time or 0) >= since_ms or r.info.status == "RUNNING"]
    return runs[0] if runs else None


def record_restarts(stage: StageInfo, restarts: list[Restart], since_ms: int, already: int = 0) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stage.tracking_uri)
    run = find_job_run(client, stage, since_ms)
    if run is None:
        return None
    run_id = run.info.run_id
    client.set_tag(run_id, "launch.restarts", str(len(restarts)))
    for r in restarts:
        client.set_tag(run_id, f"launch.restart_{r.number}", r.text())
    for r in restarts[already:]:
        client.log_metric(run_id, "launch/restarts", float(r.number), timestamp=int(r.time * 1000),
                          step=r.resumed_step)
    return run_id


if __name__ == "__main__":  # pragma: no cover - use `python -m launch`
    sys.exit("run `python -m launch --config configs/launch/<cluster>.yaml -- <stage> [args]`")
