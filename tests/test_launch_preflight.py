"""Preflight: every check on real inputs (shards built by the data pipeline, real sockets, the installed packages),
each problem named, all of them reported at once, and nothing started when one fails.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import free_port
from launch import preflight
from launch.config import load
from launch.nodes import resolve_layout
from launch.stage import read_stage
from test_launch_multinode import ENV, data_overrides  # noqa: F401  (the shard fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]


def check(tmp_path: Path, data: str, *stage_overrides: str, launch_overrides=(),
          launch="configs/launch/local_cpu.yaml"):
    cfg = load(REPO_ROOT / launch, [f"run_dir={tmp_path / 'launch'}", *launch_overrides])
    layout = resolve_layout(cfg, {}, free_port=free_port)
    stage = read_stage("pretrain", ["--config", "configs/pretrain/tiny.yaml", f"output_dir={tmp_path / 'out'}", data,
                                    "data.eval_overrides=[]", *stage_overrides], environ={})
    return preflight.run(cfg, layout, stage)


def test_a_good_job_passes_with_an_unreachable_mlflow_as_a_warning(tmp_path, data_overrides):
    report = check(tmp_path, data_overrides, f"tracking.uri=http://127.0.0.1:{free_port()}")
    passed = "\n".join(report.passed)
    assert "package versions match constraints.txt" in passed
    assert "accelerator: CPU with gloo (asked for)" in passed
    assert "world size 2 = tensor parallel 1 x data parallel 2" in passed
    assert "3 shard(s), 2866 samples for 2 data-parallel rank(s) x 1 loader worker(s) = 2 streams" in passed
    # The stage's own check ran for the world size of the layout, in one process.
    assert "stage config: config ok: pretrain tiny (configs/pretrain/tiny.yaml): world 2 = TP 1 x DP 2" in passed
    assert len(report.warnings) == 1 and "did not answer" in report.warnings[0]


def test_every_problem_is_reported_at_once(tmp_path, data_overrides):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(preflight.PreflightError) as err:
            check(tmp_path, data_overrides, "parallel.tensor_parallel=3", f"checkpoint.dir={blocker / 'ckpt'}",
                  launch_overrides=[f"nodes.master_port={port}"])
    text = str(err.value)
    assert "4 problem(s); nothing was started" in text
    assert "parallel.tensor_parallel=3 does not divide the world size 2" in text
    assert ("the stage rejects its config (python -m pretrain --validate-only --world-size 2): "
            "configs/pretrain/tiny.yaml: parallel.tensor_parallel: =3 does not divide the world size 2") in text
    assert f"{blocker / 'ckpt'} is not writable" in text
    assert f"port {port} is in use" in text


def test_shards_for_ranks_times_workers(tmp_path, data_overrides):
    # 2 data-parallel ranks x 2 workers = 4 streams > 3 shards: an error by default, a warning when accepted.
    with pytest.raises(preflight.PreflightError, match=r"3 shard\(s\), 2866 samples for 2 data-parallel rank\(s\) x "
                                                       r"2 loader worker\(s\) = 4 streams: fewer shards than streams"):
        check(tmp_path, data_overrides, "data.num_workers=2")
    report = check(tmp_path, data_overrides, "data.num_workers=2", launch_overrides=["preflight.shards=warn"])
    assert any("fewer shards than streams" in w for w in report.warnings)
    with pytest.raises(preflight.PreflightError, match="no shards at .*manifest.json missing.*data_pipeline prepare"):
        check(tmp_path, f"data.overrides=['work_dir={tmp_path / 'nothing'}']")


def test_versions_and_accelerator(tmp_path, data_overrides):
    pins = tmp_path / "constraints.txt"
    pins.write_text("torch==0.0.1\ndeepspeed==0.19.8\n")
    with pytest.raises(preflight.PreflightError) as err:
        check(tmp_path, data_overrides, launch="configs/launch/cluster.yaml",
              launch_overrides=[f"preflight.constraints={pins}", "nodes.hostfile=''", "nodes.procs_per_node=2"])
    text = str(err.value)
    assert f"torch {metadata.version('torch')} is installed" in text and "pins 0.0.1" in text and "deepspeed" not in text.split("pins 0.0.1")[1][:40]
    assert "preflight.versions=false" in text  # how to launch on an image whose torch is another version
    # This machine has no GPU: a GPU job is refused, and the message says how to ask for a CPU run.
    assert "accelerator: 'gpu', but torch sees no CUDA device" in text and "accelerator=cpu" in text


def test_cli_stops_before_starting_anything(tmp_path, data_overrides):
    proc = subprocess.run([sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml",
                           f"run_dir={tmp_path / 'launch'}", "--", "pretrain", "--config", "configs/pretrain/tiny.yaml",
                           f"output_dir={tmp_path / 'out'}", data_overrides, "parallel.tensor_parallel=4"],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "parallel.tensor_parallel=4 does not divide the world size 2" in proc.stderr
    assert "attempt 1" not in proc.stdout and not (tmp_path / "launch" / "local_cpu" / "supervisor.jsonl").exists()


def test_a_bad_stage_config_fails_once_before_launch(tmp_path, data_overrides):
    """A value only the stage knows is wrong (optim.lr): its --validate-only refuses it in preflight, the launcher
    exits 2 with the stage's message, and no rank is started."""
    proc = subprocess.run([sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml",
                           f"run_dir={tmp_path / 'launch'}", "--", "pretrain", "--config", "configs/pretrain/tiny.yaml",
                           f"output_dir={tmp_path / 'out'}", data_overrides, "data.eval_overrides=[]", "optim.lr=-1"],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: preflight found 1 problem(s); nothing was started:",
        "  - the stage rejects its config (python -m pretrain --validate-only --world-size 2): "
        "configs/pretrain/tiny.yaml: optim.lr: must be > 0, got -1.0"]
    assert "attempt 1" not in proc.stdout and not (tmp_path / "launch" / "local_cpu" / "supervisor.jsonl").exists()


def test_finetune_inputs_and_task_shards(tmp_path):
    cfg = load(REPO_ROOT / "configs/launch/local_cpu.yaml", [f"run_dir={tmp_path / 'launch'}"])
    layout = resolve_layout(cfg, {}, free_port=free_port)
    stage = read_stage("finetune", ["--config", "configs/finetune/gigaword.yaml", "--init", str(tmp_path / "none"),
                                    f"output_dir={tmp_path / 'out'}",
                                    f"data.overrides=['work_dir={tmp_path / 'data'}']"], environ={})
    with pytest.raises(preflight.PreflightError) as err:
        preflight.run(cfg, layout, stage)
    text = str(err.value)
    assert f"--init: {tmp_path / 'none'} not found" in text
    assert f"task.train_split: no shards at {tmp_path / 'data' / 'tasks' / 'easy' / 'gigaword' / 'train'}" in text
    assert "python -m finetune data --config configs/finetune/gigaword.yaml" in text
