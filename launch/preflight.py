"""Checks run before any process starts, so a job that cannot work stops here with every reason at once instead
of failing on one rank minutes later:

  package versions     installed = constraints.txt (local labels such as +cu124 / +cpu ignored)
  accelerator          gpu: CUDA devices for this node's ranks and NCCL; cpu: gloo (only when asked for); what
                       torch sees, asked in a subprocess (launch.devices)
  parallel layout      world size divisible by the stage's tensor-parallel size
  inputs               the files the stage names (its DeepSpeed and data configs, finetuning's --init) exist
  stage config         the stage's own validation for this world size (python -m <stage> --validate-only), in one
                       process here, so a bad stage config fails once instead of on every rank after launch
  shards               the stage's shard folders are built, with enough samples and shards for data-parallel ranks
                       x loader workers
  output               the stage's output and checkpoint folders and the launch folder are writable
  master port          free on this machine when node 0 hosts the rendezvous
  MLflow               the tracking URI looks reachable (a warning only: tracking never stops training)

Everything about the stage (folders, layout, shards and their sizes, MLflow store) is what the stage said about
itself (launch.stage); nothing here reads its configs or files.
"""
from __future__ import annotations

import os
import re
import socket
import sqlite3
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Mapping

from configs import ConfigError
from launch import devices
from launch import stage as stages
from launch.config import LaunchConfig, resolve
from launch.nodes import LOCAL_HOST, Layout
from launch.stage import StageInfo


class PreflightError(RuntimeError):
    """One or more checks failed; the message lists each."""


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        if self.errors:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            raise PreflightError(f"preflight found {len(self.errors)} problem(s); nothing was started:\n{lines}")


# --- individual checks (each appends to the report) -------------------------------------------------------

def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def check_versions(cfg: LaunchConfig, report: Report) -> None:
    path = resolve(cfg.preflight.constraints)
    if not path.is_file():
        report.errors.append(f"preflight.constraints: {path} not found (the pinned versions to check against)")
        return
    pins = read_pins(path)
    bad = []
    for name in cfg.preflight.packages:
        key = name.lower().replace("_", "-")
        try:
            installed = metadata.version(key)
        except metadata.PackageNotFoundError:
            bad.append(f"{name} is not installed (pinned {pins.get(key, '?')} in {path.name})")
            continue
        if key in pins and _base_version(installed) != _base_version(pins[key]):
            bad.append(f"{name} {installed} is installed, {path.name} pins {pins[key]}")
    if bad:
        report.errors.append("package versions: " + "; ".join(bad) + f" (install with `pip install -c {path.name}`, "
                             "or launch with what is installed: preflight.versions=false)")
    else:
        report.passed.append(f"package versions match {path.name}")


def _ranks_on_this_node(layout: Layout) -> int | None:
    """Ranks this machine runs, when it is one of the job's nodes (local, or a per-node launcher)."""
    if layout.source == "local":
        return layout.hosts[0][1]
    if layout.node_rank is not None:
        return layout.hosts[layout.node_rank][1]
    return None  # deepspeed over ssh: this machine only starts the others


def check_accelerator(cfg: LaunchConfig, layout: Layout, env: Mapping[str, str], report: Report) -> None:
    where = f"{cfg.config_file}: " if cfg.config_file else ""
    here = _ranks_on_this_node(layout)
    try:
        seen = devices.probe(env)
    except ConfigError as err:
        report.errors.append(f"accelerator: {err}")
        return
    if cfg.accelerator == "gpu":
        if not seen.cuda_devices:
            report.errors.append(f"{where}accelerator: 'gpu', but torch sees no CUDA device (torch "
                                 f"{seen.torch}, CUDA build: {seen.cuda_build}). To run on CPU with gloo, "
                                 "ask for it: accelerator=cpu (e.g. configs/launch/local_cpu.yaml)")
            return
        if not seen.nccl_backend:
            report.errors.append("accelerator: 'gpu', but this torch build has no NCCL backend")
            return
        if here is not None and here > seen.cuda_devices:
            report.errors.append(f"{where}nodes.procs_per_node: {here} ranks on this node, but only "
                                 f"{seen.cuda_devices} CUDA device(s) are visible")
            return
        report.passed.append(f"accelerator: {seen.cuda_devices} CUDA device(s), NCCL {seen.nccl}")
    else:
        if not seen.gloo:
            report.errors.append("accelerator: 'cpu' needs torch's gloo backend, which this build lacks")
            return
        if seen.cuda_devices:
            report.warnings.append("accelerator: 'cpu' was asked for, but CUDA devices are visible; the job runs on "
                                   "CPU with gloo (set accelerator=gpu to use them)")
        report.passed.append("accelerator: CPU with gloo (asked for)")


def check_parallel(layout: Layout, stage: StageInfo, report: Report) -> None:
    tp, world = stage.tensor_parallel, layout.world_size
    if tp < 1 or world % tp:
        report.errors.append(f"{stage.config_file.name}: parallel.tensor_parallel={tp} does not divide the world size "
                             f"{world} ({layout.num_nodes} node(s): {', '.join(f'{h}x{n}' for h, n in layout.hosts)})")
    else:
        report.passed.append(f"layout: world size {world} = tensor parallel {tp} x data parallel {world // tp}")


