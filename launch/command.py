"""Command lines: the deepspeed launcher's and torchrun's, the hostfile, and the environment every rank gets
(written to .deepspeed_env, which the deepspeed launcher exports to every node it starts over ssh).

Pure functions of (config, layout, stage): the tests compare their output with whole command strings.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from launch.config import LaunchConfig
from launch.nodes import Layout, hostfile_text

ENV_FILE = ".deepspeed_env"
HOSTFILE = "hostfile"


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one attempt of a job on this node."""

    argv: list[str]
    env: dict[str, str]  # added to this process's environment for the launcher (and so for local ranks)
    files: dict[Path, str]  # files to write before launching (hostfile, .deepspeed_env)

    def shell(self) -> str:
        return shlex.join(self.argv)


def rank_env(cfg: LaunchConfig, environ: Mapping[str, str], job_vars: Mapping[str, str] | None = None
             ) -> dict[str, str]:
    """The variables every rank gets, in a fixed order: threads, the accelerator DeepSpeed must use (explicit,
    so a broken CUDA install fails instead of silently training on CPU), on GPUs one CUDA connection per device
    (CUDA_DEVICE_MAX_CONNECTIONS=1: kernels reach the GPU in the order they are issued, so a tensor-parallel
    collective issued before the next matmul starts before it and the two overlap, as megatron-core expects), the
    socket interface, NCCL, extras, pass-through, and the supervisor's job variables (TANDEM_LAUNCH_ID,
    TANDEM_RESTART), which win over everything else."""
    env: dict[str, str] = {}
    if cfg.env.omp_num_threads:
        env["OMP_NUM_THREADS"] = str(cfg.env.omp_num_threads)
    env["DS_ACCELERATOR"] = "cpu" if cfg.accelerator == "cpu" else "cuda"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if cfg.accelerator == "gpu":
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if cfg.env.socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = cfg.env.socket_ifname
    env.update({k: str(v) for k, v in cfg.env.nccl.items()})
    env.update({k: str(v) for k, v in cfg.env.vars.items()})
    for name in cfg.env.pass_through:
        if name in environ and name not in env:
            env[name] = environ[name]
    env.update(job_vars or {})
    return env


def env_file_text(env: Mapping[str, str]) -> str:
    """.deepspeed_env: KEY=VALUE lines (the launcher splits at the first '='; no blank lines allowed)."""
    return "".join(f"{k}={v}\n" for k, v in env.items())


def executable(cfg: LaunchConfig) -> str:
    """The launcher program: the configured one, else the script beside the running Python (the venv's), else
    the name on PATH."""
    name = cfg.executable or cfg.launcher
    if os.sep in name:
        return name
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or name


def deepspeed_argv(cfg: LaunchConfig, layout: Layout, module: str, stage_args: Sequence[str], exe: str,
                   hostfile: Path | None) -> list[str]:
    argv = [exe]
    if layout.hostfile:
        argv += ["--hostfile", str(hostfile)]
    if cfg.nodes.include:
        argv += ["--include", cfg.nodes.include]
    else:
        argv += ["--num_nodes", str(layout.num_nodes)]
        per_node = layout.procs_per_node()
        if per_node is not None:  # differing slot counts: every slot of each host (the hostfile says how many)
            argv += ["--num_gpus", str(per_node)]
    if layout.node_rank is not None and cfg.nodes.no_ssh:
        argv += ["--no_ssh", "--node_rank", str(layout.node_rank)]
    argv += ["--master_addr", layout.master_addr, "--master_port", str(layout.master_port)]
    if cfg.bind_cores_to_rank:
        argv.append("--bind_cores_to_rank")
    argv += list(cfg.extra_args)
    # Ranks read LOCAL_RANK from the environment; --no_local_rank keeps `--local_rank=N` off the stage's CLI.
    argv += ["--no_local_rank", "--module", module, *stage_args]
    return argv


def torchrun_argv(cfg: LaunchConfig, layout: Layout, module: str, stage_args: Sequence[str], exe: str) -> list[str]:
    per_node = layout.procs_per_node()
    if per_node is None:
        raise ValueError("torchrun starts the same number of ranks on every node; the nodes' counts differ "
                         f"({list(layout.hosts)}): set nodes.procs_per_node")
    argv = [exe, "--nnodes", str(layout.num_nodes), "--nproc-per-node", str(per_node),
            "--node-rank", str(layout.node_rank or 0), "--master-addr", layout.master_addr,
            "--master-port", str(layout.master_port),
            "--max-restarts", "0"]  # restarts belong to the supervisor, which resumes from a checkpoint
    argv += list(cfg.extra_args)
    argv += ["--module", module, *stage_args]
    return argv


def build(cfg: LaunchConfig, layout: Layout, module: str, stage_args: Sequence[str], environ: Mapping[str, str],
          exe: str | None = None, job_vars: Mapping[str, str] | None = None) -> LaunchPlan:
    """The launch of one attempt: argv, the launcher's added environment and the files it reads."""
    exe = exe or executable(cfg)
    job_dir = cfg.job_dir()
    env = rank_env(cfg, environ, job_vars)
    files: dict[Path, str] = {}
    if cfg.launcher == "deepspeed":
        hostfile = job_dir / HOSTFILE if layout.hostfile else None
        argv = deepspeed_argv(cfg, layout, module, stage_args, exe, hostfile)
        if hostfile is not None:
            files[hostfile] = hostfile_text(list(layout.hostfile))
        env_path = job_dir / ENV_FILE
        files[env_path] = env_file_text(env)
        # DS_ENV_FILE names the file the launcher reads (an absolute path overrides its ~ and . search).
        launcher_env = {**env, "DS_ENV_FILE": str(env_path)}
    else:
        argv = torchrun_argv(cfg, layout, module, stage_args, exe)
        launcher_env = dict(env)
    return LaunchPlan(argv=argv, env=launcher_env, files=files)


def write_files(plan: LaunchPlan) -> None:
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")  # several node launchers may share the folder
        tmp.write_text(text)
        os.replace(tmp, path)


def with_resume(stage_args: Sequence[str], flag: str) -> list[str]:
    args = list(stage_args)
    return args if flag in args else [*args, flag]
