"""What the launcher needs to know about the stage it starts, read from the stage's own YAML and `key=value`
arguments without importing the stage's package (launch/ imports none of model/, data_pipeline/, pretrain/,
finetune/): where it writes, where its checkpoints go, its tensor-parallel size, its MLflow store, and the shard
folders it reads; and `validate()`, which runs the stage's own config check (`--validate-only`) in one process.

The defaults below mirror the stages' typed configs (pretrain/config.py EngineConfig, data_pipeline/config.py);
the stage itself validates everything again before training.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from launch.config import REPO_ROOT, LaunchConfigError, resolve

# stage name -> (python module run by every rank, the stage's "continue from the latest checkpoint" flag)
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("pretrain", "--resume"),
    "finetune": ("finetune", "--resume"),
}


@dataclass(frozen=True)
class ShardUse:
    """A shard folder a stage reads, with the loader workers each data-parallel rank runs on it."""

    shard_dir: Path
    num_workers: int
    field: str  # the config field it comes from, for error messages
    training: bool = True  # the training stream (held-out sets are read whole by every rank's few batches)
    build: str = ""  # the command that builds the folder, for the error message


@dataclass(frozen=True)
class StageInfo:
    name: str  # pretrain | finetune
    config_file: Path
    args: tuple[str, ...]  # everything after the stage name, verbatim
    output_dir: Path
    checkpoint_dir: Path
    tensor_parallel: int
    mlflow: bool
    tracking_uri: str  # resolved as the stage's tracker resolves it
    shards: tuple[ShardUse, ...]
    inputs: tuple[tuple[str, Path], ...] = ()  # (config field, file or folder) the stage reads and must find

    @property
    def module(self) -> str:
        return STAGES[self.name][0]

    @property
    def resume_flag(self) -> str:
        return STAGES[self.name][1]

    def latest_checkpoint(self) -> str | None:
        """The tag the `latest` pointer names (written only once a checkpoint is complete), if any."""
        pointer = self.checkpoint_dir / "latest"
        try:
            tag = pointer.read_text().strip()
        except OSError:
            return None
        return tag if tag and (self.checkpoint_dir / tag).is_dir() else None

    def validate_argv(self, world_size: int, python: str = sys.executable) -> list[str]:
        """The stage's own check of its config for `world_size` ranks, run in one process without process groups
        (the stage's --validate-only; the resume flag is left out: it changes nothing the check looks at)."""
        args = [a for a in self.args if a != self.resume_flag]
        return [python, "-m", self.module, "--validate-only", "--world-size", str(world_size), *args]


VALIDATE_TIMEOUT_S = 600.0  # imports torch, DeepSpeed and megatron-core: seconds normally, longer on a busy node


@dataclass(frozen=True)
class Validation:
    """What `python -m <stage> --validate-only` said: ok, or the reason it refused the config."""

    ok: bool
    config_error: bool  # exit code 2: the stage rejected its config (not a crash or a timeout)
    message: str  # the `config ok: ...` line, or the `error: ...` lines (or the output's tail when it crashed)
    command: str


def validate(stage: StageInfo, world_size: int, env: dict[str, str], cwd: Path = REPO_ROOT,
             python: str = sys.executable, timeout_s: float = VALIDATE_TIMEOUT_S) -> Validation:
    """Run the stage's --validate-only for `world_size` ranks with the environment the ranks get."""
    argv = stage.validate_argv(world_size, python)
    shown = f"python -m {stage.module} --validate-only --world-size {world_size}"  # the stage args are the user's
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Validation(False, False, f"no answer within {timeout_s:g}s", shown)
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    if proc.returncode == 0:
        ok = [line for line in lines if line.startswith("config ok:")]
        if ok:
            return Validation(True, False, ok[-1], shown)
        return Validation(False, False, "exit code 0 but no `config ok:` line", shown)
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:") or ": error:" in line]
    tail = "\n".join(lines[-15:])
    if proc.returncode == 2:
        return Validation(False, True, "\n".join(errors) or tail, shown)
    return Validation(False, False, f"exit code {proc.returncode}:\n{tail}", shown)


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


def _get(cfg: DictConfig, key: str, default: Any) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def _load_yaml(path: Path, overrides: Sequence[str], what: str) -> DictConfig:
    if not path.is_file():
        raise LaunchConfigError(f"{what}: config file not found: {path}")
    try:
        return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:  # YAML syntax or a bad override
        raise LaunchConfigError(f"{what}: {path}: {err}") from None


def _pretrain_shards(stage_cfg: DictConfig, where: str) -> list[ShardUse]:
    """Pretraining reads data.config's loader.shard_dir (data.overrides applied), and for evaluation the folder
    data.eval_overrides names; paths resolve as data_pipeline/config.py resolves them."""
    data_config = _get(stage_cfg, "data.config", "")
    if not data_config:
        return []
    overrides = list(_get(stage_cfg, "data.overrides", []))
    workers = int(_get(stage_cfg, "data.num_workers", 0))
    data_cfg = _load_yaml(resolve(data_config), overrides, f"{where}data.config")
    work = resolve(_get(data_cfg, "work_dir", "runs/data"))
    build = f"python -m data_pipeline prepare --config {data_config} (with data.overrides)"
    uses = [ShardUse(_under(work, _get(data_cfg, "loader.shard_dir", "shards")), workers, "data.config", True, build)]
    eval_overrides = list(_get(stage_cfg, "data.eval_overrides", []))
    if eval_overrides and int(_get(stage_cfg, "eval.batches", 4)) > 0:
        eval_cfg = _load_yaml(resolve(data_config), overrides + eval_overrides, f"{where}data.eval_overrides")
        eval_work = resolve(_get(eval_cfg, "work_dir", "runs/data"))
        uses.append(ShardUse(_under(eval_work, _get(eval_cfg, "loader.shard_dir", "shards")), 0,
                             "data.eval_overrides", False, "python -m data_pipeline extract / shard with "
                                                           "data.overrides + data.eval_overrides"))
    return uses


SPLIT_NAMES = {"train": "train", "valid": "valid", "dev": "valid", "validation": "valid", "test": "test"}


def _finetune_shards(stage_cfg: DictConfig, where: str) -> list[ShardUse]:
    """Finetuning reads task shards: <work_dir>/<tasks.out_dir>/<difficulty>/<task>/<split> (finetune/data.py)."""
    data_config = _get(stage_cfg, "data.config", "configs/data/tiny.yaml")
    data_cfg = _load_yaml(resolve(data_config), list(_get(stage_cfg, "data.overrides", [])), f"{where}data.config")
    task, difficulty = _get(stage_cfg, "task.name", ""), _get(stage_cfg, "task.difficulty", "easy") or "default"
    if not task:
        return []
    root = _under(resolve(_get(data_cfg, "work_dir", "runs/data")), _get(data_cfg, "tasks.out_dir", "tasks"))
    folder = root / difficulty / task
    workers = int(_get(stage_cfg, "data.num_workers", 0))
    train = _get(stage_cfg, "task.train_split", "train")
    valid = _get(stage_cfg, "task.valid_split", "valid")
    build = f"python -m finetune data --config {where.rstrip(': ')} (with the same key=value arguments)"
    return [ShardUse(folder / SPLIT_NAMES.get(train, train), workers, "task.train_split", True, build),
            ShardUse(folder / SPLIT_NAMES.get(valid, valid), 0, "task.valid_split", False, build)]


def _under(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else base / p


DEFAULT_STORE = REPO_ROOT / "runs" / "mlflow.db"  # pretrain/tracking.py: the one store of both stages


def tracking_uri(configured: str, environ=os.environ) -> str:
    """The stages' rule (pretrain/tracking.py resolve_uri): tracking.uri, else $MLFLOW_TRACKING_URI, else the
    project's one sqlite store."""
    if configured:
        return configured
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{DEFAULT_STORE}"


def read_stage(name: str, args: Sequence[str], environ=os.environ) -> StageInfo:
    if name not in STAGES:
        raise LaunchConfigError(f"unknown stage {name!r}; the launcher starts {sorted(STAGES)}")
    config, overrides = split_stage_args(args)
    if config is None:
        raise LaunchConfigError(f"{name}: give the stage's config: `-- {name} --config configs/{name}/<name>.yaml`")
    path = resolve(config)
    cfg = _load_yaml(path, overrides, name)
    where = f"{config}: "
    if name == "pretrain":  # pretrain/config.py, pretrain/tracking.py
        output_dir = resolve(_get(cfg, "output_dir", "runs/pretrain/run"))
        shards = _pretrain_shards(cfg, where)
    else:  # finetune/config.py, finetune/run.py, finetune/tracking.py
        task, difficulty = _get(cfg, "task.name", ""), _get(cfg, "task.difficulty", "easy")
        objective = _get(cfg, "objective.name", "ar")
        output_dir = resolve(_get(cfg, "output_dir", "") or f"runs/finetune/{task}-{difficulty}-{objective}")
        shards = _finetune_shards(cfg, where)
    inputs = [("deepspeed.config", resolve(_get(cfg, "deepspeed.config", "configs/deepspeed/zero1.json"))),
              ("data.config", resolve(_get(cfg, "data.config", "configs/data/tiny.yaml")))]
    if name == "finetune":
        init = option(args, "--init") or _get(cfg, "init.checkpoint", "")
        if init and init != "scratch":
            inputs.append(("--init", resolve(init)))
    ckpt = _get(cfg, "checkpoint.dir", "")
    try:
        tp = int(_get(cfg, "parallel.tensor_parallel", 1))
    except (TypeError, ValueError):
        raise LaunchConfigError(f"{where}parallel.tensor_parallel: must be an integer") from None
    return StageInfo(
        name=name, config_file=path, args=tuple(args), output_dir=output_dir,
        checkpoint_dir=resolve(ckpt) if ckpt else output_dir / "checkpoints", tensor_parallel=tp,
        mlflow=bool(_get(cfg, "tracking.mlflow", True)),
        tracking_uri=tracking_uri(_get(cfg, "tracking.uri", ""), environ),
        shards=tuple(shards), inputs=tuple(inputs),
    )
