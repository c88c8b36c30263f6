"""Typed launch config: where the processes run (nodes, processes per node, master), how they are started
(the deepspeed launcher or torchrun), the environment every rank gets, preflight checks and auto-resume.

Loaded from configs/launch/<cluster>.yaml with `key=value` overrides (the project's one loader, configs/);
`validate()` raises ConfigError naming the field (and file) at fault. Paths are relative to the repository root.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from configs import ConfigError, load_typed

REPO_ROOT = Path(__file__).resolve().parents[1]

LAUNCHERS = ("deepspeed", "torchrun")
ACCELERATORS = ("gpu", "cpu")


@dataclass
class NodesSection:
    hostfile: str = ""  # MPI-style "host slots=N" lines; "" = `hosts`, else Slurm's nodes, else this machine alone
    hosts: list[str] = field(default_factory=list)  # inline hostfile lines: "gpu01 slots=8" or just "gpu01"
    slurm: str = "auto"  # auto | on | off: take the nodes from SLURM_JOB_NODELIST (auto: when it is set)
    num_nodes: int = 0  # use the first N nodes (0 = all of them)
    procs_per_node: int = 0  # ranks per node (GPUs); 0 = the hostfile's slots, Slurm's GPUs, or this machine's GPUs
    include: str = ""  # deepspeed --include, e.g. "gpu01:0,1@gpu02"; replaces num_nodes / procs_per_node
    master_addr: str = ""  # "" = the first node (127.0.0.1 when there is only this machine)
    master_port: int = 0  # 0 = one machine: a free port; Slurm: 20000 + job id mod 20000; hostfile: 29500
    no_ssh: bool = False  # every node runs its own launcher (deepspeed --no_ssh --node_rank); no passwordless ssh
    node_rank: int = -1  # this node's rank when each node launches itself; -1 = $SLURM_NODEID, then $NODE_RANK


@dataclass
class EnvSection:
    omp_num_threads: int = 1  # OMP_NUM_THREADS of every rank (0 = leave it as the launching shell has it)
    # The network interface(s) of NCCL's and gloo's socket traffic (bootstrap, gloo collectives), e.g. "ib0" or
    # "eth0,eth1": sets NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME ("" = their own choice, often wrong on nodes
    # with several interfaces). An NCCL_SOCKET_IFNAME in env.nccl wins over it.
    socket_ifname: str = ""
    nccl: dict[str, str] = field(default_factory=dict)  # NCCL_* variables (GPU runs), e.g. NCCL_SOCKET_IFNAME: ib0
    vars: dict[str, str] = field(default_factory=dict)  # any other variables for every rank
    # Copied from the launching shell into every rank's environment when set there.
    pass_through: list[str] = field(default_factory=lambda: [
        "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR", "PYTHONPATH", "TANDEM_DATA_ROOT", "HF_HOME"])


@dataclass
class PreflightSection:
    enabled: bool = True
    versions: bool = True  # installed packages must match constraints.txt (local labels like +cu124 ignored)
    constraints: str = "constraints.txt"
    packages: list[str] = field(default_factory=lambda: [
        "torch", "deepspeed", "megatron-core", "webdataset", "sentencepiece", "mlflow", "omegaconf"])
    # Fewer shards than data-parallel ranks x loader workers: several streams read pieces of the same shard
    # files (the loader copes, but on a cluster that is redundant I/O and usually a mistake). error | warn | off
    shards: str = "error"
    port_free: bool = True  # node 0: the master port must be free on this machine when the master is local
    stage_config: bool = True  # run the stage's own validation (python -m <stage> --validate-only) before launch


@dataclass
class RestartSection:
    max_restarts: int = 0  # restarts after a failure, each from the latest complete checkpoint (--max-restarts)
    backoff_s: float = 5.0  # wait before a restart (ports and sockets of the dead job close)
    resume_on_requeue: bool = True  # Slurm requeued the job ($SLURM_RESTART_COUNT > 0): resume on the first try
    # Before a restart, ask the stage again (--validate-only): a config error ends the job instead (torchrun reports
    # a rank's exit code 2 as 1, and a node whose peers died fails with another code).
    revalidate: bool = True


@dataclass
class LaunchConfig:
    name: str = "local"
    launcher: str = "deepspeed"  # deepspeed | torchrun
    executable: str = ""  # "" = the launcher's script beside the running Python (the venv), else on PATH
    accelerator: str = "gpu"  # gpu (NCCL) | cpu (gloo: only when asked for)
    run_dir: str = "runs/launch"  # <run_dir>/<name>/: hostfile, .deepspeed_env and the supervisor's log
    bind_cores_to_rank: bool = False  # deepspeed --bind_cores_to_rank (needs numactl)
    extra_args: list[str] = field(default_factory=list)  # more launcher arguments, verbatim
    nodes: NodesSection = field(default_factory=NodesSection)
    env: EnvSection = field(default_factory=EnvSection)
    preflight: PreflightSection = field(default_factory=PreflightSection)
    restart: RestartSection = field(default_factory=RestartSection)
    config_file: str = ""  # filled by load(); used in error messages

    def job_dir(self) -> Path:
        return resolve(self.run_dir) / self.name


def resolve(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def load(path: str | Path, overrides: Sequence[str] = ()) -> LaunchConfig:
    """YAML file + `key=value` overrides -> a validated LaunchConfig."""
    return validate(load_typed(LaunchConfig, path, overrides, label="launch config",
                               overrides_from="command-line override"))


def _fail(cfg: LaunchConfig, name: str, why: str):
    where = f"{cfg.config_file}: " if cfg.config_file else ""
    raise ConfigError(f"{where}{name}: {why}")


def validate(cfg: LaunchConfig) -> LaunchConfig:
    n, e, p, r = cfg.nodes, cfg.env, cfg.preflight, cfg.restart
    if cfg.launcher not in LAUNCHERS:
        _fail(cfg, "launcher", f"must be one of {LAUNCHERS}, got {cfg.launcher!r}")
    if cfg.accelerator not in ACCELERATORS:
        _fail(cfg, "accelerator", f"must be 'gpu' (NCCL) or 'cpu' (gloo), got {cfg.accelerator!r}")
    if not cfg.name or "/" in cfg.name:
        _fail(cfg, "name", f"must be a non-empty folder name, got {cfg.name!r}")
    n.slurm = {"true": "on", "false": "off"}.get(str(n.slurm).lower(), str(n.slurm))  # YAML reads bare on/off as bools
    if n.slurm not in ("auto", "on", "off"):
        _fail(cfg, "nodes.slurm", f"must be auto, on or off, got {n.slurm!r}")
    if n.hostfile and n.hosts:
        _fail(cfg, "nodes.hosts", "give the nodes either in nodes.hostfile or in nodes.hosts, not both")
    if n.num_nodes < 0:
        _fail(cfg, "nodes.num_nodes", f"must be >= 0 (0 = all nodes), got {n.num_nodes}")
    if n.procs_per_node < 0:
        _fail(cfg, "nodes.procs_per_node", f"must be >= 0 (0 = every slot / GPU), got {n.procs_per_node}")
    if n.include and (n.num_nodes or n.procs_per_node):
        _fail(cfg, "nodes.include", "cannot be combined with nodes.num_nodes or nodes.procs_per_node "
                                    "(the deepspeed launcher refuses --include with --num_nodes/--num_gpus)")
    if n.include and cfg.launcher == "torchrun":
        _fail(cfg, "nodes.include", "is a deepspeed launcher filter; torchrun has none (use procs_per_node)")
    if not 0 <= n.master_port < 65536:
        _fail(cfg, "nodes.master_port", f"must be in [0, 65535] (0 = automatic), got {n.master_port}")
    if n.node_rank < -1:
        _fail(cfg, "nodes.node_rank", f"must be >= 0, or -1 for $SLURM_NODEID / $NODE_RANK, got {n.node_rank}")
    if cfg.bind_cores_to_rank and cfg.launcher != "deepspeed":
        _fail(cfg, "bind_cores_to_rank", "is a deepspeed launcher option")
    if e.omp_num_threads < 0:
        _fail(cfg, "env.omp_num_threads", f"must be >= 0 (0 = unset), got {e.omp_num_threads}")
    if any(c.isspace() for c in e.socket_ifname):
        _fail(cfg, "env.socket_ifname", f"must be interface names without spaces (e.g. ib0 or eth0,eth1), got "
                                        f"{e.socket_ifname!r}")
    bad_nccl = [k for k in e.nccl if not k.startswith("NCCL_")]
    if bad_nccl:
        _fail(cfg, "env.nccl", f"holds {bad_nccl}; only NCCL_* variables belong here (others go in env.vars)")
    for section, names in (("env.vars", list(e.vars)), ("env.pass_through", list(e.pass_through))):
        bad = [k for k in names if not k.replace("_", "a").isalnum() or k[0].isdigit()]
        if bad:
            _fail(cfg, section, f"{bad} are not environment variable names")
    for section, values in (("env.nccl", e.nccl), ("env.vars", e.vars)):
        bad = [k for k, v in values.items() if "\n" in str(v)]
        if bad:
            _fail(cfg, section, f"values of {bad} hold a newline, which .deepspeed_env cannot carry")
    if p.shards not in ("error", "warn", "off"):
        _fail(cfg, "preflight.shards", f"must be error, warn or off, got {p.shards!r}")
    if r.max_restarts < 0:
        _fail(cfg, "restart.max_restarts", f"must be >= 0, got {r.max_restarts}")
    if r.backoff_s < 0:
        _fail(cfg, "restart.backoff_s", f"must be >= 0, got {r.backoff_s}")
    return cfg
