"""Bad input to the finetuning commands stops with a clear error naming the file or field: a task folder whose
.src/.tgt line counts differ, an unknown task name, a checkpoint of another model shape, no checkpoint at all,
predictions that do not pair with the references. Every check runs before any process group starts.

The commands are called in this process through their `main(argv)` (what `python -m finetune ...` runs); they
return exit code 2 and print `error: ...` on stderr.
"""
from __future__ import annotations


import pytest
import torch

from finetune_helpers import CACHE, GIGAWORD, as_list_override, build_test_data


@pytest.fixture(scope="module")
def data(shared_data) -> list[str]:
    return build_test_data(shared_data)


def train_main(argv):
    from finetune.run import main

    return main(argv)


def test_mismatched_source_and_target_line_counts(tmp_path, capsys):
    from finetune.prepare_data import main as data_main

    folder = tmp_path / "glge" / "gigaword"
    folder.mkdir(parents=True)
    (folder / "train.src").write_text("a first source\na second source\na third source\n")
    (folder / "train.tgt").write_text("first target\nsecond target\n")
    (folder / "valid.src").write_text("x\n")
    (folder / "valid.tgt").write_text("y\n")
    overrides = [f"work_dir={tmp_path / 'work'}", f"data_root={tmp_path}", f"tokenizer.out_dir={CACHE / 'tokenizer'}"]
    code = data_main(["--config", GIGAWORD, as_list_override("data.overrides", overrides)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{folder / 'train.src'} has 3 lines but {folder / 'train.tgt'} has 2" in err
    assert "must pair line by line" in err


def test_unknown_task_name(capsys):
    code = train_main(["--config", GIGAWORD, "--init", "whatever", "task.name=gigawords"])
    err = capsys.readouterr().err
    assert code == 2
    assert "configs/finetune/gigaword.yaml: task.name: unknown task 'gigawords'; known tasks: cnndm, gigaword" in err

    from finetune.prepare_data import main as data_main

    assert data_main(["--config", GIGAWORD, "task.name=summarize"]) == 2
    assert "task.name: unknown task 'summarize'" in capsys.readouterr().err


def test_checkpoint_of_another_model_shape(data, tmp_path, capsys):
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel

    parallel.ensure_initialized()
    other = Seq2SeqModel(ModelConfig.preset("tiny", d_model=32, d_ffn=64, n_decoder_layers=3))
    path = tmp_path / "other_shape.pt"
    torch.save(other.state_dict(), path)
    args = ["--config", GIGAWORD, "--init", str(path), as_list_override("data.overrides", data)]
    code = train_main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert f"init.checkpoint: {path} was written for a model of another shape" in err
    assert "d_model: checkpoint 32, config 64" in err and "n_decoder_layers: checkpoint 3, config 2" in err
    assert "model.preset=tiny" in err

    # The same file is accepted once the config describes that shape (and is refused again for a wrong vocab).
    from finetune.config import load
    from finetune.run import prepare

    shape = ["model.overrides={d_model: 32, d_ffn: 64, n_decoder_layers: 3}"]
    plan = prepare(load(GIGAWORD, [f"init.checkpoint={path}", args[-1], *shape]), world_size=1)
    assert plan.model_cfg.d_model == 32 and plan.init.path == path
    code = train_main(args + ["model.overrides={d_model: 32, d_ffn: 64, n_decoder_layers: 3, vocab_size: 2048}"])
    assert code == 2 and "vocab_size: checkpoint 1024, config 2048" in capsys.readouterr().err


def test_missing_checkpoint_and_missing_shards(data, tmp_path, capsys):
    assert train_main(["--config", GIGAWORD, as_list_override("data.overrides", data)]) == 2
    assert "init.checkpoint: no pretraining checkpoint: pass --init <checkpoint>" in capsys.readouterr().err
    assert train_main(["--config", GIGAWORD, "--init", str(tmp_path / "nope"),
                       as_list_override("data.overrides", data)]) == 2
    assert f"init checkpoint not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    empty = [f"work_dir={tmp_path / 'empty'}", *data[1:]]
    assert train_main(["--config", GIGAWORD, "--init", "x", as_list_override("data.overrides", empty)]) == 2
    err = capsys.readouterr().err
    assert "task.train_split: no task shards at" in err and "python -m finetune data --config" in err


def test_predictions_that_do_not_pair_with_the_references(data, tmp_path, capsys):
    from finetune.evaluation import main as evaluate_main

    predictions = tmp_path / "gigaword.easy.valid"
    predictions.write_text("one line\ntwo lines\n")
    code = evaluate_main(["--predictions", str(predictions), "--config", GIGAWORD, "--split", "valid",
                          "--no-mlflow", as_list_override("data.overrides", data)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{predictions} has 2 lines but the gigaword valid split has 1000 references" in err


def test_unknown_config_key_and_bad_values(capsys):
    assert train_main(["--config", GIGAWORD, "--init", "x", "objective.nar.masks=all"]) == 2
    assert "Key 'masks' not in 'NarObjectiveSection'" in capsys.readouterr().err
    assert train_main(["--config", GIGAWORD, "--init", "x", "objective.name=nar", "objective.nar.mode=causal"]) == 2
    assert "objective.nar: objective.mode='causal': choose one of ('nar_bidir', 'nar_causal')" in \
        capsys.readouterr().err
    assert train_main(["--config", GIGAWORD, "--init", "x", "task.difficulty=extreme"]) == 2
    assert "task.difficulty: must be one of ('easy', 'medium', 'medium+', 'hard'), got 'extreme'" in \
        capsys.readouterr().err
    assert train_main(["--config", GIGAWORD, "--init", "x", "objective.lead_copy.tokens=0"]) == 2
    assert "objective.lead_copy.tokens: must be >= 1, got 0" in capsys.readouterr().err


def _export(tmp_path, run_id: str, checksum: str):
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel
    from pretrain.core.export import export_payload, model_config_dict

    parallel.ensure_initialized()
    model = Seq2SeqModel(ModelConfig.preset("tiny"))
    path = tmp_path / run_id / "final_model.pt"
    path.parent.mkdir()
    torch.save(export_payload(model.state_dict(), model_config_dict(model), 5,
                              {"job": "pretrain", "mlflow_run_id": run_id, "tokenizer_checksum": checksum}), path)
    return path


def test_validate_only_links_the_pretraining_run_and_refuses_another_tokenizer(data, tmp_path, capsys):
    """`--validate-only --world-size 2` checks the whole job without a process group and prints `config ok:` with
    the pretraining run read from the init weights (the run the finetune run is tagged with); weights pretrained
    with another tokenizer than the task shards' are refused, naming both checksums."""
    from finetune.config import load
    from finetune.run import prepare, run_tags

    shards = as_list_override("data.overrides", data)
    out = tmp_path / "out"
    checksum = prepare(load(GIGAWORD, ["init.checkpoint=scratch", shards]), world_size=1).tokenizer_checksum
    good = _export(tmp_path, "run-good", checksum)
    assert train_main(["--validate-only", "--world-size", "2", "--config", GIGAWORD, "--init", str(good), shards,
                       f"output_dir={out}", "tracking.uri=sqlite:///" + str(tmp_path / "m.db")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("config ok:")]
    assert len(lines) == 1 and "world 2 = TP 1 x DP 2" in lines[0]
    assert f"init {good} (pretrain run run-good)" in lines[0]
    assert not out.exists() and not (tmp_path / "m.db").exists()  # validation writes nothing
    plan = prepare(load(GIGAWORD, [f"init.checkpoint={good}", shards]), world_size=1)
    assert run_tags(plan)["pretrain_run_id"] == "run-good" and run_tags(plan)["pretrain_step"] == 5

    assert train_main(["--validate-only", "--config", GIGAWORD, "--init", str(good), shards, "decode.mode=early_exit",
                       "decode.exit_layer=3"]) == 2  # checked against the model before anything runs
    assert "decode: decode.exit_layer=3: the model has 2 decoder layers" in capsys.readouterr().err

    other = _export(tmp_path, "run-other", "0123abcd")
    assert train_main(["--validate-only", "--config", GIGAWORD, "--init", str(other), shards]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"init.checkpoint: {other} was trained with the tokenizer of checksum " \
                                         f"0123abcd, but the task shards" in err
    assert f"written with the tokenizer of checksum {checksum}" in err


def test_generate_check_fails_fast_on_a_missing_split(data, shared_data, capsys):
    """`generate --check` (run by the task scripts before training) counts a split's examples, and names a split the
    task folder lacks — the GLGE samples have no test split — without needing a model."""
    from finetune.generate import main as generate_main

    task_data = as_list_override("data.overrides", data)
    valid_lines = len((shared_data / "glge" / "gigaword" / "valid.src").read_text().splitlines())
    assert generate_main(["--check", "--config", GIGAWORD, "--split", "valid", task_data]) == 0
    assert f"split 'valid' has {valid_lines} examples" in capsys.readouterr().out
    assert generate_main(["--check", "--config", GIGAWORD, "--split", "test", task_data]) == 2
    assert capsys.readouterr().err.startswith("error: --split test:")
    assert generate_main(["--check", "--split", "valid"]) == 2
    assert "--check needs --config" in capsys.readouterr().err
