"""Init checkpoints, decoding defaults, output names, the shipped configs/scripts and the evaluate command.

The tensor-parallel test writes the two `mp_rank_XX_model_states.pt` files of a TP=2 DeepSpeed checkpoint by
hand (DeepSpeed's file names and keys: module with the ObjectiveModule's `model.` prefix, mp_world_size,
ds_config, our client state), by slicing a full state dict the way megatron-core shards it; the reader must
rebuild the same full weights. A real DeepSpeed checkpoint (TP=1, ZeRO-2) is read in test_finetune_e2e.py.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from finetune.init_checkpoint import read_init
from pretrain.core.weights import InitError, check_dims, checkpoint_dims, full_weights, load_into

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cnndm", "gigaword", "xsum", "msnews", "squadqg", "msqg", "coqa", "personachat", "iwslt14")


def tiny(**overrides):
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel

    parallel.ensure_initialized()
    torch.manual_seed(0)
    return Seq2SeqModel(ModelConfig.preset("tiny", **overrides))


def write_tp2_checkpoint(model, folder: Path, step: int = 7, run_id: str = "abc123") -> Path:
    full = model.state_dict()
    params = dict(model.named_parameters())
    shards = [{}, {}]
    for name, value in full.items():
        param = params.get(name)
        if isinstance(value, torch.Tensor) and param is not None and getattr(param, "tensor_model_parallel", False):
            for rank, piece in enumerate(value.chunk(2, dim=param.partition_dim)):
                shards[rank][f"model.{name}"] = piece.clone()
        else:
            for rank in range(2):
                shards[rank][f"model.{name}"] = value.clone() if isinstance(value, torch.Tensor) else value
    tag = folder / f"step_{step:08d}"
    tag.mkdir(parents=True)
    for rank, shard in enumerate(shards):
        torch.save({"module": shard, "mp_world_size": 2, "dp_world_size": 1, "step": step, "mlflow_run_id": run_id,
                    "ds_config": {"zero_optimization": {"stage": 1}}}, tag / f"mp_rank_{rank:02d}_model_states.pt")
    (folder / "latest").write_text(tag.name)
    return folder


def test_tensor_parallel_deepspeed_checkpoint_is_merged_exactly(tmp_path):
    source = tiny()
    folder = write_tp2_checkpoint(source, tmp_path / "checkpoints")
    weights = read_init(tmp_path)  # the run folder: finds checkpoints/latest
    assert weights.writer_tp == 2 and weights.meta["step"] == 7 and weights.meta["mlflow_run_id"] == "abc123"
    assert weights.path == folder / "step_00000007"
    dims = checkpoint_dims(weights)
    assert dims == {"vocab_size": 1024, "d_model": 64, "d_ffn": 128, "n_encoder_layers": 2, "n_decoder_layers": 2,
                    "max_source_positions": 256, "max_target_positions": 256, "n_length_classes": 64, "norm": "post"}
    target = tiny()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in target.parameters():
            p.normal_()
    load_into(target, weights)
    for name, value in source.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(target.state_dict()[name], value), name
    assert set(full_weights(weights, target)) == set(source.state_dict())


def test_full_state_dict_and_engine_export_are_read(tmp_path):
    source = tiny()
    plain = tmp_path / "plain.pt"
    torch.save({k: v for k, v in source.state_dict().items() if isinstance(v, torch.Tensor)}, plain)
    target = tiny(init_std=0.5)
    load_into(target, read_init(plain))  # megatron's _extra_state placeholders need not be in the file
    assert torch.equal(target.embed_tokens.weight, source.embed_tokens.weight)

    export = tmp_path / "final_model.pt"  # pretrain.core.engine.Engine.export_weights' layout
    torch.save({"model": source.state_dict(), "config": dataclasses.asdict(source.cfg), "step": 11}, export)
    weights = read_init(export)
    assert weights.meta["step"] == 11 and weights.meta["model_config"]["n_heads"] == 4
    check_dims(weights, source.cfg, "the test")
    other_heads = dataclasses.replace(source.cfg, n_heads=8)  # not visible in shapes; the saved config says so
    with pytest.raises(InitError, match=r"n_heads: checkpoint 4, config 8"):
        check_dims(weights, other_heads, "the test")

    (tmp_path / "finetune_meta.json").write_text(json.dumps({"task": "gigaword", "finetune_run_id": "r1"}))
    finetuned = read_init(tmp_path)
    assert finetuned.meta["format"] == "finetuned" and finetuned.meta["task"] == "gigaword"


def test_checkpoints_of_another_shape_are_refused_naming_the_difference(tmp_path):
    small = tiny(d_model=32, d_ffn=64)
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    weights = read_init(path)
    with pytest.raises(InitError, match=r"another shape .*d_model: checkpoint 32, config 64; d_ffn: checkpoint 64, "
                                        r"config 128"):
        check_dims(weights, tiny().cfg, "configs/finetune/gigaword.yaml")
    with pytest.raises(InitError, match=r"does not fit the model: 73 of another shape \(e\.g\. \['slot_embed \(32,\) "
                                        r"vs model \(64,\)', 'embed_tokens\.weight \(1024, 32\) vs model \(1024, 64\)'"):
        load_into(tiny(), weights)
    vocab = read_init(path)
    with pytest.raises(InitError, match="vocab_size comes from the tokenizer"):
        check_dims(vocab, tiny(d_model=32, d_ffn=64, vocab_size=2048).cfg, "the test")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InitError, match=r"junk\.pt: cannot read as a torch checkpoint"):
        read_init(tmp_path / "junk.pt")
    with pytest.raises(InitError, match="init checkpoint not found"):
        read_init(tmp_path / "missing")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InitError, match="not a checkpoint of the seq2seq model"):
        checkpoint_dims(read_init(tmp_path / "other.pt"))


def test_decoding_follows_the_objective_and_the_task():
    from finetune import decoding
    from finetune.config import DecodeSection, FinetuneObjectiveSection

    obj = FinetuneObjectiveSection(name="ar")
    mode, opts = decoding.resolve(DecodeSection(), "cnndm", obj)
    assert mode == "ar_beam" and opts.ar_logits == "ar"  # the main stream by default
    assert (opts.beam_size, opts.length_penalty, opts.min_len, opts.max_len, opts.no_repeat_ngram_size) == \
        (5, 1.2, 45, 110, 3)  # GLGE's CNN/DM decoding
    obj.ar.stream = "bang_ar"
    assert decoding.resolve(DecodeSection(beam_size=2), "gigaword", obj)[1].ar_logits == "bang_ar"
    assert decoding.resolve(DecodeSection(beam_size=2), "gigaword", obj)[1].beam_size == 2
    mode, opts = decoding.resolve(DecodeSection(), "xsum", FinetuneObjectiveSection(name="bang_mixed"))
    assert mode == "ar_beam" and opts.nar_mode == "nar_causal" and opts.ar_logits == "bang_ar"
    nar = FinetuneObjectiveSection(name="nar")
    assert decoding.resolve(DecodeSection(), "xsum", nar)[0] == "nar"
    nar.nar.masking = "uniform"
    assert decoding.resolve(DecodeSection(), "xsum", nar)[0] == "mask_predict"
    assert decoding.resolve(DecodeSection(), "iwslt14", FinetuneObjectiveSection(name="janus"))[1].beam_size == 5
    with pytest.raises(ValueError, match=r"decode\.mode='beam': choose one of"):
        decoding.resolve(DecodeSection(mode="beam"), "xsum", nar)
    with pytest.raises(ValueError, match=r"decode\.block_size=0"):
        decoding.resolve(DecodeSection(mode="semi_nar", block_size=0), "xsum", nar)
    assert decoding.resolve(DecodeSection(mode="early_exit", exit_layer=2), "xsum", nar)[1].exit_layer == 2
    opts = decoding.resolve(DecodeSection(), "xsum", nar)[1]
    assert (opts.length_candidates, opts.remask_slots) == ("offsets", "content")  # fairseq's mask-predict
    opts = decoding.resolve(DecodeSection(length_candidates="top", remask_slots="all"), "xsum", nar)[1]
    assert (opts.length_candidates, opts.remask_slots) == ("top", "all")
    with pytest.raises(ValueError, match=r"decode\.exit_layer=0: must be a layer number >= 1"):
        decoding.resolve(DecodeSection(mode="early_exit", exit_layer=0), "xsum", nar)


def test_prediction_files_are_named_as_glge_submissions_expect():
    from finetune.generate import predictions_name

    assert predictions_name("gigaword", "easy", "test") == "gigaword.easy.test"
    assert predictions_name("personachat", "hard", "test") == "personachat.hard.test"
    assert predictions_name("xsum", "medium", "valid") == "xsum.medium.valid"
    assert predictions_name("iwslt14", "easy", "test") == "iwslt14.test"


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_a_valid_config_and_a_runnable_script(task):
    from finetune import decoding, resolve, run
    from finetune.config import load

    cfg = load(REPO_ROOT / "configs" / "finetune" / f"{task}.yaml", ["task.difficulty=hard"])
    assert cfg.task.name == task
    resolve.validate_task(cfg)
    run._validate_objective(cfg)
    decoding.resolve(cfg.decode, task, cfg.objective)
    script = REPO_ROOT / "finetune" / "scripts" / f"{task}.sh"
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert usage.returncode == 0 and "--init CKPT" in usage.stdout


def test_evaluate_command_scores_files_and_records_runs(tmp_path, capsys):
    """`evaluate --predictions` gives what finetune.metrics computes on the same lines, records one MLflow run per
    task with its tags and artifacts, and the GLGE score over the tasks given (a glge_summary run)."""
    from data_pipeline.tasks import read_task_split
    from finetune.evaluation import main as evaluate_main
    from finetune.metrics import evaluate_task, glge_score
    from finetune.tracking import client

    shared = REPO_ROOT.parent / "shared" / "data"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = {}
    submission = tmp_path / "submission"
    submission.mkdir()
    for task, split in (("gigaword", "valid"), ("personachat", "valid"), ("iwslt14", "test")):
        root = shared / ("iwslt14-de-en" if task == "iwslt14" else "glge")
        sources, references = read_task_split(root, task, split)
        predictions = [" ".join(r.split()[: max(1, len(r.split()) // 2)]) for r in references]  # half of each
        results[task] = evaluate_task(task, predictions, references)
        path = (submission / f"{task}.easy.{split}") if task != "iwslt14" else (tmp_path / "iwslt14.test")
        path.write_text("".join(p + "\n" for p in predictions))
    code = evaluate_main(["--predictions", str(tmp_path / "iwslt14.test"), "--config", "configs/finetune/iwslt14.yaml",
                          "--tracking-uri", uri, "--experiment", "eval-test"])
    assert code == 0
    code = evaluate_main(["--submission", str(submission), "--difficulty", "easy", "--split", "valid",
                          "--tracking-uri", uri, "--experiment", "eval-test"])
    assert code == 0
    out = capsys.readouterr().out
    expected_glge = glge_score({t: results[t] for t in ("gigaword", "personachat")})
    assert f"GLGE score over 2/8 tasks: {expected_glge:.2f} (missing: cnndm, xsum, msnews, squadqg, msqg, coqa)" in out
    assert "sacrebleu nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:2.6.0" in out

    c = client(uri)
    experiment = c.get_experiment_by_name("eval-test").experiment_id
    runs = {r.data.tags["task"]: r for r in c.search_runs([experiment], "tags.kind = 'evaluation'")}
    assert set(runs) == {"gigaword", "personachat", "iwslt14"}
    for task, run in runs.items():
        for name, value in results[task].items():
            assert run.data.metrics[name] == pytest.approx(value, abs=1e-9), (task, name)
        assert run.data.tags["objective"] == "external" and run.data.tags["decoding_mode"] == "external"
        assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"predictions", "scores.json", "config"}
    assert runs["iwslt14"].data.tags["note.bleu"].startswith("sacrebleu nrefs:1")
    summary = c.search_runs([experiment], "tags.kind = 'glge_summary'")
    assert len(summary) == 1 and summary[0].data.metrics["glge_score"] == pytest.approx(expected_glge, abs=1e-9)
    assert summary[0].data.tags["glge_complete"] == "false"


def test_engine_export_records_the_run_and_the_tokenizer(tmp_path):
    """pretrain.export.export_payload (what Engine.export_weights saves) carries the pretraining run's id, step,
    model config and tokenizer checksum; read_init reads them back, pretrain_run_id names the run, and
    check_tokenizer refuses other shards naming both checksums. Finetuned weights point at their pretraining run."""
    from finetune.init_checkpoint import FINETUNE_META, check_tokenizer, pretrain_run_id
    from pretrain.core.export import export_payload, model_config_dict

    source = tiny()
    record = {"job": "pretrain", "mlflow_run_id": "run-pre", "tokenizer_checksum": "aaa111", "experiment": "e"}
    path = tmp_path / "pre" / "final_model.pt"
    path.parent.mkdir()
    torch.save(export_payload(source.state_dict(), model_config_dict(source), 42, record), path)
    weights = read_init(path)
    assert (weights.meta["step"], weights.meta["mlflow_run_id"], weights.meta["tokenizer_checksum"]) == \
        (42, "run-pre", "aaa111")
    assert weights.meta["model_config"] == dataclasses.asdict(source.cfg) and pretrain_run_id(weights) == "run-pre"
    check_tokenizer(weights, "aaa111", "the task shards")  # the same tokenizer passes
    with pytest.raises(InitError, match=r"final_model\.pt was trained with the tokenizer of checksum aaa111, but "
                                        r"the task shards /x were written with the tokenizer of checksum bbb222"):
        check_tokenizer(weights, "bbb222", "the task shards /x")
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    assert pretrain_run_id(read_init(plain)) == "none"  # nothing recorded: nothing to check or link
    check_tokenizer(read_init(plain), "bbb222", "the task shards")

    finetuned = tmp_path / "ft"
    finetuned.mkdir()
    torch.save(export_payload(source.state_dict(), model_config_dict(source), 7,
                              {"job": "finetune", "mlflow_run_id": "run-ft", "pretrain_run_id": "run-pre"}),
               finetuned / "final_model.pt")
    assert pretrain_run_id(read_init(finetuned / "final_model.pt")) == "run-pre"
    (finetuned / FINETUNE_META).write_text(json.dumps({"finetune_run_id": "run-ft", "pretrain_run_id": "run-pre"}))
    assert pretrain_run_id(read_init(finetuned)) == "run-pre"


def test_exported_weights_load_with_weights_only(tmp_path):
    """export_payload keeps only plain values (tensors, dicts, lists, strings, numbers, None), so torch.load with
    weights_only=True reads the export and nothing in it can run code: paths become strings, numpy values Python
    ones, a non-tensor `_extra_state` (Transformer Engine's byte buffer) is left out, anything else is refused
    naming its key. read_weights refuses a pickle holding other objects, naming the file."""
    import datetime
    import io

    import numpy as np

    from pretrain.core.export import export_payload, model_config_dict
    from pretrain.core.weights import read_weights

    source = tiny()
    state = {**source.state_dict(), "encoder_layers.0.ffn.block.fc_in._extra_state": io.BytesIO(b"te")}
    record = {"job": "finetune", "tokenizer": Path("/data/tok.model"), "pretrain_step": np.int64(300),
              "mlflow_run_id": None, "lr": np.float32(0.5)}
    path = tmp_path / "final_model.pt"
    torch.save(export_payload(state, model_config_dict(source), np.int64(7), record), path)
    saved = torch.load(path, weights_only=True)
    assert (saved["tokenizer"], saved["pretrain_step"], saved["lr"], saved["step"]) == ("/data/tok.model", 300, 0.5, 7)
    assert "encoder_layers.0.ffn.block.fc_in._extra_state" not in saved["model"]
    for name, value in source.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(saved["model"][name], value), name
    reloaded = tiny()
    load_into(reloaded, read_weights(path))  # the left-out extra state comes from the model
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), source.parameters()))

    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"record\.origin: a Opaque cannot go into the exported weights"):
        export_payload(source.state_dict(), None, 1, {"origin": Opaque()})
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": source.state_dict(), "saved_on": datetime.date(2025, 1, 1)}, pickled)
    with pytest.raises(InitError, match=r"pickled\.pt: holds objects other than tensors and plain values, which "
                                        r"torch\.load\(weights_only=True\) refuses \(Unsupported global: .*date"):
        read_weights(pickled)


def test_compare_logs_its_figures_to_a_comparison_run(tmp_path):
    """`compare` records its PNGs, table and the runs it compared as one run of kind `comparison` in the experiment
    (a training experiment, not MLflow 3's GenAI kind), and reads only evaluation and finetune runs, so a comparison
    run never shows up in a later table."""
    from mlflow.entities import Metric

    from finetune.compare import compare
    from finetune.tracking import client, log_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    finetune_run = log_run(uri, "cmp", "ft", {"kind": "finetune", "task": "gigaword", "difficulty": "easy",
                                              "objective": "ar"}, {}, {}, [])
    c.log_batch(finetune_run, metrics=[Metric("train/loss", 5.0 - s, 1000 + s, s) for s in range(1, 4)])
    evaluations = [log_run(uri, "cmp", f"ev {mode}", {"kind": "evaluation", "task": "gigaword", "difficulty": "easy",
                                                      "objective": "ar", "decoding_mode": mode, "split": "valid",
                                                      "finetune_run_id": finetune_run},
                           {}, {"rouge1": r1, "rouge2": 10.0, "rougeL": 20.0, "task_score": r1 / 3 + 10,
                                "ms_per_sample": ms, "samples_per_s": 1000 / ms}, [])
                   for mode, r1, ms in (("ar_beam", 30.0, 40.0), ("ar_greedy", 28.0, 10.0))]
    for attempt in (1, 2):
        rows = compare(uri, "cmp", tmp_path / "out")
        assert [r["run_id"] for r in rows] == evaluations  # comparison runs are never compared
    experiment = c.get_experiment_by_name("cmp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = c.search_runs([experiment.experiment_id], "tags.kind = 'comparison'")
    assert len(runs) == 2 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert {a.path for a in c.list_artifacts(run.info.run_id)} == {"quality_vs_speed.png", "loss_curves.png",
                                                                  "comparison.txt", "comparison.json"}
    assert (run.data.metrics["evaluation_runs"], run.data.metrics["loss_curves"]) == (2, 1)
    compared = json.loads(Path(c.download_artifacts(run.info.run_id, "comparison.json", str(tmp_path))).read_text())
    assert (compared["evaluation_runs"], compared["finetune_runs"]) == (evaluations, [finetune_run])
    png = Path(c.download_artifacts(run.info.run_id, "quality_vs_speed.png", str(tmp_path / "dl")))
    assert png.read_bytes() == (tmp_path / "out" / "quality_vs_speed.png").read_bytes()
    assert run.data.tags["mlflow.source.type"] == "LOCAL"


def test_finetuned_weights_keep_their_pretraining_lineage():
    """Weights finetuned again name the pretraining run and step they descend from, not their own finetuning step."""
    from finetune.init_checkpoint import FINETUNED, pretrain_run_id, pretrain_step
    from pretrain.core.weights import InitWeights

    pretrained = InitWeights(Path("p.pt"), {}, {"job": "pretrain", "mlflow_run_id": "PT", "step": 1000})
    finetuned = InitWeights(Path("f"), {}, {"format": FINETUNED, "job": "finetune", "mlflow_run_id": "FT",
                                            "step": 50, "pretrain_run_id": "PT", "pretrain_step": 1000})
    assert (pretrain_run_id(pretrained), pretrain_step(pretrained)) == ("PT", 1000)
    assert (pretrain_run_id(finetuned), pretrain_step(finetuned)) == ("PT", 1000)
