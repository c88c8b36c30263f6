"""What `make demo` shows when its steps are done: the finetuned model's scores and speed per decoding mode, read
back from the demo's MLflow store (the evaluation runs `python -m finetune evaluate` logged), and the first few
validation examples side by side — source, reference and every mode's output — so that a person sees what the
numbers stand for.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

# How the demo names its decoding modes on screen (labels of launch.demo's generate steps too).
MODE_LABELS = {"ar_beam": "AR beam search", "ar_greedy": "AR greedy", "nar": "NAR, one pass",
               "semi_nar": "semi-NAR, blocks", "mask_predict": "mask-predict", "early_exit": "NAR, early exit"}
SHORT = {"ar_beam": "AR beam", "ar_greedy": "AR greedy", "nar": "NAR", "semi_nar": "semi-NAR",
         "mask_predict": "mask-pred", "early_exit": "early exit"}
WIDTH = 110


def scores_table(uri: str, experiment: str, task: str, modes: Sequence[str]) -> list[str]:
    """Per mode: ROUGE-1/2/L, ms per example and the speedup over AR beam, from the evaluation runs."""
    from finetune.compare import find_runs, table_rows

    rows = {row["mode"]: row for row in table_rows(find_runs(uri, experiment, "evaluation", task))}
    missing = [m for m in modes if m not in rows]
    if missing:
        raise RuntimeError(f"no evaluation run for mode(s) {missing} in experiment {experiment!r} at {uri}")
    label_width = max(len(MODE_LABELS[m]) for m in modes)
    lines = [f"  {'mode':<{label_width}}  ROUGE-1  ROUGE-2  ROUGE-L  ms/example  speedup"]
    for mode in modes:
        row, m = rows[mode], rows[mode]["metrics"]
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        lines.append(f"  {MODE_LABELS[mode]:<{label_width}}  {m['rouge1']:7.2f}  {m['rouge2']:7.2f}  "
                     f"{m['rougeL']:7.2f}  {row['ms_per_sample']:10.1f}  {speedup:>7}")
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


def read_outputs(folders: dict[str, Path]) -> dict[str, list[str]]:
    """Each mode's predictions (one line per example) from the folders `finetune generate` wrote."""
    import json

    from finetune.generate import GENERATION_FILE

    outputs = {}
    for mode, folder in folders.items():
        info = json.loads((folder / GENERATION_FILE).read_text())
        outputs[mode] = (folder / info["predictions"]).read_text(encoding="utf-8").split("\n")[:info["examples"]]
    return outputs


def validation_text(finetune_config: str, data_overrides: Sequence[str], split: str) -> tuple[list[str], list[str]]:
    """Sources and references of the task's split, found as finetuning finds them (its config + data overrides)."""
    from finetune.config import load
    from finetune.data import read_split
    from finetune.resolve import load_data_config, resolve_task_data

    cfg = load(finetune_config, [f"data.overrides=[{','.join(repr(o) for o in data_overrides)}]"])
    return read_split(resolve_task_data(cfg, load_data_config(cfg)), split)


def closing_screen(uri: str, task: str, text: tuple[Sequence[str], Sequence[str]], folders: dict[str, Path],
                   examples: int, show: int) -> list[str]:
    from finetune.config import DEFAULT_EXPERIMENT

    lines = [f"the finetuned model on the first {examples} {task} validation examples (ROUGE F1 x 100; speed: "
             "decoding on this machine, one process):", *scores_table(uri, DEFAULT_EXPERIMENT, task, list(folders)),
             "", f"the first {show} of them side by side:", ""]
    return lines + side_by_side(*text, read_outputs(folders), show)
