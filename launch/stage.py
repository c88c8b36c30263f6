"""What the launcher knows about the stage it starts, asked of the stage itself.

launch/ imports none of model/, data_pipeline/, pretrain/, finetune/ (nor torch), so instead of mirroring the
stages' rules it runs `python -m <stage> --validate-only --json --world-size N <stage args>` in one process (no
process group starts; with the resume flag the stage also checks that it can continue its checkpoint) and reads
the answer (pretrain/core/facts.py): the stage's own verdict on its config for N
ranks, where it writes, where its checkpoints and their `latest` pointer are, its tensor-parallel size, its MLflow
store, the files it needs and the shard folders it reads, with their sizes. The stage states these facts even when
it refuses its config, so preflight can report the refusal together with everything else it finds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from configs import ConfigError
from launch.config import REPO_ROOT

# stage name -> (python module run by every rank, the stage's "continue from the latest checkpoint" flag)
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("pretrain", "--resume"),
    "finetune": ("finetune", "--resume"),
}

VALIDATE_TIMEOUT_S = 600.0  # imports torch and the data pipeline: seconds normally, longer on a busy node


@dataclass(frozen=True)
class ShardUse:
    """A shard folder a stage reads, with the loader workers each data-parallel rank runs on it."""

    shard_dir: Path
    num_workers: int
    field: str  # the config field it comes from, for error messages
    training: bool = True  # the training stream (held-out sets are read whole by every rank's few batches)
    build: str = ""  # the command that builds the folder, for the error message
    num_shards: int | None = None  # from the folder's manifest; None when it cannot be read (see `problem`)
    num_samples: int | None = None
    problem: str = ""  # why the manifest cannot be read


@dataclass(frozen=True)
class Validation:
    """What `python -m <stage> --validate-only` said: ok, or the reason it refused the config."""

    ok: bool
    config_error: bool  # exit code 2: the stage rejected its config (not a crash or a timeout)
    message: str  # the `config ok: ...` line, or the `error: ...` lines (or the output's tail when it crashed)
    command: str


@dataclass(frozen=True)
class StageInfo:
    name: str  # pretrain | finetune
    config_file: Path
    args: tuple[str, ...]  # everything after the stage name, verbatim
    output_dir: Path
    checkpoint_dir: Path
    tensor_parallel: int
    mlflow: bool
    tracking_uri: str  # the store the stage's tracker writes to
    shards: tuple[ShardUse, ...]
    latest_pointer: str  # the file in checkpoint_dir naming the newest complete checkpoint
    inputs: tuple[tuple[str, Path], ...] = ()  # (config field, file or folder) the stage reads and must find
    validation: Validation | None = None  # the stage's verdict when it was asked, for `world_size` ranks
    world_size: int | None = None

    @property
    def module(self) -> str:
        return STAGES[self.name][0]

    @property
    def resume_flag(self) -> str:
        return STAGES[self.name][1]

    def latest_checkpoint(self) -> str | None:
        """The tag the `latest` pointer names (written only once a checkpoint is complete), if any."""
        try:
            tag = (self.checkpoint_dir / self.latest_pointer).read_text().strip()
        except OSError:
            return None
        return tag if tag and (self.checkpoint_dir / tag).is_dir() else None


def option(args: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in a stage's command line (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


VALUE_OPTIONS = ("--config", "--init")  # the stages' options that take a value (--resume takes none)


def split_stage_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """(--config value, key=value overrides) from a stage's command line."""
    overrides = [a for i, a in enumerate(args)
                 if not a.startswith("-") and "=" in a and (i == 0 or args[i - 1] not in VALUE_OPTIONS)]
    return option(args, "--config"), overrides


def check_stage(name: str, args: Sequence[str]) -> None:
    """ConfigError unless `name` is a stage the launcher starts and its command line names a config."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; the launcher starts {sorted(STAGES)}")
    if split_stage_args(args)[0] is None:
        raise ConfigError(f"{name}: give the stage's config: `-- {name} --config configs/{name}/<name>.yaml`")


def ask(name: str, args: Sequence[str], world_size: int | None, env: Mapping[str, str], cwd: Path = REPO_ROOT,
        python: str = sys.executable, timeout_s: float = VALIDATE_TIMEOUT_S) -> tuple[Validation, dict[str, Any]]:
    """Run the stage's --validate-only --json (for `world_size` ranks; None: the stage's default) with environment
    `env`; returns its verdict and its report ({} when it gave none: a crash, a timeout, a bad command line)."""
    module = STAGES[name][0]
    size = ["--world-size", str(world_size)] if world_size is not None else []
    shown = " ".join(["python", "-m", module, "--validate-only", *size])  # the stage args are the user's
    try:  # with the resume flag, when given, the stage also checks that it can continue its checkpoint
        proc = subprocess.run([python, "-m", module, "--validate-only", "--json", *size, *args], cwd=cwd,
                              env=dict(env), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Validation(False, False, f"no answer within {timeout_s:g}s", shown), {}
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode in (0, 2) and reports:
        report = json.loads(reports[-1])
        if report["ok"]:
            return Validation(True, False, f"config ok: {report['message']}", shown), report
        return Validation(False, True, report["error"], shown), report
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    tail = "\n".join(lines[-15:])
    if proc.returncode == 2:  # refused before any config was read: the stage's command line (argparse)
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:") or ": error:" in line]
        return Validation(False, True, "\n".join(errors) or tail, shown), {}
    return Validation(False, False, f"exit code {proc.returncode}:\n{tail}", shown), {}


def validate(stage: StageInfo, world_size: int, env: Mapping[str, str], cwd: Path = REPO_ROOT,
             python: str = sys.executable, timeout_s: float = VALIDATE_TIMEOUT_S, resume: bool = False) -> Validation:
    """The stage's verdict on its config for `world_size` ranks, asked again (before a restart, or for another
    world size than `stage` was read for); resume: as the restart will run it, continuing its checkpoint."""
    args = [*stage.args, *([stage.resume_flag] if resume and stage.resume_flag not in stage.args else [])]
    return ask(stage.name, args, world_size, env, cwd, python, timeout_s)[0]


def read_stage(name: str, args: Sequence[str], environ: Mapping[str, str] = os.environ, world_size: int | None = None,
               cwd: Path = REPO_ROOT, python: str = sys.executable) -> StageInfo:
    """Ask the stage about itself (`ask`), as its ranks would run it (environ: their environment). ConfigError when
    it cannot say: an unknown stage, no --config, a config it cannot even read."""
    check_stage(name, args)
    verdict, report = ask(name, args, world_size, environ, cwd, python)
    if "output_dir" not in report:
        raise ConfigError(f"{name}: the stage cannot read its config ({verdict.command}): {verdict.message}")
    return StageInfo(
        name=name, config_file=Path(report["config_file"]), args=tuple(args), output_dir=Path(report["output_dir"]),
        checkpoint_dir=Path(report["checkpoint_dir"]), tensor_parallel=int(report["tensor_parallel"]),
        mlflow=bool(report["mlflow"]), tracking_uri=report["tracking_uri"],
        shards=tuple(ShardUse(Path(s["dir"]), s["num_workers"], s["field"], s["training"], s["build"], s["num_shards"],
                              s["num_samples"], s["problem"] or "") for s in report["shards"]),
        latest_pointer=report["latest_pointer"], inputs=tuple((i["field"], Path(i["path"])) for i in report["inputs"]),
        validation=verdict, world_size=report["world_size"])
