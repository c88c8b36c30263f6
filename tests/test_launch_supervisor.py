"""The supervisor's restart rules with small real processes (the full SIGKILL-a-rank test with DeepSpeed is in
test_launch_multinode.py): resume flag on restarts, the checkpoint it resumes from, the launch id and restart
number every attempt gets, the restart budget, no restart for a rejected config or a stop signal, and leftovers of
a dead attempt stopped before the next one starts.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from configs import ConfigError as LaunchConfigError
from launch.command import LaunchPlan
from launch.stage import StageInfo
from launch.supervisor import Supervisor, new_launch_id

# A stand-in job: fails with the exit code in FAIL_CODE unless started with --resume; writes its args and the
# launch variables it was given.
JOB = """
import os, sys
open(os.environ["JOB_LOG"], "a").write(" ".join(sys.argv[1:]) + f" id={os.environ['TANDEM_LAUNCH_ID']} "
                                       f"restart={os.environ['TANDEM_RESTART']}\\n")
sys.exit(0 if "--resume" in sys.argv else int(os.environ["FAIL_CODE"]))
"""
LAUNCH_ID = "test-20260101-000000-abcdef01"


def stage_at(tmp_path: Path, tag: str | None) -> StageInfo:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    if tag:
        (ckpt / tag).mkdir()
        (ckpt / "latest").write_text(tag)
    return StageInfo(name="pretrain", config_file=tmp_path / "cfg.yaml", args=(), output_dir=tmp_path,
                     checkpoint_dir=ckpt, tensor_parallel=1, mlflow=False, tracking_uri="", shards=(),
                     latest_pointer="latest")


def plans(argv: list[str], env: dict[str, str] | None = None):
    """plan_for: the command (with --resume on restarts) and the job variables in its environment."""
    return lambda resume, job_vars: LaunchPlan(argv=argv + (["--resume"] if resume else []),
                                               env={**(env or {}), **job_vars}, files={})


def supervisor(tmp_path: Path, stage: StageInfo, argv: list[str], max_restarts: int, lines: list[str],
               revalidate=None) -> Supervisor:
    return Supervisor(plans(argv, {"JOB_LOG": str(tmp_path / "job")}), cwd=tmp_path, stage=stage,
                      launch_id=LAUNCH_ID, max_restarts=max_restarts, backoff_s=0,
                      log_path=tmp_path / "supervisor.jsonl", revalidate=revalidate, echo=lines.append)


def events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "supervisor.jsonl").read_text().splitlines()]


def test_restart_resumes_from_the_latest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_CODE", "1")
    lines: list[str] = []
    sup = supervisor(tmp_path, stage_at(tmp_path, "step_00000020"), [sys.executable, "-c", JOB, "--config", "c"], 2,
                     lines)
    assert sup.run() == 0
    assert (tmp_path / "job").read_text().splitlines() == [f"--config c id={LAUNCH_ID} restart=0",
                                                           f"--config c --resume id={LAUNCH_ID} restart=1"]
    assert events(tmp_path)[0]["event"] == "launch" and events(tmp_path)[0]["launch_id"] == LAUNCH_ID
    restart = [e for e in events(tmp_path) if e["event"] == "restart"]
    assert [(r["number"], r["failed_attempt_exit"], r["resumed_from"]) for r in restart] == [(1, 1, "step_00000020")]
    assert any(f"restart 1/2 from {tmp_path / 'checkpoints' / 'step_00000020'}" in line for line in lines)
    assert sup.restarts[0].text() == "attempt 1 exit code 1; resumed from step_00000020"


def test_no_checkpoint_yet_restarts_from_step_0(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_CODE", "3")
    lines: list[str] = []
    sup = supervisor(tmp_path, stage_at(tmp_path, None), [sys.executable, "-c", JOB], 1, lines)
    assert sup.run() == 0
    assert sup.restarts[0].resumed_from == ""
    assert any("restart 1/1 from step 0 (no complete checkpoint yet)" in line for line in lines)


def test_restart_budget_and_rejected_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_CODE", "5")
    always_fails = [sys.executable, "-c", "import sys; sys.exit(5)"]
    lines: list[str] = []
    assert supervisor(tmp_path, stage_at(tmp_path, None), always_fails, 2, lines).run() == 5
    assert [e["event"] for e in events(tmp_path)].count("attempt_start") == 3 and "no restarts left" in lines[-1]
    (tmp_path / "supervisor.jsonl").unlink()
    bad_config = [sys.executable, "-c", "import sys; sys.exit(2)"]  # what a stage returns for a bad config
    assert supervisor(tmp_path, stage_at(tmp_path / "b", None), bad_config, 3, lines).run() == 2
    assert [e["event"] for e in events(tmp_path)].count("attempt_start") == 1 and "not restarting" in lines[-1]


def test_a_config_the_stage_now_rejects_is_not_restarted(tmp_path, monkeypatch):
    """A launcher that reports a rank's exit code 2 as its own 1 (torchrun): the supervisor asks the stage again
    before restarting, and a config error ends the job with exit code 2 after one attempt."""
    monkeypatch.setenv("FAIL_CODE", "1")
    lines: list[str] = []
    asked: list[int] = []

    def revalidate():
        asked.append(1)
        return "error: tiny.yaml: optim.lr: must be > 0, got -1.0"

    sup = supervisor(tmp_path, stage_at(tmp_path, "step_00000004"), [sys.executable, "-c", JOB], 3, lines, revalidate)
    assert sup.run() == 2
    assert asked == [1] and sup.restarts == []
    assert [e["event"] for e in events(tmp_path)] == ["launch", "attempt_start", "attempt_end", "config_rejected"]
    assert lines[-1] == ("attempt 1 failed (exit code 1) and the stage rejects its config: error: tiny.yaml: optim.lr: "
                         "must be > 0, got -1.0; not restarting")
    # The check says nothing against the config: the restart goes ahead.
    (tmp_path / "supervisor.jsonl").unlink()
    sup = supervisor(tmp_path, stage_at(tmp_path / "b", None), [sys.executable, "-c", JOB], 3, lines, lambda: None)
    assert sup.run() == 0 and len(sup.restarts) == 1


def test_launch_ids():
    assert new_launch_id("local_cpu", {"TANDEM_LAUNCH_ID": "my-run.7"}) == "my-run.7"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "2"}
    assert new_launch_id("slurm-4242", slurm) == "slurm-4242.0-r2"  # every node's launcher derives the same id
    assert new_launch_id("slurm-4242", {**slurm, "SLURM_RESTART_COUNT": ""}) == "slurm-4242.0-r0"
    a, b = new_launch_id("local_cpu", {}, now=0.0), new_launch_id("local_cpu", {}, now=0.0)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(0.0))
    assert re.fullmatch(rf"local_cpu-{stamp}-[0-9a-f]{{8}}", a) and a != b  # the random part tells them apart
    with pytest.raises(LaunchConfigError, match="TANDEM_LAUNCH_ID='a b'"):
        new_launch_id("x", {"TANDEM_LAUNCH_ID": "a b"})


def test_leftovers_of_a_dead_attempt_are_stopped(tmp_path):
    """The attempt's launcher dies but leaves a child running (as a SIGKILLed launcher leaves its ranks); the
    child is gone before the next attempt starts."""
    pid_file = tmp_path / "orphan.pid"
    script = f"sleep 300 & echo $! > {pid_file}; exit 1"
    lines: list[str] = []
    sup = Supervisor(lambda resume, job_vars: LaunchPlan(["bash", "-c", "exit 0" if resume else script], {}, {}),
                     cwd=tmp_path, stage=stage_at(tmp_path, None), launch_id=LAUNCH_ID, max_restarts=1, backoff_s=0,
                     log_path=tmp_path / "supervisor.jsonl", echo=lines.append)
    assert sup.run() == 0
    orphan = int(pid_file.read_text())
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE


def test_sigterm_stops_without_restart(tmp_path):
    """Ctrl-C / Slurm preemption: the signal goes to the job and supervision ends (run in a child process, so the
    test's own signal handlers stay untouched)."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from pathlib import Path
from test_launch_supervisor import plans, stage_at
from launch.supervisor import Supervisor
tmp = Path({str(tmp_path)!r})
sup = Supervisor(plans(["sleep", "300"]), cwd=tmp, stage=stage_at(tmp, None), launch_id="x", max_restarts=5,
                 backoff_s=0, log_path=tmp / "supervisor.jsonl", echo=print)
sys.exit(sup.run())
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not (tmp_path / "supervisor.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM; not restarting" in out
    assert [e["event"] for e in events(tmp_path)] == ["launch", "attempt_start", "attempt_end", "stopped"]



def run_child_supervisor(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """A Supervisor set up by `body` (which binds `sup`) and run in a child process, whose own signal handlers the
    test may trigger from inside the supervisor's callbacks."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from pathlib import Path
from test_launch_supervisor import plans, stage_at
from launch.command import LaunchPlan
from launch.supervisor import Supervisor
tmp = Path({str(tmp_path)!r})
{body}
sys.exit(sup.run())
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_signal_during_the_config_recheck_records_no_restart(tmp_path):
    """SIGTERM while the stage re-checks its config after a crash: the job stops, and no restart is announced or
    recorded (the attempt never happens)."""
    done = run_child_supervisor(tmp_path, """
def revalidate():
    os.kill(os.getpid(), signal.SIGTERM)
    return None
sup = Supervisor(plans([sys.executable, "-c", "import sys; sys.exit(1)"]), cwd=tmp, stage=stage_at(tmp, None),
                 launch_id="x", max_restarts=3, backoff_s=5, log_path=tmp / "supervisor.jsonl",
                 revalidate=revalidate, echo=print)""")
    assert done.returncode == 128 + signal.SIGTERM, done.stdout + done.stderr
    assert [e["event"] for e in events(tmp_path)] == ["launch", "attempt_start", "attempt_end", "stopped"]
    assert "restart 1/3" not in done.stdout and "stopped by SIGTERM; not restarting" in done.stdout


def test_a_signal_just_before_an_attempt_starts_stops_it(tmp_path):
    """SIGTERM after the loop decided to start an attempt but before its process exists: the new attempt gets the
    signal at once instead of running to the end (it would sleep 60 s and exit 0)."""
    started = time.monotonic()
    done = run_child_supervisor(tmp_path, """
def plan_for(resume, job_vars):
    os.kill(os.getpid(), signal.SIGTERM)
    return LaunchPlan(["bash", "-c", "sleep 60; exit 0"], {}, {})
sup = Supervisor(plan_for, cwd=tmp, stage=stage_at(tmp, None), launch_id="x", max_restarts=3, backoff_s=0,
                 log_path=tmp / "supervisor.jsonl", echo=print)""")
    assert done.returncode == 128 + signal.SIGTERM, done.stdout + done.stderr
    assert time.monotonic() - started < 50
    assert [e["event"] for e in events(tmp_path)] == ["launch", "attempt_start", "attempt_end", "stopped"]


def test_generated_launch_ids_are_safe_in_filters_and_env_files():
    a = new_launch_id("bob's run/2", {}, now=0.0)
    assert re.fullmatch(r"bob-s-run-2-\d{8}-\d{6}-[0-9a-f]{8}", a), a
    assert new_launch_id("'''", {}, now=0.0).startswith("job-")
