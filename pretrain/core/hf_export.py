"""The Hugging Face export of a run's weights, and its MLflow model.

`write_hf_export` turns a full (TP=1) state dict into one folder that transformers loads offline
(AutoModelForSeq2SeqLM, AutoTokenizer, with local_files_only):

    config.json, model.safetensors   BART (post-LN) or mBART (pre-LN), model/hf.py; `tandem_export` in config.json
                                     says what Hugging Face reproduces of the model's decoding
    generation_config.json           the decoding settings the run decodes with (beam, length penalty, min/max
                                     length, no-repeat n-gram, the special ids), model.hf.generation_config
    tokenizer files                  the run's tokenizer (our sentencepiece model, or the Hugging Face tokenizer a
                                     checkpoint came with), data_pipeline's save_hf
    tandem_aside.pt, README.md       weights HF has no place for (for importing back); what HF can and cannot
                                     reproduce, and how to call it

Both recipes write it beside their final weights (<output_dir>/hf, HF_EXPORT) and log it to their MLflow run as an
MLflow model (`log_hf_model`, the transformers flavor), so it is listed under the run's logged models;
`python -m finetune export` writes it for any run output or checkpoint.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

HF_EXPORT = "hf"  # <output_dir>/hf
MLFLOW_MODEL_NAME = "model"


def fidelity(mode: str, ar_logits: str) -> tuple[bool, str]:
    """(exact, what Hugging Face reproduces) for a model Tandem decodes with `mode` and `ar_logits`."""
    from model.hf import HF_AR_MODES

    if ar_logits == "bang_ar":
        return False, ("NOT reproduced: Tandem decodes this model's AR steps through BANG's predicting stream "
                       "(decode.ar_logits=bang_ar), which Hugging Face BART does not have. Hugging Face runs the main "
                       "stream, whose logits differ, so generate() gives other outputs than `python -m finetune "
                       "generate`. Finetune with objective.name=ar objective.ar.stream=ar for an exact export.")
    if mode not in HF_AR_MODES:
        return False, (f"NOT reproduced: Tandem decodes this model with {mode}, which Hugging Face generate() cannot "
                       f"run; generation_config.json describes AR beam search over the main stream instead, which "
                       f"reproduces Tandem's ar_beam (decode.ar_logits=ar) exactly.")
    return True, (f"exact: the main stream's logits, and generate() with generation_config.json gives Tandem's {mode} "
                  f"tokens, except that among hypotheses reaching the maximum length Hugging Face scores the forced "
                  f"EOS with log-probability 0 where Tandem (fairseq) uses its log-probability.")


def write_hf_export(full: dict[str, Any], model_cfg, tokenizer, out_dir: str | Path, *, options, mode: str,
                    source: dict[str, Any]) -> Path:
    """The folder described in the module docstring. `tokenizer`: the run's (data_pipeline's load_tokenizer);
    `options`: the DecodeOptions the run decodes with, in `mode`; `source`: where the weights come from (path, job,
    task, MLflow run ...), recorded in config.json and README.md. Warns when HF cannot reproduce the decoding."""
    from model.hf import generation_config, save_hf_state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exact, note = fidelity(mode, options.ar_logits)
    if not exact:
        warnings.warn(f"Hugging Face export {out}: {note}", stacklevel=2)
    notes = {"mode": mode, "ar_logits": options.ar_logits, "hf_reproduces": note, "exact": exact,
             "tokenizer": tokenizer.kind, "tokenizer_checksum": tokenizer.checksum, **source}
    save_hf_state(full, model_cfg, out, tokenizer.vocab_order, config_notes=notes)
    generation_config(options, model_cfg, mode, tokenizer.vocab_order).save_pretrained(out)
    tokenizer.save_hf(out)
    (out / "README.md").write_text(_readme(notes, model_cfg), encoding="utf-8")
    return out


def _readme(notes: dict[str, Any], model_cfg) -> str:
    kind = "BartForConditionalGeneration" if model_cfg.norm == "post" else "MBartForConditionalGeneration"
    origin = ", ".join(f"{k} {v}" for k, v in notes.items()
                       if k not in ("hf_reproduces", "exact", "tokenizer_checksum") and v not in (None, ""))
    return f"""# Tandem model, exported for Hugging Face transformers

