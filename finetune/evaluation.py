"""python -m finetune evaluate --generation DIR [DIR ...]
   python -m finetune evaluate --predictions FILE --config configs/finetune/<task>.yaml --split S [key=value ...]
   python -m finetune evaluate --submission DIR [--difficulty easy] [--split test] [key=value ...]

Scores predictions against the split's references with the task's GLGE metrics (finetune/metrics: ROUGE-1/2/L,
BLEU-4, METEOR only where it runs offline, PersonaChat BLEU-1/2 + Distinct-1/2, CoQA F1; sacrebleu BLEU with its
signature for IWSLT14), prints them, and records each evaluation as an MLflow run tagged with task, difficulty,
objective, decoding mode and the finetune / pretraining runs, holding the metrics, latency figures, the
predictions file, generation.json and the config. Several GLGE tasks at once also give the GLGE score (mean of
the task scores, Distinct x100), logged as a `glge_summary` run. --submission scores a GLGE submission folder: every
`{task}.{difficulty}.test` file in it (or `.{split}`) against that split of configs/finetune/<task>.yaml's data.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from configs import CONFIGS_DIR, ConfigError
from data_pipeline.errors import DataError
from finetune import tracking
from finetune.config import from_dict, load
from finetune.data import TARGET_TAGS, read_split
from finetune.generate import GENERATION_FILE, predictions_name
from finetune.glge_tasks import GLGE_TASKS, get_task
from finetune.metrics import evaluate_task_detailed, glge_score
from finetune.resolve import load_data_config, resolve_task_data, validate_task
from pretrain import core

LATENCY_FIGURES = ("ms_per_sample", "samples_per_s", "mean_exit_layer", "mean_output_tokens", "batch_size",
                   "decoder_passes_per_batch", "examples")


def _read_predictions(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read predictions ({err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def score(info: dict[str, Any], predictions: Path, cfg) -> tuple[Any, list[str]]:
    """TaskEvaluation of one predictions file against the split's references."""
    data_cfg = load_data_config(cfg)
    td = resolve_task_data(cfg, data_cfg)
    try:
        sources, references = read_split(td, info["split"])
    except DataError as err:
        raise ConfigError(f"references for {info['task']} {info['split']}: {err}") from None
    if info.get("limit"):
        sources, references = sources[:info["limit"]], references[:info["limit"]]
    hyps = _read_predictions(predictions)
    if len(hyps) != len(references):
        raise ConfigError(f"{predictions} has {len(hyps)} lines but the {info['task']} {info['split']} split has "
                          f"{len(references)} references ({td.text_root}): they must pair line by line")
    pass_sources = get_task(info["task"]).family == "qg"
    return evaluate_task_detailed(info["task"], hyps, references, sources if pass_sources else None), hyps


def evaluate_one(info: dict[str, Any], predictions: Path, cfg, *, use_mlflow: bool = True, uri: str = "",
                 experiment: str = "", extra_artifacts: Sequence[Path] = ()) -> dict[str, Any]:
    """Score, print and record one evaluation; returns {"scores", "notes", "run_id", "figures"}."""
    evaluation, _ = score(info, predictions, cfg)
    meta, figures = info.get("meta", {}), info.get("figures", {})
    line = ", ".join(f"{k} {'unavailable' if v is None else f'{v:.2f}'}" for k, v in evaluation.scores.items())
    print(f"[evaluate] {info['task']} {info['difficulty']} {info['split']} {info['mode']}: {line}", flush=True)
    for k, note in evaluation.notes.items():
        print(f"[evaluate]   {k}: {note}", flush=True)
    run_id = None
    if use_mlflow:
        uri = tracking.resolve_uri(uri or meta.get("tracking_uri") or cfg.tracking.uri)
        experiment = experiment or meta.get("experiment") or cfg.tracking.experiment
        finetune_run = meta.get("finetune_run_id")
        tags = {"kind": "evaluation", "task": info["task"], "difficulty": info["difficulty"], "split": info["split"],
                "objective": meta.get("objective", "unknown"), "decoding_mode": info["mode"],
                "finetune_run_id": finetune_run or "none", "pretrain_run_id": meta.get("pretrain_run_id", "none"),
                "pretrain_checkpoint": meta.get("pretrain_checkpoint", "unknown"),
                "pretrain_step": meta.get("pretrain_step", "unknown"), "predictions": info["predictions"],
                **{k: meta[k] for k in TARGET_TAGS if k in meta}}  # gold or distilled training targets
        if tracking.run_exists(uri, finetune_run):
            tags["mlflow.parentRunId"] = finetune_run
        for k, note in evaluation.notes.items():
            tags[f"note.{k}"] = note[:5000]
        metrics = {k: v for k, v in evaluation.scores.items() if v is not None}
        metrics.update({k: float(figures[k]) for k in LATENCY_FIGURES if k in figures})
        params = {"decode": info.get("options", {}), "model": info.get("model", ""), "limit": info.get("limit", 0)}
        with tempfile.TemporaryDirectory() as tmp:
            scores_file = Path(tmp) / "scores.json"
            scores_file.write_text(json.dumps({"scores": evaluation.scores, "notes": evaluation.notes,
                                               "figures": figures}, indent=1))
            config_file = Path(tmp) / "finetune.yaml"
            config_file.write_text(core.to_yaml(cfg))
            artifacts = [(predictions, "predictions"), (scores_file, None), (config_file, "config"),
                         *[(Path(p), None) for p in extra_artifacts]]
            run_name = f"eval {info['task']}-{info['difficulty']} {meta.get('objective', '?')} {info['mode']}"
            run_id = tracking.log_run(uri, experiment, run_name, tags, params, metrics, artifacts)
        print(f"[evaluate]   MLflow run {run_id} in experiment {experiment!r} at {uri}", flush=True)
    return {"scores": evaluation.scores, "notes": evaluation.notes, "run_id": run_id, "figures": figures,
            "task": info["task"], "difficulty": info["difficulty"], "uri": uri, "experiment": experiment}


