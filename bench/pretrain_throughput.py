"""Pretraining throughput of the tiny config on CPU: tokens/s and step time at TP=1 and TP=2, ZeRO 1/2/3, fp32
and bf16, each a real `python -m pretrain` job of 2 processes (torchrun, gloo).

    python bench/pretrain_throughput.py [--steps 25] [--objective bang] [--data-overrides ...]

Needs the tiny shards (configs/pretrain/tiny.yaml says how to build them); --data-overrides points at another
build. Figures come from each run's metrics.jsonl: the log windows after the first (warm-up) are averaged.
tokens/s counts real (non-pad) source + target tokens of the global batch. TP=2 with ZeRO-3 is refused by
design (ZeRO-3 runs at TP=1 only) and is listed as such.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/pretrain/tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(out: Path, tp: int, stage: int, precision: str, args) -> dict:
    overrides = [f"output_dir={out}", f"parallel.tensor_parallel={tp}",
                 f"deepspeed.config=configs/deepspeed/zero{stage}.json", f"deepspeed.precision={precision}",
                 f"train.steps={args.steps}", f"train.log_every={args.log_every}", "schedule.warmup_steps=1",
                 f"objective.name={args.objective}", "eval.batches=0", "eval.at_end=false", "checkpoint.every_steps=0",
                 "checkpoint.save_at_end=false", "tracking.mlflow=false", "train.progress_bar=false"]
    if args.data_overrides:
        overrides.append("data.overrides=[" + ",".join(f"'{o}'" for o in args.data_overrides) + "]")
    env = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pretrain", "--config", CONFIG, *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
        return {"error": (errors[-1] if errors else f"exit code {proc.returncode}")[-160:], "wall_s": wall}
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if w.get("kind") == "train"][1:]  # drop the warm-up window
    if not windows:
        return {"error": "no log windows after warm-up; raise --steps", "wall_s": wall}
    step_time = sum(w["step_time_s"] for w in windows) / len(windows)
    tokens = sum(w["tokens_per_s"] * w["step_time_s"] for w in windows) / sum(w["step_time_s"] for w in windows)
    return {"step_time_s": step_time, "tokens_per_s": tokens, "loss": windows[-1]["loss"], "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--objective", default="bang", choices=["bang", "elmer", "mix"],
                        help="bang: every step costs the same (default); mix: the tiny config's objective")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--data-overrides", nargs="*", default=[], help="key=value for the data config")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. tp1-z2-bf16,tp2-z1-fp32")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()

    cases = [(tp, stage, precision) for tp in (1, 2) for stage in (1, 2, 3) for precision in ("fp32", "bf16")]
    wanted = set(filter(None, args.only.split(",")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp:
        for tp, stage, precision in cases:
            name = f"tp{tp}-z{stage}-{precision}"
            if wanted and name not in wanted:
                continue
            if tp > 1 and stage == 3:
                rows.append({"case": name, "tp": tp, "dp": 2 // tp, "zero": stage, "precision": precision,
                             "error": "refused: ZeRO-3 runs only at TP=1"})
                continue
            result = run_one(Path(tmp) / name, tp, stage, precision, args)
            rows.append({"case": name, "tp": tp, "dp": 2 // tp, "zero": stage, "precision": precision, **result})
            print(f"{name}: {result}", file=sys.stderr, flush=True)

    print(f"\ntiny config, objective {args.objective}, 2 CPU processes (gloo), OMP_NUM_THREADS={args.threads}, "
          f"{args.steps} steps (first {args.log_every} = warm-up, not counted)")
    print(f"{'TP':>2} {'DP':>2} {'ZeRO':>4} {'precision':>9} {'step (s)':>9} {'tokens/s':>9} {'loss':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['tp']:>2} {r['dp']:>2} {r['zero']:>4} {r['precision']:>9}  {r['error']}")
        else:
            print(f"{r['tp']:>2} {r['dp']:>2} {r['zero']:>4} {r['precision']:>9} {r['step_time_s']:>9.3f} "
                  f"{r['tokens_per_s']:>9.0f} {r['loss']:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