{kind} ({model_cfg.n_encoder_layers}+{model_cfg.n_decoder_layers} layers, d_model {model_cfg.d_model}, vocabulary
{model_cfg.vocab_size}) with its tokenizer. Source: {origin}.

**What Hugging Face reproduces**: {notes["hf_reproduces"]}

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True)
batch = tokenizer(sources, add_special_tokens=False, padding=True, return_tensors="pt")
outputs = model.generate(**batch)        # generation_config.json: the run's decoding settings
texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
```

Sources are encoded without added special tokens (add_special_tokens=False), as Tandem trains: no BOS/EOS around the
source; the decoder starts from BOS (decoder_start_token_id). GLGE's "[SEP]" segment markers are Tandem's <sep> token:
encode the segments one by one and join them with the tokenizer's sep_token_id. tandem_aside.pt holds the weights
Hugging Face has no place for (BANG's slot embedding, the NAR length head): `model.hf.load_hf` imports the folder
back into Tandem with them.
"""


def log_hf_model(uri: str, run_id: str, folder: str | Path) -> str:
    """Log an export folder as the MLflow model of a run (transformers flavor, text2text-generation; the folder's
    `tandem_export` notes as its metadata), so it is listed under the run's logged models; returns the model id.
    Offline: pip requirements are given, not inferred."""
    import importlib.metadata
    import json

    import mlflow

    pins = [f"{name}=={importlib.metadata.version(name).split('+')[0]}"
            for name in ("transformers", "torch", "sentencepiece", "tokenizers")]
    notes = json.loads((Path(folder) / "config.json").read_text()).get("tandem_export", {})
    mlflow.set_tracking_uri(uri)
    with warnings.catch_warnings():  # no model card or license to fetch for a local folder: say nothing about it
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(transformers_model=str(folder), name=MLFLOW_MODEL_NAME,
                                                 task="text2text-generation", pip_requirements=pins,
                                                 metadata={"tandem_export": notes})
    return info.model_id


def publish_hf(engine, tokenizer, *, options=None, mode: str = "ar_beam", source: dict[str, Any] | None = None) -> None:
    """After a run's final export (rank 0; checkpoint.export_hf): <output_dir>/hf from <output_dir>/final_model.pt,
    logged as the MLflow model of the engine's run. A failure here warns and leaves the weights as they are (the
    folder can be written again with `python -m finetune export`)."""
    from pretrain.core.export import FINAL_WEIGHTS

    if not (engine.rank0 and engine.cfg.checkpoint.export_final and engine.cfg.checkpoint.export_hf):
        return
    final, out = engine.output_dir / FINAL_WEIGHTS, engine.output_dir / HF_EXPORT
    try:
        from model.config import ModelConfig
        from model.generation.options import DecodeOptions
        from pretrain.core.weights import read_weights

        weights = read_weights(final)
        source = {"source": str(final), "job": engine.kind, "step": weights.meta.get("step"),
                  "mlflow_run_id": engine.tracker.run_id, **(source or {})}
        write_hf_export(weights.shards[0], ModelConfig(**weights.meta["model_config"]), tokenizer, out,
                        options=options or DecodeOptions(), mode=mode, source=source)
        engine.log_line(f"wrote the Hugging Face export {out}")
        # Only to a run MLflow holds whole: with MLflow away, the run waits for backfill and nothing may hang here.
        if engine.tracker.use_mlflow and engine.tracker.run_id and engine.tracker.closed_in_mlflow:
            model_id = log_hf_model(engine.tracker.uri, engine.tracker.run_id, out)
            engine.log_line(f"logged {out} as MLflow model {model_id} of run {engine.tracker.run_id}")
        elif engine.tracker.use_mlflow:
            engine.log_line(f"MLflow holds only part of this run: {out} is not logged as its MLflow model")
    except Exception as err:  # noqa: BLE001 - the trained weights are safe in final_model.pt
        warnings.warn(f"Hugging Face export / MLflow model of {final} failed ({type(err).__name__}: {err}); write it "
                      f"with `python -m finetune export --model {engine.output_dir} --out {out}`", RuntimeWarning)
