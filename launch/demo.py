"""The quickstart, one command (`make demo`): real text -> tokenizer -> shards -> pretraining of the small model
with BANG + ELMER on 2 processes (ZeRO-2, through the deepspeed launcher) -> BANG's mixed AR/NAR finetuning on GLGE
Gigaword (2 processes, same launcher) -> generation in AR (beam search), NAR (one pass) and semi-NAR (blocks) -> GLGE
metrics -> the MLflow quality-vs-speed table -> the closing screen (`python -m finetune showcase`: scores and speed
per mode, a few examples side by side). Every stage is the project's own command line, run as a subprocess;
everything is written under --out, one MLflow store included.

  python -m launch.demo [--data-root ../shared/data] [--out runs/demo] [--smoke] [--dry-run] [--settings]

--smoke (or TANDEM_DEMO_SMOKE=1) runs the same pipeline at a toy size (WikiText only, the tiny model, a few steps,
a few decoded examples) for the test suite. Both stages train in fp32: exact, and on CPU no slower than bf16 at
this size. What the full size costs and scores: BENCHMARKS.md, "Quickstart".
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CONFIG = "configs/launch/local_cpu.yaml"
DATA_CONFIG = "configs/data/tiny.yaml"
PRETRAIN_CONFIG = "configs/pretrain/tiny.yaml"
FINETUNE_CONFIG = "configs/finetune/gigaword.yaml"
TASK = "gigaword"
# Held-out text for pretraining evaluation: a book the training sources leave out, with the training tokenizer.
# What a demo run writes under --out besides the data (removed when the demo runs again).
RESULTS = ("pretrain", "finetune", "compare", "launch", "mlflow.db", "mlartifacts")
# The demo's text: the shared corpus plus the Gigaword training sources (the task's unlabelled input side; never its
# headlines or validation text), so that the tokenizer and the pretraining see the finetuning task's language.
DEMO_DATA = ("sources.books=[books/gutenberg/*.txt,glge/gigaword/train.src]", "tokenizer.vocab_size=8000")
HELDOUT = ["sources.wikipedia=[]", "sources.wikitext=[]", "sources.books=[books/tinyshakespeare/input.txt]",
           "extract.out_dir=heldout/docs", "shard.out_dir=heldout/shards"]


@dataclass(frozen=True)
class Size:
    data: tuple[str, ...]  # data config overrides (pretraining text, tokenizer, shards; finetuning reads it too)
    pretrain: tuple[str, ...]  # pretrain config overrides
    finetune: tuple[str, ...]
    decode: tuple[str, ...]  # finetune config overrides for every `generate` (decode.*)
    decode_limit: int  # validation examples decoded per mode
    modes: tuple[str, ...] = ("ar_beam", "nar", "semi_nar")  # decoding modes, in the order shown
    show: int = 3  # validation examples printed side by side at the end

    @property
    def objective(self) -> str:
        """The finetuning objective the overrides name (else the task config's default, `ar`)."""
        return setting(self.finetune, "objective.name", "ar")


# The full size: what `make demo` runs, and what README's demo table lists (tests/test_launch_demo.py checks that
# the table is settings_markdown(FULL)). Why these numbers, and what they do not reach yet: BENCHMARKS.md,
# "Quickstart at the small size". Pretraining is only the pipeline check (10 steps at a low lr): at this budget it
# made finetuning worse (100 steps at lr 2e-3: AR 2.3 against 11.3 from scratch; 20 steps at 5e-4: 10.5 against
# 12.6-13.0). Finetuning gets the budget, as BANG's mixed AR/NAR recipe, which here beat JANUS (2.2x the cost per
# step, slower AR learning) on both AR and NAR. Lead copying (finetune/lead_copy.py: 150 copy steps, then every third
# step) teaches the copying that none of the methods' objectives teaches at this size: ROUGE-1 13-15 without it.
FULL = Size(
    data=DEMO_DATA,
    pretrain=("model.preset=small", "train.steps=10", "schedule.warmup_steps=2", "optim.lr=1e-4",
              "train.log_every=5", "checkpoint.every_steps=10", "eval.every_steps=10", "eval.batches=4"),
    finetune=("objective.name=bang_mixed", "model.preset=small", "task.epochs=0", "train.steps=800",
              "data.batch_size=16", "schedule.warmup_steps=80", "schedule.decay=linear", "optim.lr=1e-3",
              "optim.betas=[0.9,0.98]", "optim.clip_grad=1.0", "train.log_every=25", "eval.every_steps=0",
              "eval.batches=8", "valid_generation.samples=0", "checkpoint.every_steps=0",
              "objective.lead_copy.warmup_steps=150", "objective.lead_copy.every=3", "objective.lead_copy.tokens=12"),
    decode=(),
    decode_limit=200,
)
SMOKE = Size(
    data=("sources.wikipedia=[]", "sources.books=[]", "shard.samples_per_shard=1000"),
    pretrain=("train.steps=6", "schedule.warmup_steps=2", "train.log_every=2", "checkpoint.every_steps=3",
              "eval.every_steps=0", "eval.batches=1"),
    finetune=("objective.name=bang_mixed", "task.epochs=0", "train.steps=4", "schedule.warmup_steps=1",
              "train.log_every=2", "optim.lr=1e-3", "eval.every_steps=0", "eval.batches=1",
              "valid_generation.samples=0", "checkpoint.every_steps=0",
              "objective.lead_copy.warmup_steps=1", "objective.lead_copy.every=2"),
    decode=("decode.max_len=16",),
    decode_limit=8,
    show=2,
)


@dataclass
class Step:
    title: str
    argv: list[str]


def quote_list(items: Sequence[str]) -> str:
    """A key=value list as omegaconf reads it on the command line: ['a=b','c=[]']."""
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def setting(overrides: Sequence[str], key: str, default: str) -> str:
    """The value a key=value list gives `key` (the last one wins, as on the command line), else `default`."""
    values = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == key]
    return values[-1] if values else default


