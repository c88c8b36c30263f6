"""python -m pretrain.core backfill <output_dir> [--tracking-uri URI]

Sends to MLflow what a job recorded in <output_dir>/metrics.jsonl while its MLflow server was away, and closes the
run with the status the job ended with (pretrain.core.mlflow_sync.backfill). Safe to run more than once: what MLflow
already has is not duplicated. Exit codes: 0 every job is in MLflow; 1 MLflow is still unreachable or a job is not
closed yet; 2 no metrics.jsonl there.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pretrain.core.mlflow_sync import Unavailable, backfill
from pretrain.core.tracking import HTTP_LIMITS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("backfill", help="send a job's metrics.jsonl to MLflow and close its run")
    cmd.add_argument("output_dir", type=Path, help="the job's output_dir (where metrics.jsonl is)")
    cmd.add_argument("--tracking-uri", default="", help="the store to send to (default: the one the job used)")
    args = parser.parse_args(argv)
    for var, value in HTTP_LIMITS.items():
        os.environ.setdefault(var, value)
    try:
        done = backfill(args.output_dir, args.tracking_uri or None)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Unavailable as err:
        print(f"error: {err}; nothing lost, run this again once MLflow is reachable", file=sys.stderr)
        return 1
    return 0 if done else 1


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.exit(main(sys.argv[1:]))
