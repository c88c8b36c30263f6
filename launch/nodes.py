"""Which nodes a job runs on and how many ranks each holds: from a hostfile, inline hosts, Slurm's environment,
or this machine alone. Pure functions of the config and an environment mapping, so the tests can pose as Slurm.

Slurm's compressed node lists ("gpu[01-03,07],cpu5", "rack[1-2]-n[01-02]") are expanded here, in Slurm's order,
keeping zero padding: no `scontrol show hostnames` needed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from configs import ConfigError, config_path, not_found
from launch.config import LaunchConfig

LOCAL_HOST = "localhost"
DEFAULT_PORT = 29500
HOSTFILE_LINE = re.compile(r"^(\S+)(?:\s+slots=(\d+))?\s*$")


# --- Slurm ------------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    """"01-03,07" -> ["01", "02", "03", "07"] (the width of the low end is kept, as Slurm does)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in node list {whole!r}")
            out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        elif item.isdigit():
            out.append(item)
        else:
            raise ValueError(f"bad range {item!r} in node list {whole!r}")
    return out


def _expand_one(name: str, whole: str) -> list[str]:
    """One host pattern, any number of bracket groups: "r[1-2]-n[1-2]" -> r1-n1, r1-n2, r2-n1, r2-n2."""
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        if "[" in name or "]" in name:
            raise ValueError(f"unbalanced brackets in node list {whole!r}")
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    return [f"{head}{mid}{rest}" for mid in _expand_range(m.group(1), whole) for rest in _expand_one(tail, whole)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's SLURM_JOB_NODELIST -> host names, in order."""
    hosts = [h for part in _split_top_level(nodelist.strip()) for h in _expand_one(part, nodelist)]
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def slurm_gpus_per_node(environ: Mapping[str, str]) -> int:
    """GPUs Slurm gave each node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8", "a100:8", "gpu:a100:8")."""
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    per_node = environ.get("SLURM_GPUS_PER_NODE", "").split(",")[0].split("(")[0]
    count = per_node.rsplit(":", 1)[-1]
    return int(count) if count.isdigit() else 0


def in_slurm(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST"))


# --- hostfiles --------------------------------------------------------------------------------------------

def parse_hostfile_lines(lines: list[str], where: str) -> list[tuple[str, int]]:
    """MPI-style lines ("host slots=N"; "host" alone = slots 0: decided by procs_per_node); # comments."""
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = HOSTFILE_LINE.match(line)
        if m is None:
            raise ConfigError(f"{where}: line {number}: {raw.strip()!r} is not 'HOST slots=N'")
        name, slots = m.group(1), int(m.group(2)) if m.group(2) else 0
        if any(name == h for h, _ in hosts):
            raise ConfigError(f"{where}: line {number}: host {name!r} is listed twice")
        hosts.append((name, slots))
    if not hosts:
        raise ConfigError(f"{where}: lists no hosts")
    return hosts


def hostfile_text(hosts: list[tuple[str, int]]) -> str:
    return "".join(f"{name} slots={slots}\n" for name, slots in hosts)


# --- the layout -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The resolved placement of a job."""

    source: str  # "local", "hostfile", "hosts" or "slurm"
    hosts: tuple[tuple[str, int], ...]  # (name, ranks on it) of every node in use, in node-rank order
    master_addr: str
    master_port: int
    node_rank: int | None  # this node's rank when every node runs its own launcher; None: one launcher for all
    hostfile: tuple[tuple[str, int], ...] = ()  # what to write into the hostfile (empty: no hostfile)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return sum(n for _, n in self.hosts)

    def procs_per_node(self) -> int | None:
        """The common rank count of every node, or None when they differ."""
        counts = {n for _, n in self.hosts}
        return counts.pop() if len(counts) == 1 else None


def _include_counts(include: str, pool: list[tuple[str, int]], where: str) -> list[tuple[str, int]]:
    """Apply a deepspeed --include filter ("a:0,1@b") to (host, slots): the hosts and ranks it selects."""
    slots = dict(pool)
    out = []
    for spec in include.split("@"):
        name, _, ids = spec.partition(":")
        if name not in slots:
            raise ConfigError(f"{where}nodes.include: host {name!r} is not among the nodes {list(slots)}")
        count = len(set(ids.split(","))) if ids else slots[name]
        if ids and any(not i.isdigit() or int(i) >= max(slots[name], 1) for i in ids.split(",")):
            raise ConfigError(f"{where}nodes.include: {spec!r} names slots that {name} (slots={slots[name]}) "
                                    "does not have")
        out.append((name, count))
    order = [h for h, _ in pool]
    return sorted(out, key=lambda item: order.index(item[0]))


def resolve_layout(cfg: LaunchConfig, environ: Mapping[str, str], *, local_devices: int = 0,
                   free_port: Callable[[], int] | None = None, node_rank: int | None = None) -> Layout:
    """cfg + the environment -> Layout. local_devices: GPUs on this machine (0 on CPU); free_port: picks a port
    for a job confined to this machine; node_rank: a command-line override of nodes.node_rank."""
    n = cfg.nodes
    where = f"{cfg.config_file}: " if cfg.config_file else ""

    # 1. The pool of nodes and the slots each offers.
    if n.hostfile:
        path = config_path(n.hostfile)
        if not path.is_file():
            raise ConfigError(f"{where}nodes.hostfile: {not_found(path)}")
        source, pool = "hostfile", parse_hostfile_lines(path.read_text().splitlines(), str(path))
    elif n.hosts:
        source, pool = "hosts", parse_hostfile_lines(list(n.hosts), f"{where}nodes.hosts")
    elif n.slurm == "on" or (n.slurm == "auto" and in_slurm(environ)):
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
        if not nodelist:
            raise ConfigError(f"{where}nodes.slurm: 'on', but SLURM_JOB_NODELIST is not set (not inside a "
                                    "Slurm allocation?)")
        try:
            names = expand_nodelist(nodelist)
        except ValueError as err:
            raise ConfigError(f"SLURM_JOB_NODELIST: {err}") from None
        source, pool = "slurm", [(h, slurm_gpus_per_node(environ) or local_devices) for h in names]
    else:
        source, pool = "local", [(LOCAL_HOST, local_devices if cfg.accelerator == "gpu" else 1)]

    # 2. The nodes in use and their rank counts.
    if n.num_nodes:
        if n.num_nodes > len(pool):
            raise ConfigError(f"{where}nodes.num_nodes: {n.num_nodes} nodes asked for, but only {len(pool)} "
                                    f"are available ({source}: {[h for h, _ in pool]})")
        used = pool[:n.num_nodes]
    else:
        used = list(pool)
    if n.include:
        hosts = _include_counts(n.include, pool, where)
    else:
        hosts = []
        for name, slots in used:
            count = n.procs_per_node or slots
            if count < 1:
                raise ConfigError(f"{where}nodes.procs_per_node: cannot tell how many ranks to start on {name} "
                                        f"({source} gives no slot or GPU count); set nodes.procs_per_node")
            if n.procs_per_node and slots and n.procs_per_node > slots and source != "local":
                raise ConfigError(f"{where}nodes.procs_per_node: {n.procs_per_node} ranks per node, but {name} "
                                        f"has slots={slots} ({source})")
            hosts.append((name, count))
    hostfile_hosts = pool if n.include else [(h, max(s, c)) for (h, s), (_, c) in zip(used, hosts)]

    # 3. Who launches: one launcher for every node (local, or deepspeed over ssh), or one per node.
    per_node = n.no_ssh or (cfg.launcher == "torchrun" and len(hosts) > 1)
    rank = None
    if per_node:
        rank = node_rank if node_rank is not None else n.node_rank
        if rank < 0:
            env_rank = environ.get("SLURM_NODEID") if source == "slurm" else None
            env_rank = env_rank if env_rank is not None else environ.get("NODE_RANK")
            if env_rank is None or not env_rank.isdigit():
                raise ConfigError(f"{where}nodes.node_rank: each node launches its own ranks here (no_ssh or "
                                        "torchrun on several nodes), so it needs its node rank: set nodes.node_rank, "
                                        "pass --node-rank, or run under Slurm (SLURM_NODEID) or with NODE_RANK set")
            rank = int(env_rank)
        if rank >= len(hosts):
            raise ConfigError(f"{where}nodes.node_rank: {rank} is not below the number of nodes {len(hosts)}")
    elif cfg.launcher == "torchrun":
        rank = 0  # one node

    # 4. The rendezvous address.
    single_machine = source == "local"
    master_addr = n.master_addr or ("127.0.0.1" if single_machine else hosts[0][0])
    if n.master_port:
        port = n.master_port
    elif source == "slurm" and environ.get("SLURM_JOB_ID", "").isdigit():
        port = 20000 + int(environ["SLURM_JOB_ID"]) % 20000  # every node computes the same port
    elif single_machine and free_port is not None:
        port = free_port()
    else:
        port = DEFAULT_PORT

    needs_hostfile = cfg.launcher == "deepspeed" and not single_machine
    return Layout(source=source, hosts=tuple(hosts), master_addr=master_addr, master_port=port, node_rank=rank,
                  hostfile=tuple(hostfile_hosts) if needs_hostfile else ())