def finetune_folder(out: Path, size: Size) -> Path:
    return out / "finetune" / f"{TASK}-{size.objective}"


def generate_folders(out: Path, size: Size) -> dict[str, Path]:
    return {mode: finetune_folder(out, size) / "generate" / f"valid-{mode}" for mode in size.modes}


def plan(out: Path, data_root: Path, data_dir: Path, size: Size, python: str = sys.executable) -> list[Step]:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    data = [f"data_root={data_root}", f"work_dir={data_dir}", *size.data]
    data_list = quote_list(data)
    launch = [python, "-m", "launch", "--config", LAUNCH_CONFIG, f"run_dir={out / 'launch'}", "--"]
    pretrain_out, finetune_out = out / "pretrain", finetune_folder(out, size)
    generate = generate_folders(out, size)
    preset = setting(size.pretrain, "model.preset", "tiny")
    steps = [
        Step("data: extract text, train the tokenizer, write shards",
             [python, "-m", "data_pipeline", "prepare", "--config", DATA_CONFIG, *data]),
        Step("data: held-out shards for pretraining evaluation",
             [python, "-m", "data_pipeline", "extract", "--config", DATA_CONFIG, *data, *HELDOUT]),
        Step("data: tokenize the held-out text",
             [python, "-m", "data_pipeline", "shard", "--config", DATA_CONFIG, *data, *HELDOUT]),
        Step(f"pretrain: {preset} model, BANG + ELMER, 2 processes (ZeRO-2) via the deepspeed launcher",
             [*launch, "pretrain", "--config", PRETRAIN_CONFIG, f"output_dir={pretrain_out}",
              f"data.overrides={data_list}", "deepspeed.precision=fp32", *size.pretrain]),
        Step(f"finetune data: GLGE {TASK} task shards",
             [python, "-m", "finetune", "data", "--config", FINETUNE_CONFIG, f"data.overrides={data_list}"]),
        Step(f"finetune: {size.objective} on {TASK}, 2 processes via the deepspeed launcher",
             [*launch, "finetune", "--config", FINETUNE_CONFIG, "--init", str(pretrain_out / "checkpoints"),
              f"output_dir={finetune_out}", f"data.overrides={data_list}",
              "deepspeed.precision=fp32", *size.finetune]),
    ]
    for mode, folder in generate.items():
        steps.append(Step(f"generate: {mode} decoding of {size.decode_limit} validation examples",
                          [python, "-m", "finetune", "generate", "--model", str(finetune_out), "--mode", mode,
                           "--split", "valid", "--limit", str(size.decode_limit), "--out", str(folder),
                           *size.decode]))
    steps += [
        Step("evaluate: GLGE metrics, one MLflow run per decoding mode",
             [python, "-m", "finetune", "evaluate", "--generation", *map(str, generate.values())]),
        Step("compare: quality against speed, from MLflow",
             [python, "-m", "finetune", "compare", "--tracking-uri", uri, "--task", TASK, "--out",
              str(out / "compare")]),
    ]
    return steps


