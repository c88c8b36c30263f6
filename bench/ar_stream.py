"""Which stream should AR finetuning train and decode by default: BANG's predicting stream (`bang_ar`) or the plain
main stream (`ar`, BART-style, what a Hugging Face export reproduces)? Measured on Gigaword with the tiny model.

One pretraining run (BANG + ELMER mix, configs/pretrain/tiny.yaml, `--pretrain-steps`) on the tests' shards
(WikiText-2 + Gigaword training sources, 1000-piece sentencepiece model; tests/finetune_helpers.py builds them), then
two finetuning runs from it that differ only in objective.ar.stream (same seed, data order, steps and settings; they
run side by side, one process each), each decoded with ar_beam (Gigaword's official settings: beam 4, no-repeat
3-gram) on the first `--examples` validation pairs, each scored with the task's ROUGE. Pass `--init` to reuse a
pretraining output instead of training one; `--init scratch` compares the streams from random weights.

    python bench/ar_stream.py                                 # pretrain 300 steps, finetune 1000 steps each
    python bench/ar_stream.py --init runs/bench/ar_stream/pretrain --finetune-steps 2000
Last lines: rouge1 / rouge2 / rougeL per stream, then rouge1_ar_minus_bang_ar=<difference> with its paired
bootstrap 95% interval (per-example ROUGE-1, 2000 resamples).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from finetune_helpers import ENV, GIGAWORD, as_list_override, build_test_data  # noqa: E402

STREAMS = ("ar", "bang_ar")


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, *args], cwd=REPO_ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"{' '.join(args[:3])} failed ({code}); see {log}")


def finetune_args(data: list[str], init: str, stream: str, out: Path, steps: int) -> list[str]:
    return ["-m", "finetune", "--config", GIGAWORD, "--init", init, as_list_override("data.overrides", data),
            "objective.name=ar", f"objective.ar.stream={stream}", "task.epochs=0", f"train.steps={steps}",
            "train.log_every=50", "optim.lr=1e-3", "optim.clip_grad=1.0", "schedule.decay=constant",
            f"schedule.warmup_steps={min(100, steps // 5)}", "data.max_source_len=64", "eval.every_steps=0",
            "eval.batches=4",
            "valid_generation.samples=0", "checkpoint.save_at_end=false", "deepspeed.precision=fp32",
            "tracking.mlflow=false", f"output_dir={out}"]


def per_example_rouge1(hyps: list[str], refs: list[str]) -> list[float]:
    from finetune.metrics import evaluate_task_detailed

    return [evaluate_task_detailed("gigaword", [h], [r]).scores["rouge1"] for h, r in zip(hyps, refs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/ar_stream")
    parser.add_argument("--init", default="", help="a pretraining output (default: pretrain one) or `scratch`")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()
    out = (REPO_ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = build_test_data((REPO_ROOT.parent / "shared" / "data").resolve())
    init = args.init
    if not init:
        init = str(out / "pretrain")
        run(["-m", "pretrain", "--config", "configs/pretrain/tiny.yaml", f"output_dir={init}",
             as_list_override("data.overrides", data), "data.eval_overrides=[]", f"train.steps={args.pretrain_steps}",
             f"schedule.warmup_steps={min(30, args.pretrain_steps // 5)}", "eval.batches=0",
             "checkpoint.every_steps=0", "tracking.mlflow=false"], out / "pretrain.log")
    procs = {}
    for stream in STREAMS:
        log = open(out / f"ft-{stream}.log", "w")
        procs[stream] = subprocess.Popen([sys.executable, *finetune_args(data, init, stream, out / f"ft-{stream}",
                                                                          args.finetune_steps)],
                                         cwd=REPO_ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    for stream, proc in procs.items():
        if proc.wait():
            sys.exit(f"finetuning with stream {stream} failed; see {out / f'ft-{stream}.log'}")
    scores, per_example = {}, {}
    refs = (REPO_ROOT.parent / "shared/data/glge/gigaword/valid.tgt").read_text().splitlines()[:args.examples]
    for stream in STREAMS:
        gen = out / f"ft-{stream}" / "gen"
        run(["-m", "finetune", "generate", "--model", str(out / f"ft-{stream}"), "--split", "valid", "--mode",
             "ar_beam", "--limit", str(args.examples), "--batch-size", "50", "--out", str(gen)],
            out / f"gen-{stream}.log")
        info = json.loads((gen / "generation.json").read_text())
        hyps = (gen / info["predictions"]).read_text().splitlines()
        from finetune.metrics import evaluate_task_detailed

        scores[stream] = evaluate_task_detailed("gigaword", hyps, refs).scores
        per_example[stream] = per_example_rouge1(hyps, refs)
        print(f"{stream}: " + " ".join(f"{k}={v:.2f}" for k, v in scores[stream].items() if v is not None), flush=True)
    diffs = [a - b for a, b in zip(per_example["ar"], per_example["bang_ar"])]
    rng = random.Random(0)
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(2000))
    mean = sum(diffs) / len(diffs)
    print(f"rouge1_ar_minus_bang_ar={mean:.2f} (paired bootstrap 95% [{boots[49]:.2f}, {boots[1949]:.2f}], "
          f"{len(diffs)} examples)", flush=True)


if __name__ == "__main__":
    main()
