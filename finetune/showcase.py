"""`python -m finetune showcase --generation DIR [DIR ...] [--show N]`: what a person would rather look at than read
after decoding (the closing screen of `make demo`). Per decoding mode, the scores and speed that `python -m finetune
evaluate` logged to MLflow for those folders' task; then the first N examples side by side: source, reference and
every mode's output, so that the numbers can be seen for what they stand for. For scale, the table ends with the
lead baseline of ROUGE-scored tasks: each source's first LEAD_WORDS words, copied, scored the same way (a headline
is mostly its source's opening; a model below this line has not learned more than copying). The task's text is found
as the generating run found it (the finetune config recorded in each folder's generation.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from configs import ConfigError
from finetune.compare import find_runs, table_rows
from finetune.config import DEFAULT_EXPERIMENT, from_dict
from finetune.data import read_split
from finetune.generate import GENERATION_FILE
from finetune.glge_tasks import ROUGE, get_task
from finetune.metrics import evaluate_task
from finetune.resolve import load_data_config, resolve_task_data
from finetune.tracking import resolve_uri

# How the screen names the decoding modes: in the scores table, and (short) in front of each output.
MODE_LABELS = {"ar_beam": "AR beam search", "ar_greedy": "AR greedy", "nar": "NAR, one pass",
               "semi_nar": "semi-NAR, blocks", "mask_predict": "mask-predict", "early_exit": "NAR, early exit"}
SHORT = {"ar_beam": "AR beam", "ar_greedy": "AR greedy", "nar": "NAR", "semi_nar": "semi-NAR",
         "mask_predict": "mask-pred", "early_exit": "early exit"}
WIDTH = 110
LEAD_WORDS = 8
LEAD_LABEL = f"lead-{LEAD_WORDS} (copied)"


def lead_scores(task: str, sources: Sequence[str], references: Sequence[str]) -> dict[str, float | None] | None:
    """The task's metrics for each source's first LEAD_WORDS words as its output; None where the task is not scored
    by ROUGE-1/2/L (the table's columns)."""
    if get_task(task).metrics != ROUGE:
        return None
    return evaluate_task(task, [" ".join(s.split()[:LEAD_WORDS]) for s in sources], references)


def scores_table(uri: str, experiment: str, task: str, modes: Sequence[str],
                 lead: dict[str, float | None] | None = None) -> list[str]:
    """Per mode: ROUGE-1/2/L, ms per example and the speedup over AR beam, from the evaluation runs; then the lead
    baseline's ROUGE (`lead`: lead_scores) where given."""
    rows = {row["mode"]: row for row in table_rows(find_runs(uri, experiment, "evaluation", task))}
    missing = [m for m in modes if m not in rows]
    if missing:
        raise ConfigError(f"no evaluation run for mode(s) {missing} in experiment {experiment!r} at {uri}: run "
                          "`python -m finetune evaluate --generation ...` first")
    labels = [MODE_LABELS[m] for m in modes] + ([LEAD_LABEL] if lead is not None else [])
    label_width = max(map(len, labels))
    lines = [f"  {'mode':<{label_width}}  ROUGE-1  ROUGE-2  ROUGE-L  ms/example  speedup"]
    for mode in modes:
        row, m = rows[mode], rows[mode]["metrics"]
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        lines.append(f"  {MODE_LABELS[mode]:<{label_width}}  {m['rouge1']:7.2f}  {m['rouge2']:7.2f}  "
                     f"{m['rougeL']:7.2f}  {row['ms_per_sample']:10.1f}  {speedup:>7}")
    if lead is not None:
        lines.append(f"  {LEAD_LABEL:<{label_width}}  {lead['rouge1']:7.2f}  {lead['rouge2']:7.2f}  "
                     f"{lead['rougeL']:7.2f}  {'-':>10}  {'-':>7}")
    return lines


def side_by_side(sources: Sequence[str], references: Sequence[str], outputs: dict[str, Sequence[str]],
                 count: int) -> list[str]:
    """The first `count` examples: source, reference, then each mode's output, wrapped under one another."""
    labels = {"source": "source", "reference": "reference", **{m: SHORT[m] for m in outputs}}
    width = max(map(len, labels.values()))
    lines = []
    for i in range(min(count, len(sources))):
        texts = {"source": sources[i], "reference": references[i], **{m: out[i] for m, out in outputs.items()}}
        for key, text in texts.items():
            head = f"  {f'#{i + 1}' if key == 'source' else '':<3} {labels[key]:<{width}}  "
            wrapped = textwrap.wrap(text or "(empty)", WIDTH - len(head)) or [""]
            lines.append(head + wrapped[0])
            lines += [" " * len(head) + more for more in wrapped[1:]]
        lines.append("")
    return lines


def read_generation(folder: Path) -> dict[str, Any]:
    info_path = folder / GENERATION_FILE
    if not info_path.is_file():
        raise ConfigError(f"--generation {folder}: no {GENERATION_FILE}; pass a folder `python -m finetune generate` "
                          "wrote")
    info = json.loads(info_path.read_text())
    info["outputs"] = (folder / info["predictions"]).read_text(encoding="utf-8").split("\n")[:info["examples"]]
    return info


def screen(folders: Sequence[Path], show: int, uri: str, experiment: str) -> list[str]:
    infos = {}
    for folder in folders:
        info = read_generation(folder)
        if info["mode"] in infos:
            raise ConfigError(f"--generation: two folders decoded in mode {info['mode']!r}")
        infos[info["mode"]] = info
    first = next(iter(infos.values()))
    for key in ("task", "difficulty", "split", "examples"):
        if any(info[key] != first[key] for info in infos.values()):
            raise ConfigError(f"--generation: the folders differ in {key} ({[i[key] for i in infos.values()]})")
    cfg = from_dict(first["meta"]["config"])
    sources, references = read_split(resolve_task_data(cfg, load_data_config(cfg)), first["split"])
    task, examples = first["task"], first["examples"]
    lead = lead_scores(task, sources[:examples], references[:examples])
    lines = [f"the finetuned model on the first {examples} {task} {first['split']} examples (ROUGE F1 x 100; speed: "
             "decoding on this machine, one process):", *scores_table(uri, experiment, task, list(infos), lead),
             "", f"the first {min(show, examples)} of them side by side:", ""]
    return lines + side_by_side(sources, references, {m: i["outputs"] for m, i in infos.items()}, show)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune showcase", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generation", nargs="+", required=True, help="folders written by `python -m finetune "
                                                                       "generate`, one per mode, in the order shown")
    parser.add_argument("--show", type=int, default=3, help="examples shown side by side (default: %(default)s)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI, else the "
                                                           "project's)")
    args = parser.parse_args(list(argv))
    try:
        lines = screen([Path(f) for f in args.generation], args.show, resolve_uri(args.tracking_uri),
                       args.experiment)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines), flush=True)
    return 0
