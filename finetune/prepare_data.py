"""python -m finetune data --config configs/finetune/<task>.yaml [--force] [key=value ...]

Tokenizes the task's splits (those that exist among train, valid, test) with the pretraining tokenizer into the
shards finetuning reads. Skipped per split when inputs, tokenizer and settings are unchanged.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from configs import ConfigError
from data_pipeline.errors import DataError
from finetune.config import load
from finetune.data import build_shards, read_split
from finetune.resolve import load_data_config, resolve_task_data, validate_task


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args.config, args.overrides)
        validate_task(cfg)
        td = resolve_task_data(cfg, load_data_config(cfg))
        splits = []
        for split in ("train", "valid", "test"):
            try:
                read_split(td, split)
            except DataError as err:
                if "has no" in str(err):  # this layout lacks the split: fine
                    continue
                raise
            splits.append(split)
        counts = build_shards(td, splits, force=args.force)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[finetune data] {cfg.task.name} ({cfg.task.difficulty}): " +
          ", ".join(f"{s} {n}" for s, n in counts.items()) + f" examples -> {td.shard_root}", flush=True)
    return 0