def evaluate_generation(folder: str | Path, **kwargs) -> dict[str, Any]:
    """Evaluate what `generate` wrote into `folder`."""
    folder = Path(folder)
    info_path = folder / GENERATION_FILE if folder.is_dir() else folder
    if not info_path.is_file():
        raise ConfigError(f"{info_path}: not found; pass the folder `python -m finetune generate` wrote")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{info_path}: not valid JSON ({err})") from None
    cfg = from_dict(info["meta"]["config"])
    return evaluate_one(info, info_path.parent / info["predictions"], cfg, extra_artifacts=[info_path], **kwargs)


def evaluate_file(predictions: str | Path, config_path: str, split: str, overrides: Sequence[str] = (),
                  **kwargs) -> dict[str, Any]:
    """Evaluate any predictions file (e.g. a GLGE submission) for the task of a finetune config."""
    cfg = load(config_path, overrides)
    validate_task(cfg)
    info = {"task": cfg.task.name, "difficulty": cfg.task.difficulty, "split": split, "mode": "external",
            "predictions": Path(predictions).name, "limit": 0,
            "meta": {"objective": "external", "experiment": cfg.tracking.experiment, "tracking_uri": cfg.tracking.uri}}
    return evaluate_one(info, Path(predictions), cfg, **kwargs)


def evaluate_submission(folder: Path, difficulty: str, split: str, overrides: Sequence[str] = (),
                        **kwargs) -> list[dict[str, Any]]:
    """Every GLGE task's `{task}.{difficulty}.{split}` file in `folder`, with configs/finetune/<task>.yaml."""
    if not folder.is_dir():
        raise ConfigError(f"--submission {folder}: not a folder")
    found = [(t, folder / predictions_name(t, difficulty, split)) for t in GLGE_TASKS]
    found = [(t, p) for t, p in found if p.is_file()]
    if not found:
        raise ConfigError(f"--submission {folder}: no {predictions_name('<task>', difficulty, split)} file for any "
                          f"GLGE task ({', '.join(GLGE_TASKS)})")
    return [evaluate_file(path, str(CONFIGS_DIR / "finetune" / f"{task}.yaml"), split,
                          [f"task.difficulty={difficulty}", *overrides], **kwargs) for task, path in found]


def glge_summary(results: list[dict[str, Any]], use_mlflow: bool) -> float | None:
    """The GLGE score over the GLGE tasks evaluated together (one result per task; the last one counts)."""
    per_task = {r["task"]: r["scores"] for r in results if get_task(r["task"]).glge}
    if len(per_task) < 2:
        return None
    score_value = glge_score(per_task)
    missing = [t for t in GLGE_TASKS if t not in per_task]
    print(f"[evaluate] GLGE score over {len(per_task)}/8 tasks: {score_value:.2f}"
          + (f" (missing: {', '.join(missing)})" if missing else ""), flush=True)
    if use_mlflow:
        first = results[0]
        tracking.log_run(first["uri"], first["experiment"], "GLGE score",
                         {"kind": "glge_summary", "difficulty": first["difficulty"],
                          "glge_tasks": ",".join(sorted(per_task)), "glge_complete": str(not missing).lower()},
                         {"evaluation_runs": ",".join(str(r["run_id"]) for r in results)},
                         {"glge_score": score_value,
                          **{f"{t}/task_score": s["task_score"] for t, s in per_task.items()}},
                         [])
    return score_value


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generation", nargs="*", default=[], help="folders written by `python -m finetune generate`")
    parser.add_argument("--predictions", default=None, help="a predictions file (with --config and --split)")
    parser.add_argument("--config", default=None, help="finetune config naming the task (with --predictions)")
    parser.add_argument("--submission", default=None, help="a folder of GLGE submission files {task}.{difficulty}.test")
    parser.add_argument("--difficulty", default="easy", help="with --submission: the GLGE version of the files")
    parser.add_argument("--split", default="test", help="with --predictions / --submission: the split predicted")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: the one the model was trained with)")
    parser.add_argument("--experiment", default="", help="MLflow experiment (default: the model's)")
    parser.add_argument("--no-mlflow", action="store_true", help="only print the scores")
    parser.add_argument("overrides", nargs="*", help="key=value on the finetune config (with --predictions)")
    args = parser.parse_args(list(argv))
    kwargs = {"use_mlflow": not args.no_mlflow, "uri": args.tracking_uri, "experiment": args.experiment}
    try:
        if args.predictions:
            if not args.config:
                raise ConfigError("--predictions needs --config configs/finetune/<task>.yaml (which task, which data)")
            results = [evaluate_file(args.predictions, args.config, args.split, args.overrides, **kwargs)]
        elif args.submission:
            results = evaluate_submission(Path(args.submission), args.difficulty, args.split, args.overrides, **kwargs)
        elif args.generation:
            results = [evaluate_generation(folder, **kwargs) for folder in args.generation]
        else:
            raise ConfigError("nothing to evaluate: pass --generation DIR [...], --predictions FILE --config ... or "
                              "--submission DIR")
        glge_summary(results, not args.no_mlflow)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
