"""The Hugging Face export of a finetuned model, with real components: a tiny model finetuned through the entry
point (real DeepSpeed; objective ar on the plain main stream; the tests' Gigaword task shards), MLflow in a real
sqlite store, transformers loading the folders offline (local_files_only, HF_HUB_OFFLINE).

  * the run leaves <output_dir>/hf and logs it as an MLflow model of its run (listed under its logged models);
  * `python -m finetune export` writes a folder AutoModelForSeq2SeqLM and AutoTokenizer load; its tokenizer gives
    Tandem's ids for the validation sources, and HF `generate` with its generation_config.json (Gigaword's official
    settings: beam 4, no-repeat 3-gram, min length 1) gives ar_beam's tokens on VALID_EXAMPLES validation sources,
    batched and padded, token for token;
  * the same model decoded through BANG's predicting stream (decode.ar_logits=bang_ar) exports with a warning, and
    README.md and config.json say what Hugging Face cannot reproduce;
  * a DeepSpeed checkpoint folder exports as a pretraining output does: its tokenizer found through the run's
    config.resolved.yaml and checked against the checksum the checkpoint records;
  * a pretraining run leaves its export and MLflow model too, and exporting its output gives its logits exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_helpers import ENV, GIGAWORD, REPO_ROOT, as_list_override, build_test_data, run
from hf_helpers import hf_logits, our_logits, source_batch

STEPS = 150
VALID_EXAMPLES = 48
MAX_SOURCE_LEN = 32
HF_ENV = dict(ENV, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def finetuned(shared_data, tmp_path_factory) -> dict:
    data = build_test_data(shared_data)
    root = tmp_path_factory.mktemp("hf-export")
    out, uri = root / "ft", f"sqlite:///{root / 'mlflow.db'}"
    run(["-m", "finetune", "--config", GIGAWORD, "--init", "scratch", as_list_override("data.overrides", data),
         "objective.name=ar", "objective.ar.stream=ar", "task.epochs=0", f"train.steps={STEPS}", "train.log_every=50",
         "optim.lr=1e-3", "schedule.decay=constant", "schedule.warmup_steps=20", f"data.max_source_len={MAX_SOURCE_LEN}",
         "eval.every_steps=0", "eval.batches=1", "valid_generation.samples=0", "checkpoint.save_at_end=true",
         "deepspeed.precision=fp32", f"output_dir={out}", f"tracking.uri={uri}", "tracking.experiment=hf-export"],
        timeout=600)
    return {"out": out, "uri": uri, "root": root, "data": data}


def export(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "finetune", "export", *args], cwd=REPO_ROOT, env=HF_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_the_run_logs_its_hf_export_as_an_mlflow_model(finetuned):
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    meta = json.loads((finetuned["out"] / "finetune_meta.json").read_text())
    folder = finetuned["out"] / "hf"
    assert {"config.json", "model.safetensors", "generation_config.json", "spiece.model", "tokenizer_config.json",
            "tandem_aside.pt", "README.md"} <= {p.name for p in folder.iterdir()}
    client = MlflowClient(finetuned["uri"])
    run_info = client.get_run(meta["finetune_run_id"]).info
    models = client.search_logged_models(experiment_ids=[run_info.experiment_id],
                                         filter_string=f"source_run_id='{run_info.run_id}'")
    assert [(m.name, m.status) for m in models] == [("model", LoggedModelStatus.READY)]
    mlflow.set_tracking_uri(finetuned["uri"])
    logged = mlflow.models.get_model_info(models[0].model_uri)
    assert "transformers" in logged.flavors
    assert logged.metadata["tandem_export"]["exact"] is True and logged.metadata["tandem_export"]["task"] == "gigaword"


def test_hf_generate_reproduces_ar_beam(finetuned):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    from finetune import decoding
    from finetune.data import read_split
    from finetune.generate import load_for_decoding
    from finetune.resolve import decoding_options
    from model.generation import decode

    folder = finetuned["root"] / "exported"
    export(["--model", str(finetuned["out"]), "--out", str(folder)])
    config = GenerationConfig.from_pretrained(folder, local_files_only=True)  # json omits values left at defaults
    assert (config.num_beams, config.length_penalty, config.no_repeat_ngram_size, config.min_new_tokens,
            config.early_stopping, config.decoder_start_token_id, config.eos_token_id, config.pad_token_id,
            config.suppress_tokens) == (4, 1.0, 3, 1, True, 2, 3, 0, [0, 2, 4])

    model, cfg, _, tokenizer, td = load_for_decoding(str(finetuned["out"]), None, [])
    mode, options = decoding_options(cfg, model.cfg)
    assert (mode, options.ar_logits) == ("ar_beam", "ar")
    sources = read_split(td, "valid")[0][:VALID_EXAMPLES]
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True).eval()
    batch = hf_tokenizer(sources, add_special_tokens=False, padding=True, truncation=True, max_length=MAX_SOURCE_LEN,
                         return_tensors="pt")
    ours_ids = decoding.encode_sources(tokenizer, sources, MAX_SOURCE_LEN)
    assert [row[:len(ids)] for row, ids in zip(batch.input_ids.tolist(), ours_ids)] == ours_ids

    ours = decode(mode, model, batch.input_ids, options).tokens  # EOS and pads removed
    with torch.no_grad():
        generated = hf_model.generate(**batch).tolist()
    eos, pad = config.eos_token_id, config.pad_token_id
    theirs = [[t for t in row[1:] if t not in (eos, pad)] for row in generated]  # after decoder_start; EOS, pads
    assert all(row[0] == config.decoder_start_token_id for row in generated)
    # the outputs depend on the source (150 steps from scratch leave a repetitive model: 9 distinct outputs of 48)
    assert len({tuple(o) for o in ours}) >= VALID_EXAMPLES // 8
    assert theirs == ours
    assert hf_tokenizer.batch_decode(generated, skip_special_tokens=True) == [tokenizer.decode(o) for o in ours]


def test_bang_ar_export_says_what_hf_cannot_reproduce(finetuned):
    folder = finetuned["root"] / "exported-bang-ar"
    proc = export(["--model", str(finetuned["out"]), "--out", str(folder), "decode.ar_logits=bang_ar"])
    assert "NOT reproduced" in proc.stderr and "BANG's predicting stream" in proc.stderr  # the warning
    assert "**What Hugging Face reproduces**: NOT reproduced" in (folder / "README.md").read_text()
    notes = json.loads((folder / "config.json").read_text())["tandem_export"]
    assert (notes["exact"], notes["ar_logits"]) == (False, "bang_ar")


def test_checkpoint_folder_exports_with_the_runs_tokenizer(finetuned, tmp_path):
    """A DeepSpeed checkpoint (as a pretraining run leaves) has no finetune meta: the tokenizer comes from the run
    folder's config.resolved.yaml; the default AR settings go to generation_config.json."""
    from transformers import AutoModelForSeq2SeqLM

    folder = tmp_path / "from-checkpoint"
    export(["--model", str(finetuned["out"] / "checkpoints"), "--out", str(folder)])
    ours = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True).state_dict()
    final = AutoModelForSeq2SeqLM.from_pretrained(finetuned["out"] / "hf", local_files_only=True).state_dict()
    assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours)  # same step's weights
    assert json.loads((folder / "config.json").read_text())["tandem_export"]["job"] == "finetune"
    bad = subprocess.run([sys.executable, "-m", "finetune", "export", "--model", str(finetuned["out"] / "checkpoints"),
                          "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path)], cwd=REPO_ROOT, env=HF_ENV,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tokenizer" in bad.stderr and "tokenizer model not found" in bad.stderr


def test_pretraining_output_exports_exactly(shared_data, tmp_path):
    """A pretraining run (tiny, a few steps) leaves <output_dir>/hf logged as its MLflow model; `finetune export
    --model <pretraining output>` finds the tokenizer through the run's config.resolved.yaml, and the folder's
    logits are the final weights' in Tandem value by value (1e-4, fp32), its tokenizer giving Tandem's ids."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from data_pipeline.tokenizer import load_tokenizer
    from finetune.export import run_tokenizer_dir
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel

    data = build_test_data(shared_data)
    out, uri = tmp_path / "pt", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run(["-m", "pretrain", "--config", "configs/pretrain/tiny.yaml", f"output_dir={out}",
         as_list_override("data.overrides", data), "data.eval_overrides=[]", "train.steps=4", "schedule.warmup_steps=2",
         "eval.batches=0", "checkpoint.every_steps=0", "deepspeed.precision=fp32", f"tracking.uri={uri}",
         "tracking.experiment=hf-pretrain"], timeout=600)
    client = MlflowClient(uri)
    (run_record,) = client.search_runs([client.get_experiment_by_name("hf-pretrain").experiment_id])
    models = client.search_logged_models(experiment_ids=[run_record.info.experiment_id])
    assert [(m.name, m.source_run_id) for m in models] == [("model", run_record.info.run_id)]
    assert (out / "hf" / "model.safetensors").is_file()

    folder = tmp_path / "exported"
    export(["--model", str(out), "--out", str(folder)])
    assert json.loads((folder / "config.json").read_text())["tandem_export"]["job"] == "pretrain"
    tokenizer = load_tokenizer(run_tokenizer_dir(out / "final_model.pt"))
    lines = read_valid_sources(shared_data)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert hf_tokenizer(lines, add_special_tokens=False).input_ids == [tokenizer.encode(line) for line in lines]

    saved = torch.load(out / "final_model.pt", map_location="cpu", weights_only=False)
    parallel.ensure_initialized(seed=0)
    model = Seq2SeqModel(ModelConfig(**saved["config"])).eval()
    model.load_state_dict(saved["model"])
    src, dec = source_batch(tokenizer, lines)
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True).eval()
    ours, theirs = our_logits(model, src, dec), hf_logits(hf_model, src, dec, pad=0)
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= 1e-4


def read_valid_sources(shared_data: Path, n: int = 8) -> list[str]:
    return (shared_data / "glge/gigaword/valid.src").read_text(encoding="utf-8").splitlines()[:n]
