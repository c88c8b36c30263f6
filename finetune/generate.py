"""python -m finetune generate --model <finetuned model> [--mode M] [--split test] [--out DIR] [key=value ...]

Decode one split of the task in any mode and write the predictions one per line, detokenized, named as GLGE
submissions expect (`{task}.{difficulty}.test` for the test split; `{task}.{difficulty}.{split}` otherwise;
IWSLT14: `iwslt14.{split}`), plus generation.json: the decoding options, latency (ms/sample, samples/s, at the
batch size used), mean output length, for early exit the mean exit layer, and the model's metadata (task, objective,
MLflow runs) that `evaluate` needs.

--model takes what `python -m finetune` wrote (its output_dir: final_model.pt + finetune_meta.json). To decode a
model that was not finetuned (a pretraining checkpoint, a plain state dict), also pass --config
configs/finetune/<task>.yaml: the task, data and model shape come from there. key=value overrides apply to the
finetune config (decode.beam_size=5, decode.block_size=2, task.difficulty=hard, data.overrides=[...] for data moved
elsewhere, ...).

Decoding runs in one process at tensor-parallel size 1, whatever the training used: final_model.pt holds the full
weights (the engine merges TP shards and gathers ZeRO-3 partitions when it exports), and a DeepSpeed checkpoint
written at TP=N is merged on load. tests/test_finetune_distributed.py checks that a TP=2 finetune decodes exactly
as the TP=1 run of the same job. Decoding a model too large for one device is not supported. The model decodes on
the GPU when there is one (cuda:0), else on the CPU.

`--check --config C --split S` only checks that split S of the config's task can be read (the per-task scripts run
it before training, so a missing test split fails in seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from configs import ConfigError
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import load_tokenizer
from finetune.config import FinetuneConfig, from_dict, load
from finetune.data import read_split
from finetune.glge_tasks import get_task, submission_filename
from finetune.init_checkpoint import (FINETUNED, check_tokenizer, pretrain_run_id, pretrain_step, read_init,
                                      tokenizer_copy)
from finetune.resolve import build_model_config, decoding_options, load_data_config, resolve_task_data, validate_task
from model.config import ModelConfig
from pretrain import core

GENERATION_FILE = "generation.json"


def predictions_name(task: str, difficulty: str, split: str) -> str:
    if not get_task(task).glge:
        return f"{task}.{split}"
    if split == "test":
        return submission_filename(task, difficulty)
    return f"{task}.{difficulty}.{split}"


def load_for_decoding(model_path: str, config_path: str | None, overrides: Sequence[str]):
    """(model in eval mode, FinetuneConfig, metadata, tokenizer, TaskData); ConfigError on anything wrong."""
    from model import parallel  # megatron-core: imported when a model is built
    from model.seq2seq import Seq2SeqModel

    try:
        weights = read_init(model_path)
    except core.InitError as err:
        raise ConfigError(f"--model: {err}") from None
    finetuned = weights.meta.get("format") == FINETUNED
    if config_path:
        cfg = load(config_path, overrides)
    elif finetuned:
        cfg = from_dict(weights.meta["config"], overrides)
    else:
        raise ConfigError(f"--model {model_path}: not a finetuned model (no finetune_meta.json from `python -m "
                          "finetune`): pass --config configs/finetune/<task>.yaml so the task, data and model shape "
                          "are known")
    cfg.parallel.tensor_parallel = 1  # decoding runs in one process
    validate_task(cfg)
    data_cfg = load_data_config(cfg)
    td = resolve_task_data(cfg, data_cfg)
    carried = tokenizer_copy(weights)  # a finetuned model's own copy: the run folder may have moved
    try:
        tokenizer = load_tokenizer(carried or td.tokenizer)
    except DataError as err:
        raise ConfigError(f"{'--model' if carried else 'data.config'}: {err}") from None
    try:  # finetuned and pretraining exports record their tokenizer; plain state dicts cannot be checked
        check_tokenizer(weights, tokenizer.checksum, str(tokenizer.path))
    except core.InitError as err:
        raise ConfigError(f"--model: {err}") from None
    if finetuned:
        model_cfg = ModelConfig(**weights.meta["model_config"])
    else:
        model_cfg = build_model_config(cfg, tokenizer.padded_vocab_size)
        try:
            core.check_dims(weights, model_cfg, f"{cfg.config_file} (model.preset={cfg.model.preset})")
        except core.InitError as err:
            raise ConfigError(f"--model: {err}") from None
    parallel.ensure_initialized()
    model = Seq2SeqModel(model_cfg)
    try:
        core.load_into(model, weights)
    except core.InitError as err:
        raise ConfigError(f"--model: {err}") from None
    model.to(decoding_device()).eval()
    if finetuned:
        meta = {k: v for k, v in weights.meta.items() if k not in ("model_config",)}
    else:  # a model that was not finetuned (the starting point of a finetuning run)
        meta = {"task": cfg.task.name, "difficulty": cfg.task.difficulty, "objective": "none",
                "finetune_run_id": None, "pretrain_run_id": pretrain_run_id(weights),
                "pretrain_checkpoint": str(weights.path), "pretrain_step": pretrain_step(weights),
                "tokenizer": str(td.tokenizer), "tokenizer_checksum": tokenizer.checksum,
                "experiment": cfg.tracking.experiment, "tracking_uri": cfg.tracking.uri}
    meta["config"] = core.to_dict(cfg)
    meta["task"], meta["difficulty"] = cfg.task.name, cfg.task.difficulty
    return model, cfg, meta, tokenizer, td


def decoding_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_out_dir(model_path: str, cfg: FinetuneConfig, meta: dict, split: str, mode: str) -> Path:
    path = Path(model_path)
    if meta.get("format") == "finetuned":
        base = path.parent if path.is_file() else path
    else:
        base = Path(cfg.output_dir or f"runs/finetune/{cfg.task.name}-{cfg.task.difficulty}-pretrained")
    return base / "generate" / f"{split}-{mode}"


def run_generate(model_path: str, *, config_path: str | None = None, overrides: Sequence[str] = (),
                 mode: str | None = None, split: str = "test", out_dir: str | None = None, limit: int = 0,
                 batch_size: int | None = None) -> Path:
    """Decode a split; returns the folder holding the predictions and generation.json."""
    from finetune import decoding  # model.generation brings megatron-core: `evaluate` imports this module too

    overrides = list(overrides) + ([f"decode.mode={mode}"] if mode else []) + \
        ([f"decode.batch_size={batch_size}"] if batch_size else [])
    model, cfg, meta, tokenizer, td = load_for_decoding(model_path, config_path, overrides)
    mode, options = decoding_options(cfg, model.cfg)
    try:
        sources, references = read_split(td, split)
    except DataError as err:
        raise ConfigError(f"--split {split}: {err}") from None
    if limit > 0:
        sources, references = sources[:limit], references[:limit]
    max_source_len = cfg.data.max_source_len or model.cfg.max_source_positions
    ids = decoding.encode_sources(tokenizer, sources, max_source_len)
    result = decoding.generate(model, tokenizer, ids, mode, options, cfg.decode.batch_size)

    out = Path(out_dir) if out_dir else default_out_dir(model_path, cfg, meta, split, mode)
    out.mkdir(parents=True, exist_ok=True)
    name = predictions_name(cfg.task.name, cfg.task.difficulty, split)
    (out / name).write_text("".join(h + "\n" for h in result.hypotheses), encoding="utf-8")
    info = {"task": cfg.task.name, "difficulty": cfg.task.difficulty, "split": split, "mode": mode,
            "options": asdict(options), "figures": result.figures, "predictions": name, "examples": len(sources),
            "limit": limit, "model": str(model_path), "meta": meta}
    (out / GENERATION_FILE).write_text(json.dumps(info, indent=1, default=str))
    f = result.figures
    exit_note = f", mean exit layer {f['mean_exit_layer']:.2f}" if "mean_exit_layer" in f else ""
    print(f"[generate] {cfg.task.name} {split} {mode}: {len(sources)} examples -> {out / name}; "
          f"{f['ms_per_sample']:.2f} ms/sample, {f['samples_per_s']:.1f} samples/s at batch {cfg.decode.batch_size}"
          f"{exit_note}", flush=True)
    return out


def check_split(config_path: str, overrides: Sequence[str], split: str) -> int:
    """Number of examples in `split` of the config's task; ConfigError naming the split or field when it cannot be
    read. What the per-task scripts run before finetuning, so a missing test split fails in seconds, not after
    training."""
    cfg = load(config_path, overrides)
    validate_task(cfg)
    td = resolve_task_data(cfg, load_data_config(cfg))
    try:
        sources, _ = read_split(td, split)
    except DataError as err:
        raise ConfigError(f"--split {split}: {err}") from None
    if not sources:
        raise ConfigError(f"--split {split}: the {cfg.task.name} split {split!r} has no examples")
    return len(sources)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="finetune output folder (or, with --config, a pretraining "
                                                    "checkpoint); required unless --check")
    parser.add_argument("--config", default=None, help="finetune config (needed for a model that was not finetuned)")
    parser.add_argument("--mode", default=None, help="ar_beam, ar_greedy, nar, semi_nar, mask_predict, early_exit "
                                                     "(default: the run's decode.mode)")
    parser.add_argument("--split", default="test", help="train, valid (dev) or test (default: test)")
    parser.add_argument("--out", default=None, help="output folder (default: <model dir>/generate/<split>-<mode>)")
    parser.add_argument("--limit", type=int, default=0, help="decode only the first N examples (0: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per decoding batch")
    parser.add_argument("--check", action="store_true", help="only check that --split of --config's task can be "
                                                             "read (no model needed; --model is ignored)")
    parser.add_argument("overrides", nargs="*", help="key=value on the finetune config, e.g. decode.block_size=2")
    args = parser.parse_args(list(argv))
    try:
        if args.check:
            if not args.config:
                raise ConfigError("--check needs --config configs/finetune/<task>.yaml")
            n = check_split(args.config, args.overrides, args.split)
            print(f"[generate] {args.config}: split {args.split!r} has {n} examples", flush=True)
            return 0
        if not args.model:
            raise ConfigError("--model is required (the finetune output folder)")
        run_generate(args.model, config_path=args.config, overrides=args.overrides, mode=args.mode, split=args.split,
                     out_dir=args.out, limit=args.limit, batch_size=args.batch_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
