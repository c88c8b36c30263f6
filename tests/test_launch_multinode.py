"""Real launches through `python -m launch` and the real deepspeed launcher on CPU (gloo), on shards the data
pipeline builds from ../shared/data:

- Two "nodes" on one machine: two launcher invocations on 127.0.0.1 (`deepspeed --no_ssh --node_rank 0|1`, one
  rank each, from one hostfile) pretrain together as one world of 2 and write one checkpoint holding both ranks.
- The torchrun path: the same job with `launcher=torchrun` gives the same loss at every step.
- Auto-resume: a job on one node with 2 ranks; rank 1 is killed with SIGKILL right after the first complete
  checkpoint. The supervisor restarts it from that checkpoint, and every step after the restart, the last one
  included, has the same loss as the uninterrupted two-node run (fp32, dropout 0: exact up to 1e-6). The restart
  is in the supervisor's log and on the job's MLflow run, which the supervisor finds by its launch id tag.
- No restart for a config error on the ranks, with either launcher (deepspeed passes the ranks' exit code 2 on;
  torchrun reports 1 and the supervisor's second --validate-only finds the error).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.demo import DATA_CONFIG, SMOKE, quote_list

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".cache" / "test-data" / "launch"  # shared with the quickstart test (same overrides)
ENV = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
           TORCH_EXTENSIONS_DIR=str(REPO_ROOT / ".cache" / "torch_extensions"))
ENV.pop("MLFLOW_TRACKING_URI", None)
STEPS, EVERY = 16, 4
LOSS_TOL = 1e-6  # fp32 on CPU, same ranks and data split: resumed and uninterrupted runs agree exactly
TWO_NODE_LAUNCH_ID = "two-nodes-test"


@pytest.fixture(scope="module")
def data_overrides(shared_data) -> str:
    """Build (or find up to date) wikitext shards; returns the pretrain `data.overrides=[...]` argument."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    overrides = [f"data_root={shared_data}", f"work_dir={DATA_DIR}", *SMOKE.data]
    with open(DATA_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", DATA_CONFIG, *overrides],
                              cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return f"data.overrides={quote_list(overrides)}"


def pretrain_args(out: Path, data: str) -> list[str]:
    return ["pretrain", "--config", "configs/pretrain/tiny.yaml", f"output_dir={out}", f"train.steps={STEPS}",
            "train.log_every=1", "schedule.warmup_steps=2", "optim.lr=3e-3", "deepspeed.precision=fp32",
            "eval.batches=0", "eval.at_end=false", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0",
            "tracking.mlflow=true", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", data, "data.eval_overrides=[]"]


def train_losses(out: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after the restart) keeps the later value."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "train":
            losses[entry["step"]] = entry["loss"]
    return losses


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tandem-pretrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run per job, reopened by the resumed attempt
    return client, runs[0]


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


@pytest.fixture(scope="module")
def two_node_run(data_overrides, tmp_path_factory) -> Path:
    from conftest import free_port

    tmp = tmp_path_factory.mktemp("two_nodes")
    hostfile = tmp / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")  # two "nodes", both this machine
    out = tmp / "out"
    env = dict(ENV, TANDEM_LAUNCH_ID=TWO_NODE_LAUNCH_ID)  # per-node launchers: one id for the job, given to both
    launch = [sys.executable, "-m", "launch", "--config", "configs/launch/cluster.yaml", "accelerator=cpu",
              f"nodes.hostfile={hostfile}", "nodes.procs_per_node=1", "nodes.no_ssh=true",
              "nodes.master_addr=127.0.0.1", f"nodes.master_port={free_port()}", "env.omp_num_threads=1",
              f"run_dir={tmp / 'launch'}", "restart.max_restarts=0"]
    procs, logs = [], []
    for rank in (0, 1):
        log = tmp / f"node{rank}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen([*launch[:5], "--node-rank", str(rank), *launch[5:], "--",
                                           *pretrain_args(out, data_overrides)],
                                          cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n\n".join(log_tail(p) for p in logs)
    text = logs[1].read_text()
    assert "--no_ssh --node_rank 1 --master_addr 127.0.0.1" in text, text[-3000:]
    return out


def test_two_nodes_train_together_and_write_one_checkpoint(two_node_run):
    out = two_node_run
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{STEPS:08d}"
    final = ckpt / f"step_{STEPS:08d}"
    assert (final / "rank_00000.pt").is_file() and (final / "rank_00001.pt").is_file()  # one checkpoint, both ranks
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("kind") == "train"][-1]
    assert last["samples_seen"] == STEPS * 2 * 16  # both nodes' ranks read data: data parallel 2, batch 16
    _, run = mlflow_run(out)
    assert (run.data.tags["world_size"], run.data.tags["data_parallel"]) == ("2", "2")
    assert run.info.status == "FINISHED" and run.data.tags["launch.restarts"] == "0"
    assert (run.data.tags["tandem.launch_id"], run.data.tags["tandem.restart"]) == (TWO_NODE_LAUNCH_ID, "0")
    for node in (0, 1):  # each node's supervisor keeps its own log, under the same launch id
        log = out.parent / "launch" / "cluster" / f"supervisor-node{node}.jsonl"
        first = json.loads(log.read_text().splitlines()[0])
        assert (first["event"], first["launch_id"]) == ("launch", TWO_NODE_LAUNCH_ID)


