"""Process faults during finetuning, with real processes: the Processes row of docs/reliability.md for finetuning.

A finetuning job (`ar` on the Gigaword test shards, tiny model from one saved initialisation, DP=2, fp32, dropout 0)
runs under the launcher's supervisor (`python -m launch ... -- finetune ...`, real DeepSpeed launcher, gloo). Rank 1
is killed with SIGKILL right after the first complete checkpoint; the supervisor restarts the job with --resume,
and every step the restarted attempt logs has the loss of an uninterrupted run of the same job, started beside it.

Tolerance: 0. fp32 on CPU, the same ranks, data split and summation order: the resumed steps repeat the
uninterrupted run's figures bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_helpers import ENV, REPO_ROOT, train_losses  # noqa: E402
from test_finetune_distributed import (data, finetune_cmd, finetune_overrides, init_weights,  # noqa: E402,F401
                                       torchrun_cmd)
from test_launch_multinode import find_rank  # noqa: E402

STEPS, EVERY = 16, 4
COMPARED = ("loss", "grad_norm", "lr", "samples_seen")

__all__ = ["data", "init_weights"]  # the fixtures, imported for this module's runs


def job_overrides(data: list[str], out: Path) -> list[str]:
    return finetune_overrides(data, out, "ar", [f"train.steps={STEPS}", f"checkpoint.every_steps={EVERY}",
                                                "checkpoint.keep_last=0", "valid_generation.samples=0"])


def test_a_rank_killed_during_finetuning_resumes_with_the_same_losses(data, init_weights, tmp_path):
    reference_out, out = tmp_path / "reference", tmp_path / "out"
    reference_log, log = tmp_path / "reference.log", tmp_path / "job.log"
    reference = subprocess.Popen(torchrun_cmd(["-m", "finetune", *finetune_cmd(init_weights,
                                                                               job_overrides(data, reference_out))]),
                                 cwd=REPO_ROOT, env=ENV, stdout=open(reference_log, "w"), stderr=subprocess.STDOUT)
    cmd = [sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml", "--max-restarts", "1",
           "restart.backoff_s=0", f"run_dir={tmp_path / 'launch'}", "--", "finetune",
           *finetune_cmd(init_weights, job_overrides(data, out))]
    job = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        pointer = out / "checkpoints" / "latest"
        deadline = time.monotonic() + 500
        while not pointer.exists():  # the first complete checkpoint
            assert job.poll() is None, f"the job ended before its first checkpoint:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.05)
        victim = find_rank(job.pid, 1, stage="finetune")
        assert victim is not None, log.read_text()[-6000:]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = max(train_losses(out))
        code = job.wait(timeout=600)
        reference_code = reference.wait(timeout=600)
    finally:
        for proc in (job, reference):
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace")
    assert code == 0, text[-6000:]
    assert reference_code == 0, reference_log.read_text()[-6000:]
    assert killed_at < STEPS, "the kill landed after the last step: nothing was restarted"

    events = [json.loads(line) for line in (tmp_path / "launch" / "local_cpu" / "supervisor.jsonl").read_text()
              .splitlines()]
    restarts = [e for e in events if e["event"] == "restart"]
    assert len(restarts) == 1, events
    resumed = restarts[0]["resumed_from"]
    resumed_step = int(resumed.split("_")[1])
    assert EVERY <= resumed_step < STEPS and resumed_step % EVERY == 0
    assert f"resumed from {out / 'checkpoints' / resumed} at step {resumed_step}" in text

    expected, got = train_losses(reference_out), train_losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in range(resumed_step + 1, STEPS + 1):  # logged by the restarted attempt
        for key in COMPARED:
            assert got[step][key] == expected[step][key], (step, key, got[step][key], expected[step][key])
    assert (out / "final_model.pt").is_file()
