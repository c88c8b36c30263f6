"""The supervisor's restart rules with small real processes (the full SIGKILL-a-rank test with DeepSpeed is in
test_launch_multinode.py): resume flag on restarts, the checkpoint it resumes from, the restart budget, no restart
for a rejected config or a stop signal, and leftovers of a dead attempt stopped before the next one starts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from launch.stage import StageInfo
from launch.supervisor import Supervisor

# A stand-in job: fails with the exit code in FAIL_CODE unless started with --resume; writes its pid and args.
JOB = """
import os, sys
open(os.environ["JOB_LOG"], "a").write(" ".join(sys.argv[1:]) + "\\n")
sys.exit(0 if "--resume" in sys.argv else int(os.environ["FAIL_CODE"]))
"""


def stage_at(tmp_path: Path, tag: str | None) -> StageInfo:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    if tag:
        (ckpt / tag).mkdir()
        (ckpt / "latest").write_text(tag)
    return StageInfo(name="pretrain", config_file=tmp_path / "cfg.yaml", args=(), output_dir=tmp_path,
                     checkpoint_dir=ckpt, tensor_parallel=1, mlflow=False, tracking_uri="", experiment="x",
                     run_name="x", shards=())


def supervisor(tmp_path: Path, stage: StageInfo, argv: list[str], max_restarts: int, lines: list[str]) -> Supervisor:
    return Supervisor(lambda resume: argv + (["--resume"] if resume else []), env={"JOB_LOG": str(tmp_path / "job")},
                      cwd=tmp_path, stage=stage, max_restarts=max_restarts, backoff_s=0,
                      log_path=tmp_path / "supervisor.jsonl", echo=lines.append)


def events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "supervisor.jsonl").read_text().splitlines()]


def test_restart_resumes_from_the_latest_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_CODE", "1")
    lines: list[str] = []
    sup = supervisor(tmp_path, stage_at(tmp_path, "step_00000020"), [sys.executable, "-c", JOB, "--config", "c"], 2,
                     lines)
    assert sup.run() == 0
    assert (tmp_path / "job").read_text().splitlines() == ["--config c", "--config c --resume"]
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


def test_leftovers_of_a_dead_attempt_are_stopped(tmp_path):
    """The attempt's launcher dies but leaves a child running (as a SIGKILLed launcher leaves its ranks); the
    child is gone before the next attempt starts."""
    pid_file = tmp_path / "orphan.pid"
    script = f"sleep 300 & echo $! > {pid_file}; exit 1"
    lines: list[str] = []
    sup = Supervisor(lambda resume: ["bash", "-c", "exit 0" if resume else script], env={}, cwd=tmp_path,
                     stage=stage_at(tmp_path, None), max_restarts=1, backoff_s=0,
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
from test_launch_supervisor import stage_at
from launch.supervisor import Supervisor
tmp = Path({str(tmp_path)!r})
sup = Supervisor(lambda resume: ["sleep", "300"], env={{}}, cwd=tmp, stage=stage_at(tmp, None), max_restarts=5,
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
    assert [e["event"] for e in events(tmp_path)] == ["attempt_start", "attempt_end", "stopped"]