def test_torchrun_path_gives_the_same_job(two_node_run, data_overrides, tmp_path):
    """launcher=torchrun on one node with 2 ranks: the same ranks and data as the two deepspeed "nodes", so the
    same loss at every step."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml", "launcher=torchrun",
           f"run_dir={tmp_path / 'launch'}", "--", *pretrain_args(out, data_overrides), "tracking.mlflow=false"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "torchrun --nnodes 1 --nproc-per-node 2 --node-rank 0 --master-addr 127.0.0.1" in proc.stdout
    reference, losses = train_losses(two_node_run), train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert max(abs(losses[s] - reference[s]) for s in losses) <= LOSS_TOL
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def find_rank(root_pid: int, rank: int, stage: str = "pretrain") -> psutil.Process | None:
    """The process of `stage` with that RANK among root_pid's descendants (a launcher's ranks)."""
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if stage in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_rank_restarts_from_checkpoint_with_same_final_loss(two_node_run, data_overrides, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    cmd = [sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml", "--max-restarts", "1",
           "restart.backoff_s=1", f"run_dir={tmp_path / 'launch'}", "--", *pretrain_args(out, data_overrides)]
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        pointer = out / "checkpoints" / "latest"
        deadline = time.monotonic() + 400
        while not pointer.exists():  # the first complete checkpoint
            assert job.poll() is None, f"the job ended before its first checkpoint:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"no checkpoint after 400 s:\n{log_tail(log)}"
            time.sleep(0.05)
        victim = find_rank(job.pid, 1)
        assert victim is not None, log_tail(log)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = max(train_losses(out))
        code = job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.terminate()
    assert code == 0, log_tail(log)
    assert killed_at < STEPS, "the kill landed after the last step: nothing was restarted"

    events = [json.loads(line) for line in (tmp_path / "launch" / "local_cpu" / "supervisor.jsonl").read_text()
              .splitlines()]
    restarts = [e for e in events if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["resumed_from"].startswith("step_"), events
    resumed_step = int(restarts[0]["resumed_from"].split("_")[1])
    assert EVERY <= resumed_step < STEPS
    assert [e["code"] for e in events if e["event"] == "attempt_end"][1] == 0
    text = log.read_text()
    assert f"restart 1/1 from {out / 'checkpoints' / restarts[0]['resumed_from']}" in text
    assert f"resumed from {out / 'checkpoints' / restarts[0]['resumed_from']} at step {resumed_step}" in text

    reference, resumed = train_losses(two_node_run), train_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(resumed_step + 1, STEPS + 1):  # logged by the restarted attempt
        assert abs(resumed[step] - reference[step]) <= LOSS_TOL, (step, resumed[step], reference[step])
    assert abs(resumed[STEPS] - reference[STEPS]) <= LOSS_TOL

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    # The run carries the supervisor's launch id (how the supervisor found it) and the restart it finished in.
    assert events[0]["event"] == "launch"
    assert (run.data.tags["tandem.launch_id"], run.data.tags["tandem.restart"]) == (events[0]["launch_id"], "1")
    assert run.data.tags["launch.restarts"] == "1"
    assert run.data.tags["launch.restart_1"].endswith(f"resumed from step_{resumed_step:08d}")
    history = client.get_metric_history(run.info.run_id, "launch/restarts")
    assert [(m.value, m.step) for m in history] == [(1.0, resumed_step)]


@pytest.mark.parametrize("launcher, launcher_code", [("deepspeed", 2), ("torchrun", 1)])
def test_a_config_error_on_the_ranks_is_not_restarted(launcher, launcher_code, data_overrides, tmp_path):
    """Every rank rejects its config (optim.lr=-1) and exits 2; preflight.stage_config=false lets the bad config
    get that far. Two restarts are allowed, yet there is one attempt and the launch exits 2."""
    cmd = [sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml", "--max-restarts", "2",
           f"launcher={launcher}", "preflight.stage_config=false", "restart.backoff_s=0",
           f"run_dir={tmp_path / 'launch'}", "--", *pretrain_args(tmp_path / "out", data_overrides), "optim.lr=-1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "launch" / "local_cpu" / "supervisor.jsonl").read_text()
              .splitlines()]
    assert [e["event"] for e in events if e["event"] != "mlflow"] == [
        "launch", "attempt_start", "attempt_end", "config_rejected"]
    assert events[2]["code"] == launcher_code
    error = "configs/pretrain/tiny.yaml: optim.lr: must be > 0, got -1.0"
    assert f"error: {error}" in proc.stderr  # the ranks said why
    if launcher == "deepspeed":
        assert "[launch] attempt 1 failed (exit code 2: the stage rejected its config); not restarting" in proc.stdout
    else:
        assert events[3]["error"] == error
        assert (f"[launch] attempt 1 failed (exit code 1) and the stage rejects its config: {error}; not restarting"
                in proc.stdout)
