"""python -m finetune export --model <run output or checkpoint> --out <folder> [--tokenizer DIR] [--config C] [k=v ...]

Writes a Hugging Face folder that AutoModelForSeq2SeqLM and AutoTokenizer load offline (pretrain.core.
write_hf_export: BART/mBART weights, the tokenizer, generation_config.json with the decoding settings, README.md
saying what Hugging Face reproduces). Finetuning and pretraining write <output_dir>/hf at the end of a run already;
this command writes one for any output or checkpoint.

--model takes
  * a finetuning output folder (or its final_model.pt): the task's decoding settings (decode section over the task's
    official ones) and the tokenizer come from its finetune_meta.json;
  * a pretraining output folder, a DeepSpeed checkpoint folder or step_* tag, or a final_model.pt: the tokenizer is
    the one the run's config.resolved.yaml names (or --tokenizer), checked against the checksum the weights record;
    generation_config.json holds the default AR beam settings, or a finetune config's with --config.
A model whose AR decoding runs through BANG's predicting stream (decode.ar_logits=bang_ar: the default of the janus
and bang_mixed objectives, and of `ar` with objective.ar.stream=bang_ar) is exported with a warning: Hugging Face
BART runs the main stream only, so its outputs differ from Tandem's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from configs import ConfigError
from data_pipeline.config import REPO_ROOT, load_config
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import load_tokenizer
from finetune.config import from_dict, load
from finetune.init_checkpoint import FINETUNED, check_tokenizer, read_init
from finetune.resolve import decoding_options, load_data_config, resolve_task_data
from model.config import ModelConfig
from pretrain import core

RUN_CONFIG = "config.resolved.yaml"  # the engine writes it into every run's output folder


def run_tokenizer_dir(weights_path: Path) -> Path:
    """The tokenizer of the run that wrote `weights_path`: its output folder's config.resolved.yaml names the data
    config (data.config + data.overrides) whose tokenizer it trained with."""
    from omegaconf import OmegaConf

    for folder in [weights_path, *weights_path.parents][:4]:  # final_model.pt, checkpoints/step_*/ lie below it
        resolved = folder / RUN_CONFIG
        if resolved.is_file():
            data = OmegaConf.to_container(OmegaConf.load(resolved)).get("data", {})
            config = Path(data.get("config", ""))
            config = config if config.is_absolute() or config.is_file() else REPO_ROOT / config
            return load_config(config, list(data.get("overrides") or [])).tokenizer_dir()
    raise ConfigError(f"--model {weights_path}: no {RUN_CONFIG} in the run folder to find its tokenizer; pass "
                      "--tokenizer <tokenizer folder>")


def full_weights(weights: core.InitWeights, model_cfg: ModelConfig) -> dict:
    """One full (TP=1) state dict: an export's as it is; a checkpoint's tensor-parallel shards merged by loading them
    into a model in this process."""
    if weights.writer_tp == 1:
        return weights.shards[0]
    from model import parallel
    from model.seq2seq import Seq2SeqModel
    from model.sharding import full_state_dict

    parallel.ensure_initialized()
    model = Seq2SeqModel(model_cfg)
    core.load_into(model, weights)
    return full_state_dict(model)


def export(model_path: str, out: str, *, tokenizer_path: str | None = None, config_path: str | None = None,
           overrides: Sequence[str] = ()) -> Path:
    """Write the Hugging Face folder for `model_path` into `out`; ConfigError names what is wrong."""
    from model.generation.options import DecodeOptions

    try:
        weights = read_init(model_path)
    except core.InitError as err:
        raise ConfigError(f"--model: {err}") from None
    finetuned = weights.meta.get("format") == FINETUNED
    cfg = None  # the finetune config whose task and decoding settings apply
    if config_path:
        cfg = load(config_path, overrides)
    elif finetuned:
        cfg = from_dict(weights.meta["config"], overrides)
    if not weights.meta.get("model_config"):
        raise ConfigError(f"--model {model_path}: records no model config (a plain state dict): export the run's "
                          f"final_model.pt or checkpoint folder instead")
    model_cfg = ModelConfig(**weights.meta["model_config"])
    if tokenizer_path:
        tokenizer_dir = Path(tokenizer_path)
    elif cfg is not None:
        tokenizer_dir = resolve_task_data(cfg, load_data_config(cfg)).tokenizer
    else:
        tokenizer_dir = run_tokenizer_dir(Path(weights.path).resolve())
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        check_tokenizer(weights, tokenizer.checksum, f"the tokenizer {tokenizer.path}")
    except DataError as err:
        raise ConfigError(f"--tokenizer: {err}") from None
    except core.InitError as err:
        raise ConfigError(f"--model: {err}") from None
    meta = weights.meta
    source = {"source": str(weights.path), "job": "finetune" if finetuned else meta.get("job", "pretrain"),
              "step": meta.get("step"), "mlflow_run_id": meta.get("finetune_run_id") or meta.get("mlflow_run_id")}
    mode, options = "ar_beam", DecodeOptions()
    if cfg is not None:
        cfg.parallel.tensor_parallel = 1
        mode, options = decoding_options(cfg, model_cfg)
        source.update(task=cfg.task.name, difficulty=cfg.task.difficulty, objective=cfg.objective.name)
    try:
        folder = core.write_hf_export(full_weights(weights, model_cfg), model_cfg, tokenizer, out, options=options,
                                      mode=mode, source=source)
    except ValueError as err:  # e.g. a layer_norm_eps Hugging Face BART cannot hold
        raise ConfigError(f"--model {model_path}: {err}") from None
    print(f"[export] {model_path} -> {folder} (Hugging Face {'BART' if model_cfg.norm == 'post' else 'mBART'}, "
          f"{tokenizer.kind} tokenizer, generation settings of {mode})", flush=True)
    return folder


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="finetuning or pretraining output folder, checkpoint folder "
                                                        "or final_model.pt")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run's)")
    parser.add_argument("--config", default=None, help="finetune config whose decoding settings to export")
    parser.add_argument("overrides", nargs="*", help="key=value on the finetune config, e.g. decode.beam_size=5")
    args = parser.parse_args(list(argv))
    try:
        export(args.model, args.out, tokenizer_path=args.tokenizer, config_path=args.config, overrides=args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
