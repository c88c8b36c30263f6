"""The project's configs: the YAML files in this folder and the one loader that reads them.

YAML file + `key=value` overrides -> a typed dataclass config, with errors that name the file or key at fault.
Every package's config goes through here (data_pipeline, the training core and both recipes, launch), and every
config error is the one `ConfigError` below, so a caller never converts one package's error into another's.

Config files are found from any working directory (`config_path`, the one rule): a relative path names a file
under the working directory when there is one there, else under the repository (`configs/data/tiny.yaml`), else
under this folder (`data/tiny.yaml`). The rule serves every file a config names: --config, data.config,
deepspeed.config, the launch config.

This is the lowest layer of the import graph: it imports nothing of the project, so launch/ (which imports no
training package) and data_pipeline/ (the lowest data layer) can both use it (docs/architecture.md). progress.py,
beside it, is the progress display every long command shares, for the same reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIGS_DIR = Path(__file__).resolve().parent
REPO_ROOT = CONFIGS_DIR.parent


class ConfigError(ValueError):
    """A config value that cannot work, or a config file that cannot be read; the message names the field or the
    file."""


def config_path(path: str | Path) -> Path:
    """Where the config file `path` is: itself when absolute or present from the working directory, else the same
    relative path under the repository, else under configs/; a file found nowhere comes back as given (the
    caller's message then says `not_found`). So `configs/deepspeed/zero2.json` inside a YAML works from any
    working directory, and a file of the user's beside them wins over the repository's."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    for base in (REPO_ROOT, CONFIGS_DIR):
        if (base / path).exists():
            return base / path
    return path


def not_found(path: str | Path) -> str:
    """The message for a config file `config_path` found nowhere."""
    return f"file not found: {path} (looked under {Path.cwd()}, {REPO_ROOT} and {CONFIGS_DIR})"


def load_typed(schema: type, path: str | Path | None, overrides: Sequence[str] = (), *, label: str = "config",
               overrides_from: str = "override") -> Any:
    """Merge the schema's defaults, the YAML at `path` (None: defaults only) and the overrides; set config_file.

    Unknown keys and wrong types are refused by omegaconf, which names the key; the message blames where the key
    came from: the file, or the override itself (`overrides_from` says whence, e.g. "command-line override").
    `label` names the file in the message when it is missing ("launch config file not found: ...").
    """
    sources: list[Any] = []
    where = ""
    if path is not None:
        path = config_path(path)
        if not path.is_file():
            raise ConfigError(f"{label} {not_found(path)}")
        where = f"{path}: "
        try:
            sources.append(OmegaConf.load(path))
        except Exception as err:  # YAML syntax
            raise ConfigError(f"{where}cannot parse: {err}") from None
    merge_typed(schema, sources, where=where)  # the file alone first: what fails after it is an override's fault
    extra = dotlist(overrides, where=f"{overrides_from}s: ")
    try:
        cfg = merge_typed(schema, [*sources, extra])
    except ConfigError as err:
        culprit = next((o for o in overrides if _refused(schema, sources, o)), None)
        raise ConfigError(f"{overrides_from} {culprit!r}: {err}" if culprit is not None
                          else f"{overrides_from}s {list(overrides)}: {err}") from None
    cfg.config_file = str(path) if path is not None else ""
    return cfg


def _refused(schema: type, sources: Sequence[Any], override: str) -> bool:
    try:
        merge_typed(schema, [*sources, dotlist([override])])
    except ConfigError:
        return True
    return False


def dotlist(overrides: Sequence[str], *, where: str = "") -> Any:
    """`key=value` overrides as an omegaconf node to merge last."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}{err}") from None


def merge_typed(schema: type, sources: Sequence[Any], *, where: str = "") -> Any:
    """The schema's defaults with `sources` (YAML nodes, dicts) merged on top, as a dataclass instance."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), *sources))
    except OmegaConfBaseException as err:  # unknown key or wrong type: omegaconf names the key
        raise ConfigError(f"{where}{err}") from None
