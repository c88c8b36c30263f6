"""Starting from a Hugging Face checkpoint (`finetune --init <HF folder>`), with real components only: BART- and
mBART-shaped checkpoints built here (BartConfig / MBartConfig + save_pretrained, random weights; no download) with
a byte-level BPE tokenizer trained by the `tokenizers` library on Gigaword text and numbered as BART's
(<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> last; tests/hf_helpers.py), the Gigaword task shards written with that
tokenizer (data.overrides tokenizer.type=hf, tokenizer.path=<the folder>), real DeepSpeed, a real sqlite MLflow store.

  * the job's model takes its shape from the checkpoint's config.json, and the weights `--init` loads give the
    checkpoint's logits (ids mapped through the tokenizer's permutation) value by value, for BART and for mBART's
    scale_embedding;
  * a JANUS finetune from the BART folder trains (its loss falls), and its Hugging Face export carries the
    checkpoint's numbering (pad 1, bos 0, eos 2) and tokenizer back: transformers loads it offline, and its logits
    equal the finetuned weights' in Tandem;
  * a checkpoint numbered as BART's against shards of the project's own sentencepiece tokenizer is refused before
    any process group starts, naming init.checkpoint and the fix.
"""
from __future__ import annotations

import json

import pytest
import torch

from finetune_helpers import GIGAWORD, as_list_override, build_test_data, data_overrides, run, train_losses
from hf_helpers import build_bart_checkpoint, hf_logits, our_logits, source_batch

LOGITS_TOL = 1e-4  # fp32; the logits are of order 1-10
STEPS = 60
EXAMPLES = 8


def hf_data_overrides(shared_data, folder, root) -> str:
    """Task shards in `root` written with the checkpoint's tokenizer; short sequences for the tiny checkpoint."""
    return as_list_override("data.overrides", [
        *data_overrides(shared_data), "tokenizer.type=hf", f"tokenizer.path={folder}", f"tasks.out_dir={root}/tasks",
        "tasks.max_source_len=48", "tasks.max_target_len=24"])


def task_checkpoint(kind: str, shared_data, tmp_path_factory) -> dict:
    """A checkpoint folder of `kind` and the Gigaword task shards written with its tokenizer."""
    root = tmp_path_factory.mktemp(f"hf-import-{kind}")
    folder = build_bart_checkpoint(shared_data, root / "checkpoint", mbart=kind == "mbart")
    shards = hf_data_overrides(shared_data, folder, root)
    run(["-m", "finetune", "data", "--config", GIGAWORD, shards])
    return {"kind": kind, "folder": folder, "root": root, "shards": shards}


@pytest.fixture(scope="module")
def bart(shared_data, tmp_path_factory) -> dict:
    return task_checkpoint("bart", shared_data, tmp_path_factory)


@pytest.fixture(scope="module")
def mbart(shared_data, tmp_path_factory) -> dict:
    return task_checkpoint("mbart", shared_data, tmp_path_factory)


@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_init_loads_the_checkpoint_exactly(kind, request):
    """prepare() reads the model's shape from config.json; load_weights fills the built model so that its logits are
    the HF model's, vocabulary permuted."""
    from transformers import AutoModelForSeq2SeqLM

    from finetune.config import load
    from finetune.data import read_split
    from finetune.init_checkpoint import HfCheckpoint, load_weights
    from finetune.run import prepare
    from model.seq2seq import Seq2SeqModel

    checkpoint = request.getfixturevalue(kind)
    plan = prepare(load(GIGAWORD, [f"init.checkpoint={checkpoint['folder']}", checkpoint["shards"],
                                   "model.overrides={dropout: 0.0, attention_dropout: 0.0}"]), world_size=1)
    assert isinstance(plan.init, HfCheckpoint)
    m = plan.model_cfg
    assert (m.d_model, m.n_encoder_layers, m.d_ffn, m.vocab_size, m.max_source_positions) == (64, 2, 128, 1024, 64)
    assert (m.norm, m.scale_embedding) == (("pre", True) if kind == "mbart" else ("post", False))
    model = Seq2SeqModel(m).eval()
    load_weights(model, plan.init)

    from data_pipeline.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(plan.task.tokenizer)
    order = torch.tensor(plan.init.vocab_order)
    assert order[:4].tolist() == [1, 3, 0, 2]  # our pad/unk/bos/eos are BART's 1/3/0/2
    src, dec = source_batch(tokenizer, read_split(plan.task, "valid")[0][:EXAMPLES])
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint["folder"], local_files_only=True).eval()
    ours, theirs = our_logits(model, src, dec), hf_logits(hf_model, order[src], order[dec], pad=1)
    assert theirs.abs().max() > 0.1  # not a degenerate model
    assert (ours - theirs[..., order]).abs().max().item() <= LOGITS_TOL


def test_janus_finetune_from_bart_and_its_export(bart, tmp_path):
    checkpoint = bart
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from data_pipeline.tokenizer import load_tokenizer
    from finetune.data import read_split
    from finetune.generate import load_for_decoding

    out = tmp_path / "ft"
    run(["-m", "finetune", "--config", GIGAWORD, "--init", str(checkpoint["folder"]), checkpoint["shards"],
         "objective.name=janus", "task.epochs=0", f"train.steps={STEPS}", "train.log_every=10", "optim.lr=1e-3",
         "schedule.decay=constant", "schedule.warmup_steps=10", "data.batch_size=16", "eval.every_steps=0",
         "eval.batches=1", "valid_generation.samples=0", "deepspeed.precision=fp32", f"output_dir={out}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=hf-import"], timeout=900)
    losses = train_losses(out)
    first, last = losses[min(losses)]["loss"], losses[max(losses)]["loss"]
    assert max(losses) == STEPS and last < 0.9 * first, losses  # 14.7 -> 12.4 (JANUS: three losses summed)

    folder = out / "hf"  # the run's export: the checkpoint's numbering and tokenizer back
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == \
        ("bart", 1, 0, 2)
    assert json.loads((folder / "generation_config.json").read_text())["decoder_start_token_id"] == 0  # our bos
    model, cfg, _, tokenizer, td = load_for_decoding(str(out), None, [])
    sources = read_split(td, "valid")[0][:EXAMPLES]
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    original = load_tokenizer(checkpoint["folder"])
    assert hf_tokenizer(sources, add_special_tokens=False).input_ids == \
        original.hf(sources, add_special_tokens=False).input_ids
    order = torch.tensor(tokenizer.vocab_order)
    src, dec = source_batch(tokenizer, sources)
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True).eval()
    ours = our_logits(model.eval(), src, dec)
    theirs = hf_logits(hf_model, order[src], order[dec], pad=1)
    assert (ours - theirs[..., order]).abs().max().item() <= LOGITS_TOL
    before = AutoModelForSeq2SeqLM.from_pretrained(checkpoint["folder"], local_files_only=True).eval()
    assert (hf_logits(before, order[src], order[dec], pad=1) - theirs).abs().max() > 0.1  # it did train


def test_bart_numbered_checkpoint_needs_its_tokenizer(bart, shared_data, capsys):
    from finetune.run import main as train_main

    shards = as_list_override("data.overrides", build_test_data(shared_data))  # the project's sentencepiece shards
    assert train_main(["--validate-only", "--config", GIGAWORD, "--init", str(bart["folder"]), shards]) == 2
    err = capsys.readouterr().err
    assert "init.checkpoint" in err and "pad_token_id=1: differs from our pad id 0" in err
    assert "tokenizer.type=hf" in err
