"""YAML file + `key=value` overrides -> a typed dataclass config, with errors that name the file or key at fault.

The one loader behind every package's config (data_pipeline, pretrain, finetune). It lives here because
data_pipeline is the lowest package the training packages may import; launch/ imports none of them, so it keeps a
copy of these few lines (launch/config.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.errors import ConfigError


def load_typed(schema: type, path: str | Path | None, overrides: Sequence[str] = (), *,
               error: type[Exception] = ConfigError, label: str = "config") -> Any:
    """Merge the schema's defaults, the YAML at `path` (None: defaults only) and the overrides; set config_file.

    Unknown keys and wrong types are refused by omegaconf, which names the key; `error` is the caller's error type.
    """
    sources: list[Any] = []
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise error(f"{label} file not found: {path}")
        where = f"{path}: "
        try:
            sources.append(OmegaConf.load(path))
        except Exception as err:  # YAML syntax
            raise error(f"{where}cannot parse: {err}") from None
    sources.append(dotlist(overrides, where=where, error=error))
    cfg = merge_typed(schema, sources, where=where, error=error)
    cfg.config_file = str(path) if path is not None else ""
    return cfg


def dotlist(overrides: Sequence[str], *, where: str = "", error: type[Exception] = ConfigError) -> Any:
    """`key=value` overrides as an omegaconf node to merge last."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise error(f"overrides must be key=value, got {bad}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise error(f"{where}{err}") from None


def merge_typed(schema: type, sources: Sequence[Any], *, where: str = "",
                error: type[Exception] = ConfigError) -> Any:
    """The schema's defaults with `sources` (YAML nodes, dicts) merged on top, as a dataclass instance."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), *sources))
    except OmegaConfBaseException as err:  # unknown key or wrong type: omegaconf names the key
        raise error(f"{where}{err}") from None
