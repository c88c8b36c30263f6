"""Launcher command lines, asserted as whole strings: one node, a multi-node hostfile over ssh, a Slurm
allocation (node list expanded, node rank from SLURM_NODEID, --no_ssh), torchrun; the hostfile and
.deepspeed_env files; Slurm node-list expansion; config errors that name the field; and the CLI's --dry-run, with
the real `python -m launch` and the Slurm batch template run by bash.
"""
from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from configs import ConfigError as LaunchConfigError
from launch import command
from launch.config import LaunchConfig, load, validate
from launch.nodes import expand_nodelist, resolve_layout, slurm_gpus_per_node
from launch.supervisor import job_vars

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/pretrain/tiny.yaml"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")


def cfg_from(path: str, *overrides: str) -> LaunchConfig:
    return load(REPO_ROOT / path, list(overrides))


def argv_for(cfg: LaunchConfig, environ: dict[str, str], stage_args=("--config", TINY), node_rank=None,
             local_devices: int = 0, job_vars=None) -> tuple[str, command.LaunchPlan]:
    layout = resolve_layout(cfg, environ, local_devices=local_devices, free_port=lambda: 43210, node_rank=node_rank)
    plan = command.build(cfg, layout, "pretrain", list(stage_args), environ, exe=cfg.launcher, job_vars=job_vars)
    return plan.shell(), plan


# --- Slurm node lists -------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1-2],b7,c[03]", ["a1", "a2", "b7", "c03"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("node-x,node-y", ["node-x", "node-y"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_slurm_gpu_counts():
    assert slurm_gpus_per_node({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}) == 4
    assert slurm_gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:8"}) == 8
    assert slurm_gpus_per_node({"SLURM_GPUS_PER_NODE": "gpu:h100:2(IDX:0-1)"}) == 2
    assert slurm_gpus_per_node({}) == 0


# --- command lines ----------------------------------------------------------------------------------------

def test_single_node_cpu_command_and_env_file():
    cfg = cfg_from("configs/launch/local_cpu.yaml", "run_dir=/jobs")
    line, plan = argv_for(cfg, {"TORCH_EXTENSIONS_DIR": "/cache/ext", "HOME": "/root"},
                          stage_args=["--config", TINY, "train.steps=5"])
    assert line == ("deepspeed --num_nodes 1 --num_gpus 2 --master_addr 127.0.0.1 --master_port 43210 "
                    "--no_local_rank --module pretrain --config configs/pretrain/tiny.yaml train.steps=5")
    env_file = Path("/jobs/local_cpu/.deepspeed_env")
    assert plan.files == {env_file: "OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\nMLFLOW_DISABLE_TELEMETRY=true\n"
                                    "TOKENIZERS_PARALLELISM=false\nTORCH_EXTENSIONS_DIR=/cache/ext\n"}
    assert plan.env["DS_ENV_FILE"] == str(env_file) and plan.env["DS_ACCELERATOR"] == "cpu"
    assert "HOME" not in plan.env  # only pass_through variables are copied


def test_single_node_gpu_uses_every_local_gpu():
    cfg = validate(LaunchConfig(name="one", run_dir="/jobs"))
    line, _ = argv_for(cfg, {}, local_devices=4)
    assert line == ("deepspeed --num_nodes 1 --num_gpus 4 --master_addr 127.0.0.1 --master_port 43210 "
                    "--no_local_rank --module pretrain --config configs/pretrain/tiny.yaml")


