"""python -m data_pipeline <command> [--config configs/data/tiny.yaml] [key=value ...]

Commands:
  extract    Wikipedia dumps, books and WikiText -> clean documents (compressed JSONL)
  tokenizer  train the sentencepiece model on a sample of the documents
  shard      tokenize and pack into webdataset shards + manifest.json
  tasks      GLGE tasks and IWSLT14 -> source/target task shards
  inspect    print a shard folder's manifest statistics and a few detokenized samples
  prepare    extract -> tokenizer -> shard (add --tasks for the task shards, --heldout for the held-out shards
             of the config's heldout section, which pretraining evaluates on)
Steps whose inputs and config are unchanged are skipped; --force redoes them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_pipeline.config import REPO_ROOT, load_config, resolve
from data_pipeline.errors import ConfigError, DataError

DEFAULT_CONFIG = REPO_ROOT / "configs" / "data" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["extract", "tokenizer", "shard", "tasks", "inspect", "prepare"])
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. shard.seq_len=256)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="data config YAML (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="redo steps even when their output is up to date")
    parser.add_argument("--tasks", action="store_true", help="prepare: also build the task shards")
    parser.add_argument("--heldout", action="store_true", help="prepare: also build the held-out shards (the "
                                                               "config's heldout section)")
    parser.add_argument("--shard-dir", default="", help="inspect: shard folder (default: the config's shard.out_dir)")
    parser.add_argument("--shard", default=None, help="inspect: which shard to show samples of")
    parser.add_argument("-n", type=int, default=3, help="inspect: samples to show")
    parser.add_argument("--verify", default="size", choices=["size", "sha256"], help="inspect: shard check")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    cmd = args.command
    if cmd == "prepare":
        from data_pipeline.prepare import prepare

        prepare(cfg, force=args.force, with_tasks=args.tasks, with_heldout=args.heldout)
    elif cmd == "extract":
        from data_pipeline.extract import run_extract

        run_extract(cfg, force=args.force)
    elif cmd == "tokenizer":
        from data_pipeline.tokenizer import train_tokenizer

        train_tokenizer(cfg, force=args.force)
    elif cmd == "shard":
        from data_pipeline.shards import run_shard

        run_shard(cfg, force=args.force)
    elif cmd == "tasks":
        from data_pipeline.tasks import run_tasks

        run_tasks(cfg, force=args.force)
    elif cmd == "inspect":
        from data_pipeline.shards import inspect_shards

        shard_dir = resolve(args.shard_dir, Path.cwd()) if args.shard_dir else cfg.in_work(cfg.shard.out_dir)
        print(inspect_shards(shard_dir, args.shard, args.n, args.verify))
    return 0


if __name__ == "__main__":
    sys.exit(main())