def settings_markdown(size: Size = FULL) -> str:
    """The demo's settings as a Markdown table: README shows FULL's, and a test keeps the two equal."""
    rows = [("data", DATA_CONFIG, size.data), ("pretrain", PRETRAIN_CONFIG, size.pretrain),
            ("finetune", FINETUNE_CONFIG, size.finetune),
            ("generate", f"--limit {size.decode_limit}, modes {', '.join(size.modes)}", size.decode)]
    lines = ["| stage | config | overrides |", "| --- | --- | --- |"]
    for stage, config, overrides in rows:
        lines.append(f"| {stage} | `{config}` | {' '.join(f'`{o}`' for o in overrides) or '-'} |")
    return "\n".join(lines)


def environment(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions")),
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_root = os.environ.get("TANDEM_DATA_ROOT", str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-root", default=default_root, help="the real text (default: %(default)s)")
    parser.add_argument("--out", default="runs/demo", help="everything the demo writes (default: %(default)s)")
    parser.add_argument("--data-dir", default="", help="where the data stages write (default: <out>/data); "
                                                       "reused when up to date")
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("TANDEM_DEMO_SMOKE", "") == "1",
                        help="toy size, for the test suite")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--settings", action="store_true", help="print the settings table (README's), run nothing")
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    if args.settings:
        print(settings_markdown(size))
        return 0

    out = Path(args.out)
    out = (out if out.is_absolute() else REPO_ROOT / out).resolve()
    data_root = Path(args.data_root).expanduser().resolve()
    data_dir = Path(args.data_dir).resolve() if args.data_dir else out / "data"
    if not (data_root / "glge" / TASK).is_dir() or not (data_root / "wikitext-2").is_dir():
        print(f"error: --data-root {data_root} does not hold the expected data (wikitext-2/, glge/{TASK}/ ...); "
              "point it at the shared data folder", file=sys.stderr)
        return 2
    steps = plan(out, data_root, data_dir, size)
    if args.dry_run:
        for step in steps:
            print(f"# {step.title}\n{shlex.join(step.argv)}")
        return 0

    stale = [out / name for name in RESULTS if (out / name).exists()]
    for path in stale:  # a rerun starts its runs afresh (the data steps skip what is up to date)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if stale:
        say(f"removed the previous demo's results in {out} ({', '.join(p.name for p in stale)})")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(out)
    say(f"{'smoke-size' if args.smoke else 'full'} quickstart: {len(steps)} steps, writing to {out}")
    started = time.monotonic()
    timings = []
    for number, step in enumerate(steps, 1):
        say(f"step {number}/{len(steps)}: {step.title}")
        t0 = time.monotonic()
        code = subprocess.run(step.argv, cwd=REPO_ROOT, env=env).returncode
        timings.append((step.title, time.monotonic() - t0))
        if code != 0:
            print(f"[demo] step {number} failed ({step.title}), exit code {code}. The command, to rerun it alone "
                  f"(with MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']}):\n  {shlex.join(step.argv)}",
                  file=sys.stderr, flush=True)
            return code
        say(f"step {number} done in {timings[-1][1]:.0f}s")

    total = time.monotonic() - started
    say(f"all {len(steps)} steps done in {total / 60:.1f} min:")
    for title, seconds in timings:
        say(f"  {seconds:6.0f}s  {title}")
    say("")
    showcase = [sys.executable, "-m", "finetune", "showcase", "--show", str(size.show), "--generation",
                *map(str, generate_folders(out, size).values())]
    shown = subprocess.run(showcase, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if shown.returncode != 0:
        print(f"[demo] the closing screen failed (exit code {shown.returncode}):\n  {shlex.join(showcase)}",
              file=sys.stderr, flush=True)
        return shown.returncode
    for line in shown.stdout.splitlines():
        say(line)
    say(f"quality against speed, plotted: {out / 'compare' / 'quality_vs_speed.png'} (finetuning loss: "
        f"{out / 'compare' / 'loss_curves.png'})")
    say(f"everything else: pretraining in {out / 'pretrain'}, finetuning and generations in {out / 'finetune'}")
    say("open the MLflow UI on the results (runs of tandem-pretrain and tandem-finetune, with the comparison "
        "above), then browse http://127.0.0.1:5000 :")
    store = out / "mlflow.db"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    print(f"    {mlflow_bin if mlflow_bin.is_file() else 'mlflow'} ui --backend-store-uri sqlite:///{store} "
          "--host 127.0.0.1 --port 5000", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