def test_multi_node_hostfile_over_ssh(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# our nodes\nworker-0 slots=8\nworker-1 slots=8   # second\n\nworker-2 slots=8\n")
    cfg = cfg_from("configs/launch/cluster.yaml", f"nodes.hostfile={hostfile}", "nodes.num_nodes=2",
                   "run_dir=/jobs")
    # The supervisor's job variables reach the other nodes' ranks through .deepspeed_env (ssh starts them).
    line, plan = argv_for(cfg, {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "TANDEM_RESTART": "9"},
                          job_vars=job_vars("cluster-20260101-000000-0123abcd", 1))
    assert line == ("deepspeed --hostfile /jobs/cluster/hostfile --num_nodes 2 --num_gpus 8 --master_addr worker-0 "
                    "--master_port 29500 --no_local_rank --module pretrain --config configs/pretrain/tiny.yaml")
    assert plan.files[Path("/jobs/cluster/hostfile")] == "worker-0 slots=8\nworker-1 slots=8\n"
    assert plan.files[Path("/jobs/cluster/.deepspeed_env")] == (
        "OMP_NUM_THREADS=4\nDS_ACCELERATOR=cuda\nMLFLOW_DISABLE_TELEMETRY=true\nCUDA_DEVICE_MAX_CONNECTIONS=1\n"
        "NCCL_DEBUG=WARN\nNCCL_IB_DISABLE=0\n"
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1\nTOKENIZERS_PARALLELISM=false\nMLFLOW_TRACKING_URI=http://mlflow:5000\n"
        "TANDEM_LAUNCH_ID=cluster-20260101-000000-0123abcd\nTANDEM_RESTART=1\n")
    assert (plan.env["TANDEM_LAUNCH_ID"], plan.env["TANDEM_RESTART"]) == ("cluster-20260101-000000-0123abcd", "1")


def test_gpu_ranks_get_one_cuda_connection_and_the_socket_interface():
    """CUDA_DEVICE_MAX_CONNECTIONS=1 on GPU jobs only (TP collectives overlap the next matmul); env.socket_ifname
    names NCCL's and gloo's interface; an explicit NCCL_SOCKET_IFNAME in env.nccl and env.vars still win."""
    cfg = cfg_from("configs/launch/slurm.yaml", "env.socket_ifname=ib0", "run_dir=/jobs")
    _, plan = argv_for(cfg, SLURM_ENV)
    assert plan.files[Path("/jobs/slurm/.deepspeed_env")] == (
        "OMP_NUM_THREADS=4\nDS_ACCELERATOR=cuda\nMLFLOW_DISABLE_TELEMETRY=true\nCUDA_DEVICE_MAX_CONNECTIONS=1\n"
        "NCCL_SOCKET_IFNAME=ib0\nGLOO_SOCKET_IFNAME=ib0\nNCCL_DEBUG=WARN\nTORCH_NCCL_ASYNC_ERROR_HANDLING=1\n"
        "TOKENIZERS_PARALLELISM=false\n")
    cfg = cfg_from("configs/launch/local_cpu.yaml", "env.socket_ifname=lo", "env.nccl={NCCL_SOCKET_IFNAME: eth1}",
                   "env.vars={CUDA_DEVICE_MAX_CONNECTIONS: '8'}", "launcher=torchrun")
    env = command.rank_env(cfg, {})
    assert list(env.items()) == [("OMP_NUM_THREADS", "1"), ("DS_ACCELERATOR", "cpu"),
                                 ("MLFLOW_DISABLE_TELEMETRY", "true"), ("NCCL_SOCKET_IFNAME", "eth1"),
                                 ("GLOO_SOCKET_IFNAME", "lo"), ("TOKENIZERS_PARALLELISM", "false"),
                                 ("CUDA_DEVICE_MAX_CONNECTIONS", "8")]
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in command.rank_env(cfg_from("configs/launch/local_cpu.yaml"), {})
    with pytest.raises(LaunchConfigError, match="env.socket_ifname: must be interface names"):
        cfg_from("configs/launch/cluster.yaml", "env.socket_ifname='ib0 eth0'")


def test_multi_node_include_filter_and_extras():
    cfg = cfg_from("configs/launch/cluster.yaml", "nodes.hostfile=''", "nodes.hosts=[gpu01 slots=8,gpu02 slots=8]",
                   "nodes.procs_per_node=0", "nodes.include=gpu01:0,1@gpu02", "nodes.master_addr=10.0.0.1",
                   "nodes.master_port=6000", "bind_cores_to_rank=true", "extra_args=[--ssh_port,2222]",
                   "run_dir=/jobs")
    line, plan = argv_for(cfg, {})
    assert line == ("deepspeed --hostfile /jobs/cluster/hostfile --include gpu01:0,1@gpu02 --master_addr 10.0.0.1 "
                    "--master_port 6000 --bind_cores_to_rank --ssh_port 2222 --no_local_rank --module pretrain "
                    "--config configs/pretrain/tiny.yaml")
    layout = resolve_layout(cfg, {})
    assert layout.hosts == (("gpu01", 2), ("gpu02", 8)) and layout.world_size == 10


SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": "4", "SLURM_PROCID": "1"}


def test_slurm_environment_no_ssh_per_node():
    cfg = cfg_from("configs/launch/slurm.yaml", "run_dir=/jobs")
    line, plan = argv_for(cfg, SLURM_ENV, stage_args=["--config", TINY, "parallel.tensor_parallel=2"])
    assert line == ("deepspeed --hostfile /jobs/slurm/hostfile --num_nodes 2 --num_gpus 4 --no_ssh --node_rank 1 "
                    "--master_addr gpu07 --master_port 24242 --no_local_rank --module pretrain "
                    "--config configs/pretrain/tiny.yaml parallel.tensor_parallel=2")
    assert plan.files[Path("/jobs/slurm/hostfile")] == "gpu07 slots=4\ngpu08 slots=4\n"
    node0, _ = argv_for(cfg, {**SLURM_ENV, "SLURM_NODEID": "0"})
    assert "--no_ssh --node_rank 0 --master_addr gpu07 --master_port 24242" in node0


def test_no_ssh_with_hostfile_and_explicit_node_rank():
    cfg = cfg_from("configs/launch/cluster.yaml", "nodes.hostfile=''", "nodes.hosts=[n1 slots=2,n2 slots=2]",
                   "nodes.procs_per_node=2", "nodes.no_ssh=true", "nodes.master_port=7000", "run_dir=/jobs")
    line, _ = argv_for(cfg, {}, node_rank=1)
    assert line == ("deepspeed --hostfile /jobs/cluster/hostfile --num_nodes 2 --num_gpus 2 --no_ssh --node_rank 1 "
                    "--master_addr n1 --master_port 7000 --no_local_rank --module pretrain "
                    "--config configs/pretrain/tiny.yaml")
    with pytest.raises(LaunchConfigError, match="nodes.node_rank"):  # no rank from anywhere
        argv_for(cfg, {})
    line, _ = argv_for(cfg, {"NODE_RANK": "0"})
    assert "--no_ssh --node_rank 0 " in line
    with pytest.raises(LaunchConfigError, match="not below the number of nodes 2"):
        argv_for(cfg, {}, node_rank=2)


def test_torchrun_single_node_and_slurm():
    cfg = cfg_from("configs/launch/local_cpu.yaml", "launcher=torchrun")
    line, plan = argv_for(cfg, {})
    assert line == ("torchrun --nnodes 1 --nproc-per-node 2 --node-rank 0 --master-addr 127.0.0.1 --master-port 43210 "
                    "--max-restarts 0 --module pretrain --config configs/pretrain/tiny.yaml")
    assert plan.files == {} and "DS_ENV_FILE" not in plan.env
    cfg = cfg_from("configs/launch/slurm.yaml", "launcher=torchrun")
    line, _ = argv_for(cfg, {**SLURM_ENV, "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_NODEID": "2"})
    assert line == ("torchrun --nnodes 3 --nproc-per-node 4 --node-rank 2 --master-addr gpu07 --master-port 24242 "
                    "--max-restarts 0 --module pretrain --config configs/pretrain/tiny.yaml")


def test_resume_flag_is_added_once():
    assert command.with_resume(["--config", TINY], "--resume") == ["--config", TINY, "--resume"]
    assert command.with_resume(["--config", TINY, "--resume"], "--resume") == ["--config", TINY, "--resume"]


# --- config errors name the field -------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["launcher=mpirun"], "launcher: must be one of"),
    (["accelerator=tpu"], "accelerator: must be 'gpu'"),
    (["nodes.procs_per_node=-1"], "nodes.procs_per_node"),
    (["nodes.include=a:0"], "nodes.include: cannot be combined"),
    (["nodes.master_port=70000"], "nodes.master_port"),
    (["env.nccl={OMP_X: '1'}"], "env.nccl: holds ['OMP_X']"),
    (["preflight.shards=maybe"], "preflight.shards"),
    (["restart.max_restarts=-2"], "restart.max_restarts"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(LaunchConfigError) as err:
        cfg_from("configs/launch/local_cpu.yaml", *overrides)
    assert message in str(err.value) and "local_cpu.yaml" in str(err.value)


def test_an_unknown_key_is_blamed_on_where_it_was_typed(tmp_path):
    with pytest.raises(LaunchConfigError) as err:
        cfg_from("configs/launch/local_cpu.yaml", "nodes.bogus=1")
    assert str(err.value).startswith("command-line override 'nodes.bogus=1': Key 'bogus' not in") and \
        "local_cpu.yaml" not in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO_ROOT / "configs/launch/local_cpu.yaml").read_text() + "\nbogus: 1\n")
    with pytest.raises(LaunchConfigError, match=rf"^{re.escape(str(bad))}: Key 'bogus' not in"):
        cfg_from(str(bad))


