"""python -m launch --config configs/launch/<cluster>.yaml [options] [key=value ...] -- <stage> [stage args]

Builds the deepspeed launcher (or torchrun) command for <stage> (pretrain or finetune) on the nodes the config
names, runs the preflight checks, then starts the job under the supervisor, which restarts it from the latest
complete checkpoint when it dies (up to --max-restarts times). Run it from the repository root.

Examples:
  python -m launch --config configs/launch/local_cpu.yaml -- pretrain --config configs/pretrain/tiny.yaml
  python -m launch --config configs/launch/cluster.yaml --dry-run -- pretrain --config configs/pretrain/tiny.yaml
  srun --ntasks-per-node=1 python -m launch --config configs/launch/slurm.yaml -- pretrain --config ...
  python -m launch --config configs/launch/local_cpu.yaml -- finetune distill --teacher runs/finetune/<AR run>
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from typing import Sequence

from configs import ConfigError
from launch import command, devices, preflight
from launch.config import REPO_ROOT, load
from launch.nodes import Layout, in_slurm, resolve_layout
from launch.stage import STAGES, check_stage, read_stage, validate
from launch.supervisor import Supervisor, job_vars, new_launch_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gpu_count() -> int:
    return devices.probe().cuda_devices


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, str, list[str]]:
    argv = list(argv)
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file under configs/launch/")
    parser.add_argument("--dry-run", action="store_true", help="print the layout, environment and exact command; "
                                                                "start nothing, check nothing")
    parser.add_argument("--check", action="store_true", help="run the preflight checks and print the command; "
                                                              "start nothing")
    parser.add_argument("--max-restarts", type=int, default=None, help="restarts from the latest checkpoint after a "
                                                                       "failure (default: restart.max_restarts)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank when every node runs its own "
                                                                    "launcher (default: nodes.node_rank)")
    parser.add_argument("overrides", nargs="*", help="launch config key=value, e.g. nodes.procs_per_node=4")
    if "--" not in argv:
        if "-h" in argv or "--help" in argv:
            parser.parse_args(["--help"])  # prints the help and exits
        raise ConfigError(f"put the stage after `--`: python -m launch --config CFG -- <{'|'.join(STAGES)}> ...")
    cut = argv.index("--")
    ours, theirs = argv[:cut], argv[cut + 1:]
    args = parser.parse_intermixed_args(ours)  # options anywhere, also after the key=value overrides
    if not theirs:
        raise ConfigError(f"no stage after `--`; expected one of {sorted(STAGES)}")
    return args, theirs[0], theirs[1:]


def describe(layout: Layout, plan: command.LaunchPlan) -> list[str]:
    hosts = ", ".join(f"{h}x{n}" for h, n in layout.hosts)
    lines = [f"layout: {layout.num_nodes} node(s) from {layout.source} ({hosts}); world size {layout.world_size}; "
             f"master {layout.master_addr}:{layout.master_port}"
             + (f"; this node's rank {layout.node_rank}" if layout.node_rank is not None else "")]
    lines.append("environment of every rank: " + " ".join(f"{k}={v}" for k, v in plan.env.items()
                                                          if k != "DS_ENV_FILE"))
    for path, text in plan.files.items():
        lines.append(f"{path}:")
        lines.extend(f"    {line}" for line in text.splitlines())
    return lines


def say(text: str) -> None:
    print(f"[launch] {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m launch` and the `tandem-launch` console script (argv: sys.argv[1:] when None)."""
    try:
        args, stage_name, stage_args = parse(sys.argv[1:] if argv is None else argv)
        cfg = load(args.config, args.overrides)
        if args.max_restarts is not None:
            if args.max_restarts < 0:
                raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
            cfg.restart.max_restarts = args.max_restarts
        check_stage(stage_name, stage_args)
        module, resume_flag = STAGES[stage_name]
        needs_gpu_count = cfg.accelerator == "gpu" and not cfg.nodes.procs_per_node and not args.dry_run
        layout = resolve_layout(cfg, os.environ, local_devices=local_gpu_count() if needs_gpu_count else 0,
                                free_port=free_port, node_rank=args.node_rank)
        if layout.source == "slurm" and os.environ.get("SLURM_JOB_ID"):
            cfg.name = f"{cfg.name}-{os.environ['SLURM_JOB_ID']}"  # one folder per job: hostfile, env, log
        exe = command.executable(cfg)
        launch_id = new_launch_id(cfg.name, os.environ)
        plan = command.build(cfg, layout, module, stage_args, os.environ, exe=exe, job_vars=job_vars(launch_id, 0))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    for line in describe(layout, plan):
        say(line)
    if args.dry_run:
        say("dry run: nothing checked, written or started. The command:")
        print(plan.shell(), flush=True)
        return 0

    try:  # the stage states its folders, layout, store and shards, and judges its config for this world size
        stage = read_stage(stage_name, stage_args, {**os.environ, **plan.env}, world_size=layout.world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = preflight.run(cfg, layout, stage, env=plan.env)
    except preflight.PreflightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in report.passed:
        say(f"preflight ok: {line}")
    for line in report.warnings:
        say(f"preflight WARNING: {line}")
    if args.check:
        say("checks passed. The command:")
        print(plan.shell(), flush=True)
        return 0

    resume_first = (cfg.restart.resume_on_requeue and in_slurm(os.environ)
                    and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"))
    node = layout.node_rank or 0
    per_node = layout.num_nodes > 1 and layout.node_rank is not None  # each node keeps its own log
    log_name = f"supervisor-node{node}.jsonl" if per_node else "supervisor.jsonl"

    def plan_for(resume: bool, attempt_vars: dict[str, str]) -> command.LaunchPlan:
        again, args = layout, list(stage_args)
        if resume:
            if layout.source == "local" and not cfg.nodes.master_port:  # alone on this machine: a fresh port
                again = dataclasses.replace(layout, master_port=free_port())
            args = command.with_resume(stage_args, resume_flag)
        return command.build(cfg, again, module, args, os.environ, exe=exe, job_vars=attempt_vars)

    def revalidate() -> str | None:
        """Why the stage now rejects its config, as the restart will run it (resuming), or None."""
        result = validate(stage, layout.world_size, {**os.environ, **plan.env}, resume=True)
        return result.message if result.config_error else None

    supervisor = Supervisor(
        plan_for, cwd=REPO_ROOT, stage=stage, launch_id=launch_id, max_restarts=cfg.restart.max_restarts,
        backoff_s=cfg.restart.backoff_s, log_path=cfg.job_dir() / log_name,
        revalidate=revalidate if cfg.restart.revalidate else None,
        resume_first=resume_first, record_mlflow=node == 0, echo=say)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
