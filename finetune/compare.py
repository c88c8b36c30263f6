"""python -m finetune compare [--experiment tandem-finetune] [--tracking-uri URI] [--task T] [--out DIR]

Finds the evaluation runs of an experiment with mlflow.search_runs and prints, per task and difficulty, a table
of quality against latency per decoding mode, the shape of the BANG / ELMER papers' tables: one row per run with
the objective, decoding mode, the task's metrics, its task score, ms/sample, samples/s and the speedup over AR
beam search (AR greedy where no beam run exists) of the same finetune run, else of the same objective, else of the
task. Saves <out>/quality_vs_speed.png (task score against samples/s, one point per run) and <out>/loss_curves.png
(training loss of every finetune run of the experiment), both with matplotlib's Agg backend.

The figures and the table also go to MLflow, as one comparison run in the experiment (tag kind=comparison; the
compared runs' ids in comparison.json): a figure spans many runs, so it belongs to none of them, and each
comparison stays as it was when it was made (a later one, with more runs, is a new run). `--no-log` skips it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from finetune.config import DEFAULT_EXPERIMENT
from finetune.glge_tasks import get_task
from finetune.tracking import log_run, resolve_uri

METRIC_LABELS = {"rouge1": "R-1", "rouge2": "R-2", "rougeL": "R-L", "bleu4": "B-4", "meteor": "MTR", "f1": "F1",
                 "bleu1": "B-1", "bleu2": "B-2", "distinct1": "D-1", "distinct2": "D-2", "bleu": "BLEU"}


def _num(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def find_runs(uri: str, experiment: str, kind: str = "evaluation", task: str = ""):
    """search_runs over the experiment, as a pandas DataFrame (empty when the experiment has no such run)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    query = f"tags.kind = '{kind}'" + (f" and tags.task = '{task}'" if task else "")
    return mlflow.search_runs(experiment_names=[experiment], filter_string=query, order_by=["start_time ASC"])


def table_rows(runs) -> list[dict[str, Any]]:
    rows = []
    for _, r in runs.iterrows():
        row = {"run_id": r["run_id"], "task": r.get("tags.task"), "difficulty": r.get("tags.difficulty"),
               "split": r.get("tags.split"), "objective": r.get("tags.objective"), "mode": r.get("tags.decoding_mode"),
               "finetune_run_id": r.get("tags.finetune_run_id"), "task_score": _num(r.get("metrics.task_score")),
               "ms_per_sample": _num(r.get("metrics.ms_per_sample")),
               "samples_per_s": _num(r.get("metrics.samples_per_s")),
               "mean_exit_layer": _num(r.get("metrics.mean_exit_layer")),
               "batch_size": _num(r.get("metrics.batch_size"))}
        try:
            names = get_task(row["task"]).metrics
        except ValueError:
            names = ()
        row["metrics"] = {n: _num(r.get(f"metrics.{n}")) for n in names}
        rows.append(row)
    for row in rows:  # speedup against AR beam (else AR greedy): same finetune run, else same objective, else task
        row["speedup"] = None
        for reference in ("ar_beam", "ar_greedy"):
            peers = [p for p in rows if p["mode"] == reference and p["task"] == row["task"]
                     and p["difficulty"] == row["difficulty"] and p["ms_per_sample"]]
            same_run = [p for p in peers if p["finetune_run_id"] == row["finetune_run_id"]
                        and row["finetune_run_id"] not in (None, "none")]
            same_objective = [p for p in peers if p["objective"] == row["objective"]]
            base = (same_run or same_objective or peers or [None])[-1]
            if base is not None and row["ms_per_sample"]:
                row["speedup"] = base["ms_per_sample"] / row["ms_per_sample"]
                break
    return rows