def test_layout_errors(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("gpu01 slots=8\ngpu01 slots=8\n")
    with pytest.raises(LaunchConfigError, match="listed twice"):
        resolve_layout(cfg_from("configs/launch/cluster.yaml", f"nodes.hostfile={bad}"), {})
    bad.write_text("gpu01 slots=eight\n")
    with pytest.raises(LaunchConfigError, match="line 1"):
        resolve_layout(cfg_from("configs/launch/cluster.yaml", f"nodes.hostfile={bad}"), {})
    with pytest.raises(LaunchConfigError, match="nodes.num_nodes: 3 nodes asked for, but only 2"):
        resolve_layout(cfg_from("configs/launch/cluster.yaml", "nodes.hostfile=''", "nodes.hosts=[a,b]",
                                "nodes.num_nodes=3"), {})
    with pytest.raises(LaunchConfigError, match="slots=8"):
        resolve_layout(cfg_from("configs/launch/cluster.yaml", "nodes.hostfile=''", "nodes.hosts=[a slots=8]",
                                "nodes.procs_per_node=16"), {})
    with pytest.raises(LaunchConfigError, match="SLURM_JOB_NODELIST is not set"):
        resolve_layout(cfg_from("configs/launch/slurm.yaml"), {})
    with pytest.raises(LaunchConfigError, match="set nodes.procs_per_node"):  # Slurm gave no GPU count
        resolve_layout(cfg_from("configs/launch/slurm.yaml"), {"SLURM_JOB_NODELIST": "a[1-2]", "SLURM_NODEID": "0"})


# --- the CLI and the Slurm template -------------------------------------------------------------------------

def run_cli(args: list[str], env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_dry_run_prints_the_exact_command(tmp_path):
    proc = run_cli(["--config", "configs/launch/cluster.yaml", "--dry-run", "nodes.hostfile=''",
                    "nodes.hosts=[gpu01 slots=8,gpu02 slots=8]", f"run_dir={tmp_path}", "--", "pretrain",
                    "--config", TINY, "train.steps=10"], ENV)
    assert proc.returncode == 0, proc.stderr
    exe = str(Path(sys.executable).parent / "deepspeed")
    assert proc.stdout.splitlines()[-1] == (
        f"{exe} --hostfile {tmp_path}/cluster/hostfile --num_nodes 2 --num_gpus 8 --master_addr gpu01 "
        "--master_port 29500 --no_local_rank --module pretrain --config configs/pretrain/tiny.yaml train.steps=10")
    assert not (tmp_path / "cluster").exists()  # a dry run writes nothing


def test_cli_errors_before_starting_anything(tmp_path):
    proc = run_cli(["--config", "configs/launch/local_cpu.yaml", "--", "pretrain"], ENV)
    assert proc.returncode == 2 and "give the stage's config" in proc.stderr
    proc = run_cli(["--config", "configs/launch/local_cpu.yaml", "--", "evaluate", "--config", TINY], ENV)
    assert proc.returncode == 2 and "unknown stage 'evaluate'" in proc.stderr
    proc = run_cli(["--config", "configs/launch/local_cpu.yaml", "pretrain"], ENV)
    assert proc.returncode == 2 and "after `--`" in proc.stderr


def test_slurm_batch_template_starts_one_launcher_per_node(tmp_path):
    """Run launch/slurm/tandem.sbatch with bash inside a posed 2-node allocation: a stand-in `srun` on PATH starts
    its command once per node with that node's SLURM_NODEID (as srun --ntasks-per-node=1 does). With --dry-run
    every node's launcher prints its own deepspeed command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/bash\n# stand-in for srun --ntasks-per-node=1: note srun's options, run once per node\n"
                    f"while [[ \"$1\" == --* ]]; do echo \"$1\" >> {tmp_path}/srun_options; shift; done\n"
                    "for ((i = 0; i < SLURM_NNODES; i++)); do\n"
                    "  SLURM_NODEID=$i SLURM_PROCID=$i \"$@\" || exit $?\n"
                    "done\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(REPO_ROOT),
           "SLURM_CPUS_PER_TASK": "32",  # what `#SBATCH --cpus-per-task=32` gives the batch script
           "TANDEM_PYTHON": sys.executable, "LAUNCH_ARGS": f"--dry-run run_dir={tmp_path}"}
    proc = subprocess.run(["bash", str(REPO_ROOT / "launch/slurm/tandem.sbatch"), "pretrain", "--config", TINY],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exe = str(Path(sys.executable).parent / "deepspeed")
    commands = [line for line in proc.stdout.splitlines() if line.startswith(exe)]
    assert commands == [
        f"{exe} --hostfile {tmp_path}/slurm-4242/hostfile --num_nodes 2 --num_gpus 4 --no_ssh --node_rank {rank} "
        f"--master_addr gpu07 --master_port 24242 --no_local_rank --module pretrain --config {TINY}"
        for rank in (0, 1)]
    assert shlex.split(commands[0])[0] == exe
    # The step asks for the allocation's CPUs per task (srun does not inherit them from sbatch).
    assert (tmp_path / "srun_options").read_text() == "--ntasks-per-node=1\n--kill-on-bad-exit=1\n--cpus-per-task=32\n"


@pytest.mark.parametrize("gpu_seen, preset, expected", [(False, None, "cpu"), (True, None, "unset"),
                                                        (True, "cpu", "cpu"), (False, "cuda", "cuda")])
def test_finetune_task_script_names_the_cpu_accelerator_only_without_a_gpu(tmp_path, gpu_seen, preset, expected):
    """finetune/scripts/run_task.sh run by bash, with a stand-in for the project's Python that answers the script's
    `torch.cuda.is_available()` question and records every other command with the DS_ACCELERATOR it saw."""
    python = tmp_path / "python"
    python.write_text("#!/bin/bash\n"
                      f"if [[ \"$1\" == -c ]]; then exit {0 if gpu_seen else 1}; fi\n"
                      f"echo \"DS_ACCELERATOR=${{DS_ACCELERATOR-unset}} $*\" >> {tmp_path}/calls\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in ENV.items() if k != "DS_ACCELERATOR"}
    env.update({"PYTHON": str(python), **({"DS_ACCELERATOR": preset} if preset else {})})
    proc = subprocess.run(["bash", "finetune/scripts/gigaword.sh", "--init", "ckpt", "--split", "valid", "--out", "o"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = "--config configs/finetune/gigaword.yaml"
    assert (tmp_path / "calls").read_text().splitlines() == [f"DS_ACCELERATOR={expected} {line}" for line in (
        f"-m finetune generate --check {config} --split valid task.difficulty=easy output_dir=o",
        f"-m finetune data {config} task.difficulty=easy output_dir=o",
        f"-m finetune {config} --init ckpt task.difficulty=easy output_dir=o",
        "-m finetune generate --model o --split valid --out o/generate/valid-default",
        "-m finetune evaluate --generation o/generate/valid-default")]


def test_launch_imports_none_of_the_project_packages():
    """architecture.md: launch/ spawns processes and imports none of model/, data_pipeline/, pretrain/, finetune/."""
    modules = sorted(f"launch.{p.stem}" for p in (REPO_ROOT / "launch").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'data_pipeline', 'pretrain', "
            "'finetune'))\nprint(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]" and len(modules) >= 8, (modules, proc.stdout)


def test_stage_arguments_are_read_like_the_stages_read_them():
    from launch.stage import read_stage, split_stage_args

    assert split_stage_args(["--config", "a.yaml", "--resume", "train.steps=5", "--init", "x=y.pt", "k=v"]) == \
        ("a.yaml", ["train.steps=5", "k=v"])
    stage = read_stage("pretrain", ["--config", TINY, "--resume", "output_dir=/o", "parallel.tensor_parallel=2",
                                    "checkpoint.dir=/c"], environ={})
    assert (stage.output_dir, stage.checkpoint_dir, stage.tensor_parallel) == (Path("/o"), Path("/c"), 2)
    assert stage.tracking_uri == f"sqlite:///{REPO_ROOT / 'runs' / 'mlflow.db'}"
    fine = read_stage("finetune", ["--config", "configs/finetune/gigaword.yaml", "objective.name=janus"],
                      environ={"MLFLOW_TRACKING_URI": "http://m:5000"})
    assert fine.output_dir == REPO_ROOT / "runs" / "finetune" / "gigaword-easy-janus"
    assert fine.tracking_uri == "http://m:5000"
