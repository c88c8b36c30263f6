"""`prepare`: extract -> tokenizer -> shard (-> tasks, -> held-out shards) from one config. Each step is skipped
when its inputs and config are unchanged (force redoes them), so `prepare` is also the one command that brings
everything up to date: `python -m data_pipeline prepare --heldout` is what pretraining names when its held-out
shards are missing."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.config import DataConfig


def prepare(cfg: DataConfig, *, force: bool = False, with_tasks: bool = False,
            with_heldout: bool = False) -> dict[str, Path]:
    """Run the pipeline; returns the output folders ({"docs", "tokenizer", "shards"[, "tasks"][, "heldout"]}).
    with_heldout: also extract heldout.sources and shard them with the training tokenizer (DataConfig.heldout)."""
    from data_pipeline.extract import run_extract
    from data_pipeline.shards import run_shard
    from data_pipeline.tasks import run_tasks
    from data_pipeline.tokenizer import train_tokenizer

    held = cfg.heldout_config() if with_heldout else None  # an empty heldout section fails before any work
    run_extract(cfg, force=force)
    train_tokenizer(cfg, force=force)
    run_shard(cfg, force=force)
    out = {"docs": cfg.in_work(cfg.extract.out_dir), "tokenizer": cfg.tokenizer_dir(),
           "shards": cfg.in_work(cfg.shard.out_dir)}
    if with_tasks:
        run_tasks(cfg, force=force)
        out["tasks"] = cfg.in_work(cfg.tasks.out_dir)
    if held is not None:
        run_extract(held, force=force)
        run_shard(held, force=force)
        out["heldout"] = held.in_work(held.shard.out_dir)
    return out
