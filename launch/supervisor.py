"""Auto-resume: run the launcher; when the job dies (a killed rank, a lost node), start it again from the latest
complete checkpoint, up to `max_restarts` times.

Each attempt runs in its own process group, so whatever the dead attempt leaves behind (ranks the launcher did
not reap) is stopped before the next one starts and cannot hold the master port. Restarts add the stage's resume
flag; the stage loads the checkpoint its `latest` pointer names (written only after every rank finished saving)
and reopens its MLflow run. A checkpoint the stage finds broken (its files differ from its manifest, or it fails to
load) is marked and `latest` moved back past it by the stage itself (pretrain/core/checkpoint.py), so the pointer
this supervisor reads never names a checkpoint that already failed, and no restart tries it again.

Every rank gets TANDEM_LAUNCH_ID (one id per launch, shared by all its attempts) and TANDEM_RESTART (0, 1, ...);
the stage tags its MLflow run with them (tandem.launch_id, tandem.restart), which is how node 0's supervisor finds
the job's run to record the restarts on (tags launch.restarts and launch.restart_<n>, metric launch/restarts).
Every attempt and restart is also printed and appended to <job dir>/supervisor.jsonl.

No restart when the job cannot get better by trying again: a launcher exit code of 2 (the stage rejected its
config), a stage whose --validate-only now rejects its config (launchers such as torchrun report a rank's exit
code 2 as their own 1, and a node whose ranks lost their peers fails with another code; the check runs with the
resume flag, as the restart would: a checkpoint the job cannot continue, or none intact, is such a rejection), or
SIGINT / SIGTERM (Ctrl-C, Slurm preemption), which are passed to the job and end supervision.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from configs import ConfigError
from launch.command import LaunchPlan, write_files
from launch.stage import StageInfo

# A stage exits 2 when its config is wrong (before any process group starts): restarting cannot help.
NO_RESTART_CODE = 2
GRACE_S = 15.0  # how long leftover processes of a dead attempt get after SIGTERM before SIGKILL
LAUNCH_ID_VAR, RESTART_VAR = "TANDEM_LAUNCH_ID", "TANDEM_RESTART"  # exported to every rank
LAUNCH_ID_TAG = "tandem.launch_id"  # the stage's MLflow tag holding TANDEM_LAUNCH_ID


def new_launch_id(name: str, environ: Mapping[str, str], now: float | None = None) -> str:
    """One id per launch. $TANDEM_LAUNCH_ID when set (per-node launchers given the same one); inside a Slurm step
    the job, step and requeue count, which every node's launcher reads alike; else name, time and a random part."""
    given = environ.get(LAUNCH_ID_VAR, "")
    if given:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", given):
            raise ConfigError(f"{LAUNCH_ID_VAR}={given!r}: use letters, digits, '.', '_' and '-' only")
        return given
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_STEP_ID"):
        return (f"slurm-{environ['SLURM_JOB_ID']}.{environ['SLURM_STEP_ID']}"
                f"-r{environ.get('SLURM_RESTART_COUNT') or 0}")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:100] or "job"  # goes into MLflow filters and env files
    return f"{safe}-{stamp}-{uuid.uuid4().hex[:8]}"


