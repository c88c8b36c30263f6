"""`prepare`: extract -> tokenizer -> shard (-> tasks) from one config. Each step is skipped when its inputs and
config are unchanged (force redoes them)."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.config import DataConfig


def prepare(cfg: DataConfig, *, force: bool = False, with_tasks: bool = False) -> dict[str, Path]:
    """Run the pipeline; returns the output folders ({"docs", "tokenizer", "shards"[, "tasks"]})."""
    from data_pipeline.extract import run_extract
    from data_pipeline.shards import run_shard
    from data_pipeline.tasks import run_tasks
    from data_pipeline.tokenizer import train_tokenizer

    run_extract(cfg, force=force)
    train_tokenizer(cfg, force=force)
    run_shard(cfg, force=force)
    out = {"docs": cfg.in_work(cfg.extract.out_dir), "tokenizer": cfg.tokenizer_dir(),
           "shards": cfg.in_work(cfg.shard.out_dir)}
    if with_tasks:
        run_tasks(cfg, force=force)
        out["tasks"] = cfg.in_work(cfg.tasks.out_dir)
    return out