def format_tables(rows: list[dict[str, Any]]) -> str:
    """One table per (task, difficulty), one line per run."""
    def cell(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    out = []
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["task"], row["difficulty"]), []).append(row)
    for (task, difficulty), group in groups.items():
        names = list(group[0]["metrics"])
        header = ["run", "objective", "mode", "split", *[METRIC_LABELS.get(n, n) for n in names], "score",
                  "ms/sample", "samples/s", "speedup", "exit layer"]
        lines = [header]
        for row in group:
            lines.append([row["run_id"][:8], str(row["objective"]), str(row["mode"]), str(row["split"]),
                          *[cell(row["metrics"][n], "{:.4f}" if n.startswith("distinct") else "{:.2f}")
                            for n in names],
                          cell(row["task_score"]), cell(row["ms_per_sample"]), cell(row["samples_per_s"], "{:.1f}"),
                          cell(row["speedup"], "{:.1f}x"), cell(row["mean_exit_layer"])])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        out.append(f"== {task} ({difficulty}) ==")
        for line in lines:
            out.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
        out.append("")
    return "\n".join(out)


def plot_quality_vs_speed(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"ar": "o", "nar": "s", "bang_mixed": "^", "janus": "D"}
    for row in rows:
        if row["samples_per_s"] is None or row["task_score"] is None:
            continue
        ax.scatter(row["samples_per_s"], row["task_score"], marker=markers.get(row["objective"], "x"), s=40)
        ax.annotate(f"{row['task']} {row['objective']}/{row['mode']}", (row["samples_per_s"], row["task_score"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("samples / s (log)")
    ax.set_ylabel("task score (mean of the task's GLGE metrics)")
    ax.set_title("Quality against speed per decoding mode")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(uri: str, finetune_runs, path: Path, metric: str = "train/loss") -> int:
    """Training loss of each finetune run; returns how many curves were drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for _, r in finetune_runs.iterrows():
        history = sorted(client.get_metric_history(r["run_id"], metric), key=lambda m: m.step)
        if not history:
            continue
        label = f"{r.get('tags.task')}-{r.get('tags.difficulty')} {r.get('tags.objective')} ({r['run_id'][:8]})"
        ax.plot([m.step for m in history], [m.value for m in history], label=label)
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("Finetuning loss")
    if drawn:
        ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def compare(uri: str, experiment: str, out_dir: Path, task: str = "", log: bool = True) -> list[dict[str, Any]]:
    runs = find_runs(uri, experiment, "evaluation", task)
    rows = table_rows(runs)
    table = format_tables(rows)
    print(f"[compare] {len(rows)} evaluation run(s) in experiment {experiment!r} at {uri}")
    print(table, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_quality_vs_speed(rows, out_dir / "quality_vs_speed.png")
    finetune_runs = find_runs(uri, experiment, "finetune", task)
    curves = plot_loss_curves(uri, finetune_runs, out_dir / "loss_curves.png")
    print(f"[compare] wrote {out_dir / 'quality_vs_speed.png'} and {out_dir / 'loss_curves.png'} ({curves} loss "
          "curve(s))", flush=True)
    if log:
        (out_dir / "comparison.txt").write_text(table)
        (out_dir / "comparison.json").write_text(json.dumps(
            {"evaluation_runs": [r["run_id"] for r in rows], "finetune_runs": list(finetune_runs["run_id"])
             if len(finetune_runs) else [], "rows": rows}, indent=1, default=str))
        files = ("quality_vs_speed.png", "loss_curves.png", "comparison.txt", "comparison.json")
        run_id = log_run(uri, experiment, f"compare {task or 'all tasks'}",
                         tags={"kind": "comparison", "task": task or "all"}, params={"task": task or "all"},
                         metrics={"evaluation_runs": len(rows), "loss_curves": curves},
                         artifacts=[(out_dir / name, None) for name in files])
        print(f"[compare] logged the figures and the table to MLflow run {run_id} (kind=comparison)", flush=True)
    return rows


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--tracking-uri", default="",
                        help="default: $MLFLOW_TRACKING_URI or runs/mlflow.db (the store shared with pretraining)")
    parser.add_argument("--task", default="", help="only this task's runs")
    parser.add_argument("--out", default="runs/finetune/compare", help="folder for the PNGs")
    parser.add_argument("--no-log", action="store_true", help="do not record the comparison as an MLflow run")
    args = parser.parse_args(list(argv))
    try:
        compare(resolve_uri(args.tracking_uri), args.experiment, Path(args.out), args.task, log=not args.no_log)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