def check_shards(cfg: LaunchConfig, layout: Layout, stage: StageInfo, report: Report) -> None:
    if cfg.preflight.shards == "off" or stage.tensor_parallel < 1:
        return
    dp = max(layout.world_size // stage.tensor_parallel, 1)
    for use in stage.shards:
        if use.num_samples is None:
            report.errors.append(f"{stage.config_file.name}: {use.field}: no shards at {use.shard_dir} "
                                 f"({use.problem}); build them with `{use.build}`")
            continue
        shards, samples = use.num_shards, use.num_samples
        streams = dp * max(1, use.num_workers)
        what = (f"{use.shard_dir}: {shards} shard(s), {samples} samples for {dp} data-parallel rank(s) x "
                f"{max(1, use.num_workers)} loader worker(s) = {streams} streams")
        if samples < streams:
            report.errors.append(f"{what}: fewer samples than streams")
        elif shards < streams:
            message = (f"{what}: fewer shards than streams (re-shard with a smaller shard.samples_per_shard, or lower "
                       "data.num_workers; preflight.shards=warn accepts it)")
            strict = cfg.preflight.shards == "error" and use.training
            (report.errors if strict else report.warnings).append(message)
        else:
            report.passed.append(what)


def check_inputs(stage: StageInfo, report: Report) -> None:
    missing = [f"{field}: {path} not found" for field, path in stage.inputs if not path.exists()]
    if missing:
        report.errors.append(f"{stage.config_file.name}: " + "; ".join(missing))


def check_stage_config(layout: Layout, stage: StageInfo, env: Mapping[str, str], report: Report) -> None:
    """The verdict the stage gave when it was read, when that was for this world size; else it is asked again."""
    if stage.validation is not None and stage.world_size == layout.world_size:
        result = stage.validation
    else:
        result = stages.validate(stage, layout.world_size, {**os.environ, **env})
    if result.ok:
        report.passed.append(f"stage config: {result.message}")
    elif result.config_error:
        report.errors.append(f"the stage rejects its config ({result.command}): {result.message}")
    else:
        report.errors.append(f"the stage's config check failed ({result.command}): {result.message}")


def _writable(folder: Path) -> str | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-"):
            pass
    except OSError as err:
        return f"{folder} is not writable ({err.strerror or err})"
    return None


def check_output(cfg: LaunchConfig, stage: StageInfo, report: Report) -> None:
    problems = [p for p in (_writable(stage.output_dir), _writable(stage.checkpoint_dir), _writable(cfg.job_dir()))
                if p]
    if problems:
        report.errors.append("output: " + "; ".join(problems))
    else:
        report.passed.append(f"output: {stage.output_dir} writable")


def _is_local(addr: str) -> bool:
    if addr in ("127.0.0.1", "localhost", "::1", LOCAL_HOST):
        return True
    try:
        return addr in (socket.gethostname(), socket.getfqdn()) or \
            socket.gethostbyname(addr) in ("127.0.0.1", socket.gethostbyname(socket.gethostname()))
    except OSError:
        return False


def check_port(cfg: LaunchConfig, layout: Layout, report: Report) -> None:
    if not cfg.preflight.port_free or (layout.node_rank or 0) != 0 or not _is_local(layout.master_addr):
        return
    with socket.socket() as s:
        try:
            s.bind(("", layout.master_port))
        except OSError:
            report.errors.append(f"nodes.master_port: port {layout.master_port} is in use on this machine (the master "
                                 "of another job?); set another port or 0 for a free one")
            return
    report.passed.append(f"master port {layout.master_port} is free")


def check_mlflow(stage: StageInfo, report: Report, timeout_s: float = 3.0) -> None:
    if not stage.mlflow:
        return
    uri = stage.tracking_uri
    warn = report.warnings.append
    if uri.startswith("sqlite:"):
        path = Path(uri.split("sqlite:///", 1)[-1]) if uri.startswith("sqlite:///") else None
        if path is None:
            warn(f"MLflow: cannot check the tracking URI {uri}")
            return
        if path.exists():
            try:
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s).execute("select 1").fetchall()
            except sqlite3.Error as err:
                warn(f"MLflow: {path} cannot be opened as sqlite ({err}); the stages will keep metrics.jsonl only")
                return
        elif _writable(path.parent):
            warn(f"MLflow: cannot create {path} ({_writable(path.parent)})")
            return
        report.passed.append(f"MLflow: {uri}")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read(64)
            report.passed.append(f"MLflow: {uri} answers")
        except (urllib.error.URLError, OSError) as err:
            warn(f"MLflow: tracking server {uri} did not answer ({getattr(err, 'reason', err)}); training goes on and "
                 "the stages keep metrics.jsonl")
    elif uri.startswith("file:") or "://" not in uri:
        warn(f"MLflow: {uri} is a file store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true; use "
             "sqlite:///path/mlflow.db")
    else:
        warn(f"MLflow: cannot check the tracking URI {uri}")


def run(cfg: LaunchConfig, layout: Layout, stage: StageInfo, env: Mapping[str, str] | None = None) -> Report:
    """Every check; raises PreflightError listing all errors. Returns the report (warnings included).
    `env`: the variables every rank gets (the stage's config check runs with them)."""
    report = Report()
    if not cfg.preflight.enabled:
        report.warnings.append("preflight.enabled=false: checks skipped")
        return report
    if cfg.preflight.versions:
        check_versions(cfg, report)
    check_accelerator(cfg, layout, {**os.environ, **(env or {})}, report)
    check_parallel(layout, stage, report)
    check_inputs(stage, report)
    if cfg.preflight.stage_config:
        check_stage_config(layout, stage, env or {}, report)
    check_shards(cfg, layout, stage, report)
    check_output(cfg, stage, report)
    check_port(cfg, layout, report)
    check_mlflow(stage, report)
    report.raise_if_failed()
    return report