def job_vars(launch_id: str, restart: int) -> dict[str, str]:
    return {LAUNCH_ID_VAR: launch_id, RESTART_VAR: str(restart)}


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
    def __init__(self, plan_for: Callable[[bool, dict[str, str]], LaunchPlan], cwd: Path, stage: StageInfo, *,
                 launch_id: str, max_restarts: int, backoff_s: float, log_path: Path,
                 revalidate: Callable[[], str | None] | None = None, resume_first: bool = False,
                 record_mlflow: bool = True, echo: Callable[[str], None] | None = None):
        self.plan_for = plan_for  # (resume?, job variables) -> the attempt's command, environment and files
        self.launch_id = launch_id
        self.revalidate = revalidate  # () -> why the stage now rejects its config, or None
        self.cwd = cwd
        self.stage = stage
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.log_path = log_path
        self.resume_first = resume_first
        self.record_mlflow = record_mlflow and stage.mlflow
        self.echo = echo or (lambda text: print(f"[launch] {text}", flush=True))
        self.restarts: list[Restart] = []
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

    def run_attempt(self, plan: LaunchPlan) -> int:
        write_files(plan)  # .deepspeed_env carries this attempt's TANDEM_RESTART to nodes started over ssh
        self._proc = subprocess.Popen(plan.argv, cwd=self.cwd, env={**os.environ, **plan.env},
                                      start_new_session=True)
        if self._stop_signal is not None:  # came before Popen: _on_signal had no process to forward it to
            os.killpg(self._proc.pid, self._stop_signal)
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
        self.echo(f"launch id {self.launch_id} (MLflow tag {LAUNCH_ID_TAG})")
        self._log("launch", launch_id=self.launch_id, max_restarts=self.max_restarts)
        while True:
            plan = self.plan_for(resume, job_vars(self.launch_id, len(self.restarts)))
            self.echo(f"attempt {attempt}/{self.max_restarts + 1}: {plan.shell()}")
            self._log("attempt_start", attempt=attempt, argv=plan.argv, resume=resume, restart=len(self.restarts))
            started = time.monotonic()
            code = self.run_attempt(plan)
            self._log("attempt_end", attempt=attempt, code=code, seconds=round(time.monotonic() - started, 1))
            if code == 0:
                self.echo(f"attempt {attempt} finished" + (f" after {len(self.restarts)} restart(s)"
                                                            if self.restarts else ""))
                self.record()
                return 0
            if self._stop_signal is not None:
                return self._stopped()
            if code == NO_RESTART_CODE:
                self.echo(f"attempt {attempt} failed ({describe_exit(code)}: the stage rejected its config); "
                          "not restarting")
                self._log("config_rejected", attempt=attempt, code=code, error="")
                self.record()
                return code
            if len(self.restarts) >= self.max_restarts:
                self.echo(f"attempt {attempt} failed ({describe_exit(code)}); no restarts left "
                          f"(max_restarts={self.max_restarts})")
                self._log("gave_up", attempt=attempt, code=code)
                self.record()
                return code if code > 0 else 128 - code
            problem = self.revalidate() if self.revalidate else None
            if self._stop_signal is not None:  # arrived while the config was re-checked: no restart to record
                return self._stopped()
            if problem:
                self.echo(f"attempt {attempt} failed ({describe_exit(code)}) and the stage rejects its config: "
                          f"{problem}; not restarting")
                self._log("config_rejected", attempt=attempt, code=code, error=problem)
                self.record()
                return NO_RESTART_CODE
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
                return self._stopped()
            attempt, resume = attempt + 1, True

    def _stopped(self) -> int:
        self.echo(f"stopped by {signal.Signals(self._stop_signal).name}; not restarting")
        self._log("stopped", signal=self._stop_signal)
        self.record()
        return 128 + self._stop_signal

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._stop_signal is None:
            time.sleep(min(0.2, seconds))

    # --- MLflow ------------------------------------------------------------------------------------------

    def record(self) -> None:
        """Write the restarts so far onto the job's MLflow run: the run tagged with this launch id. Failures only
        warn: tracking never stops a job."""
        if not self.record_mlflow:
            return
        try:
            run_id = record_restarts(self.stage.tracking_uri, self.launch_id, self.restarts, already=self._recorded)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop the job
            warnings.warn(f"could not record restarts in MLflow ({type(err).__name__}: {err})", RuntimeWarning,
                          stacklevel=2)
            return
        if run_id is None:
            self._log("mlflow", run_id=None, note=f"no run tagged {LAUNCH_ID_TAG}={self.launch_id} yet")
            return
        self._recorded = len(self.restarts)
        self._log("mlflow", run_id=run_id, restarts=len(self.restarts))


def find_job_run(client, launch_id: str):
    """The run the stage tagged with this launch id, in any experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`{LAUNCH_ID_TAG}` = '{launch_id}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def record_restarts(tracking_uri: str, launch_id: str, restarts: list[Restart], already: int = 0) -> str | None:
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        return None  # no store yet, so no run: opening it would create an empty database
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = find_job_run(client, launch_id)
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
