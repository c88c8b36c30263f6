"""Pretraining pieces in one process: schedule, checkpoint pointer, tracking fallback, objectives, activation
checkpointing, the DeepSpeed config and the mpu adapter, and config validation that needs no data."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from pretrain import pretrain_config
from pretrain.core import checkpoint, config
from pretrain.core.schedule import WarmupDecay
from pretrain.core.tracking import Tracker, flatten

TINY = str(REPO_ROOT / "configs" / "pretrain" / "tiny.yaml")


# --- schedule -------------------------------------------------------------------------------------------------

def test_warmup_then_linear_decay():
    f = WarmupDecay("linear", warmup_steps=4, total_steps=10, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the first update is never at lr 0
    decay = [f(s) for s in range(4, 10)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] > 0.1 and abs(f(10_000) - 0.1) < 1e-12
    cos = WarmupDecay("cosine", 0, 10, 0.0)
    assert cos(0) < 1.0 and abs(cos(4) - 0.5 * (1 + math.cos(math.pi * 5 / 11))) < 1e-12
    assert WarmupDecay("inverse_sqrt", 4, 100)(15) == pytest.approx(0.5)
    assert WarmupDecay("constant", 2, 100)(50) == 1.0


# --- checkpoint pointer -----------------------------------------------------------------------------------------

def test_latest_pointer_is_atomic_and_torn_checkpoints_are_ignored(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    assert checkpoint.read_pointer(ckpt) is None  # nothing saved yet: --resume starts fresh
    (ckpt / "step_00000010").mkdir()
    checkpoint.write_atomically(ckpt / checkpoint.POINTER, "step_00000010")
    # A save that died half-way: its directory exists, but the pointer was never moved to it.
    torn = ckpt / "step_00000020"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 10)
    assert checkpoint.read_pointer(ckpt) == "step_00000010"
    assert not list(ckpt.glob(".latest.tmp*"))  # the temporary file was renamed into place
    (ckpt / checkpoint.POINTER).write_text("step_00000030")
    with pytest.raises(FileNotFoundError, match="step_00000030"):
        checkpoint.read_pointer(ckpt)
    (ckpt / checkpoint.POINTER).write_text("../../etc")
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        checkpoint.read_pointer(ckpt)


def test_prune_keeps_the_newest_and_the_current(tmp_path):
    for step in (10, 20, 30, 40):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
    checkpoint._prune(tmp_path, keep=2, current=checkpoint.tag_for(40))
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.tag_for(30), checkpoint.tag_for(40)]


# --- tracking ---------------------------------------------------------------------------------------------------

def test_tracking_failure_warns_and_keeps_a_local_record(tmp_path):
    tracker = Tracker(tmp_path, active=True, uri="nosuchscheme://nowhere", experiment="x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.start("run", {"a": {"b": 1}}, {"tp": 1}, [])
        tracker.log_metrics({"loss": 2.5, "lr": 1e-3}, step=1)
        tracker.log_metrics({"loss": 2.0}, step=2)
        tracker.finish()
    assert any("MLflow start failed" in str(w.message) for w in caught)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines if "event" in e] == ["start", "tracking_failed", "finish"]
    assert [(e["step"], e["loss"]) for e in lines if e.get("kind") == "train"] == [(1, 2.5), (2, 2.0)]


def test_tracker_is_silent_off_rank_0(tmp_path):
    tracker = Tracker(tmp_path / "out", active=False)
    assert tracker.start("run", {}, {}, []) is None
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert not (tmp_path / "out").exists()


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


# --- objectives ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel

    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    return Seq2SeqModel(ModelConfig.preset("tiny", vocab_size=256))


def make_batch(objective: str, B: int = 3, S: int = 12, T: int = 9) -> dict:
    g = torch.Generator().manual_seed(1)
    tgt = torch.randint(6, 250, (B, T), generator=g)
    tgt[0, 6:] = 0  # padding
    span = torch.arange(T).repeat(B, 1) % 5  # two spans per row: 0..4 and 0..3
    span[tgt == 0] = -1
    prev = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1).masked_fill(tgt == 0, 0)
    return {"objective": objective, "src_tokens": torch.randint(6, 250, (B, S), generator=g), "tgt_tokens": tgt,
            "prev_tokens": prev, "tgt_positions": torch.arange(1, T + 1).repeat(B, 1).masked_fill(tgt == 0, 0),
            "span_index": span, "sample_ids": torch.arange(B)}


def every_stream_row_loss(model, batch: dict, n: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """[n, B, T]: the cross entropy of every predicting-stream row, trained or not (the reference)."""
    from model.streams import build_streams

    tgt = batch["tgt_tokens"]
    streams = build_streams("bang", prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                            tgt_mask=tgt != 0, n_predict=n)
    hidden = model.decode(model.encode(batch["src_tokens"]), streams).hidden
    B, T = tgt.shape
    return model.token_loss(hidden[:, T:], tgt.repeat(1, n), label_smoothing).view(B, n, T).transpose(0, 1)


def test_bang_trains_stream_s_only_on_targets_with_s_predecessors(tiny_model):
    from model.config import SPECIAL
    from pretrain.objectives import build

    batch = make_batch("bang")
    weights = [1.0, 0.5, 0.25]
    bang = build("bang", n_streams=3, stream_weights=weights)
    loss, metrics = bang.loss(tiny_model, batch)
    real = batch["tgt_tokens"] != SPECIAL.pad
    per_stream = every_stream_row_loss(tiny_model, batch, 3)
    expected = 0.0
    for s in range(3):
        trained = real & (batch["span_index"] >= s)
        total, count = metrics[f"bang/loss_s{s}"]
        assert not total.requires_grad
        assert int(count) == int(trained.sum())  # stream 2 skips span positions 0 and 1
        reference = float((per_stream[s] * trained).sum().detach())
        assert float(total) == pytest.approx(reference, rel=1e-6)
        expected += weights[s] * reference
    assert float(loss) == pytest.approx(expected / int(real.sum()), rel=1e-6)  # normalised by the real targets
    assert bang.num_targets(batch) == int(real.sum())
    assert set(metrics) == set(bang.metric_names())
    loss.backward()
    assert tiny_model.slot_embed.grad is not None and tiny_model.slot_embed.grad.abs().sum() > 0
    tiny_model.zero_grad()


def test_elmer_exit_layers_come_from_a_checkpointable_generator(tiny_model):
    from pretrain.objectives import build

    batch = make_batch("elmer")
    elmer = build("elmer", n_layers=2, seed=7)
    state = elmer.state_dict()
    first = elmer.loss(tiny_model, batch)
    real = batch["tgt_tokens"] != 0
    exits = elmer.draw_exits(real)
    assert set(exits[real].tolist()) <= {1, 2} and (exits[~real] == 2).all()  # pads run the full depth
    elmer.load_state_dict(state)
    again = elmer.loss(tiny_model, batch)
    assert float(first[0]) == float(again[0])  # same draws after restoring the generator
    counts = sum(int(again[1][f"elmer/loss_exit{l}"][1]) for l in (1, 2))
    assert counts == int(real.sum())
    evaluated = elmer.eval_metrics(tiny_model, batch)
    assert set(evaluated) == set(elmer.eval_metric_names())
    assert float(evaluated["elmer/nar_loss"][0]) == float(evaluated["elmer/loss_exit2"][0])


def test_mix_dispatches_on_the_batch_objective(tiny_model):
    from pretrain.objectives import build, registered

    assert {"bang", "elmer", "mix"} <= set(registered())
    mix = build("mix", parts={"bang": build("bang", n_streams=2), "elmer": build("elmer", n_layers=2)},
                weights={"bang": 0.5, "elmer": 0.5})
    _, m_bang = mix.loss(tiny_model, make_batch("bang"))
    _, m_elmer = mix.loss(tiny_model, make_batch("elmer"))
    assert set(m_bang) == {"bang/loss", "bang/loss_s0", "bang/loss_s1"}
    assert "elmer/loss" in m_elmer and set(m_bang) | set(m_elmer) <= set(mix.metric_names())
    with pytest.raises(ValueError, match="not one of the mix"):
        mix.loss(tiny_model, make_batch("janus"))
    assert set(mix.state_dict()) == {"bang", "elmer"}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(dropout):
    """With dropout the recomputation must replay the same masks, including attention dropout drawn from the
    TP-region RNG tracker."""
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel
    from pretrain.core import activation_checkpointing
    from pretrain.objectives import build

    parallel.ensure_initialized(seed=0)
    grads = []
    for checkpointed in (False, True):
        parallel.seed_everything(3)  # the same default generator and tracker states for both runs
        model = Seq2SeqModel(ModelConfig.preset("tiny", vocab_size=256, dropout=dropout,
                                                attention_dropout=dropout))
        if checkpointed:
            assert activation_checkpointing.apply(model) == 4
        loss, _ = build("bang", n_streams=2).loss(model, make_batch("bang"))
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert loss_a == loss_b and grad_a.keys() == grad_b.keys()
    assert max(float((grad_a[n] - grad_b[n]).abs().max()) for n in grad_a) < 1e-6


def test_checkpointed_recompute_replays_tp_region_dropout():
    """Dropout inside tensor-parallel regions draws from megatron's RNG tracker (model/layers.py forks it at
    TP > 1); the recomputation in backward must see the tracker as it was in forward."""
    from model import parallel
    from pretrain.core import activation_checkpointing

    parallel.ensure_initialized(seed=0)

    class TrackerDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(64))

        def forward(self, x):
            with parallel.rng_tracker().fork():
                return torch.nn.functional.dropout(x * self.w, p=0.5, training=True)

    grads = []
    for checkpointed in (False, True):
        parallel.seed_everything(11)
        layer = TrackerDropout()
        if checkpointed:
            layer.forward = activation_checkpointing._checkpointed(layer.forward)
        x = torch.arange(1.0, 65.0)
        (layer(x) ** 2).sum().backward()
        grads.append(layer.w.grad.clone())
    assert torch.equal(grads[0], grads[1])


# --- DeepSpeed config and mpu -------------------------------------------------------------------------------

def test_deepspeed_dict_takes_batch_precision_and_optimizer_from_the_typed_config():
    cfg = pretrain_config.load(TINY, ["train.grad_accum=3", "optim.clip_grad=0.5", "deepspeed.precision=bf16",
                             "deepspeed.config=configs/deepspeed/zero2_offload.json"])
    ds = config.deepspeed_dict(cfg, dp_size=4, micro_batch_size=8)
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch AdamW over offloaded states
    cfg = pretrain_config.load(TINY, ["optim.impl=deepspeed", "deepspeed.precision=fp32"])
    ds = config.deepspeed_dict(cfg, dp_size=1, micro_batch_size=16)
    assert ds["optimizer"]["type"] == "AdamW" and ds["bf16"] == {"enabled": False}
    for name in ("zero1", "zero2", "zero3", "zero2_offload"):  # the reference files never set owned keys
        raw = json.loads((REPO_ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
        assert not set(raw) & set(config.DS_OWNED_KEYS)


def test_mpu_adapter_answers_what_deepspeed_asks():
    from model import parallel
    from pretrain.core.distributed import MegatronMpu

    parallel.ensure_initialized(seed=0)
    mpu = MegatronMpu()
    assert mpu.get_model_parallel_world_size() == mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_model_parallel_rank() == mpu.get_data_parallel_rank() == 0
    assert mpu.get_data_parallel_world_size() == 1 and mpu.get_data_parallel_group_ranks() == [0]
    assert mpu.get_model_parallel_group() is parallel.tp_group()
    assert mpu.get_data_parallel_group() is parallel.dp_group()


# --- config validation without data ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, world, field, words", [
    (["parallel.tensor_parallel=2", "deepspeed.config=configs/deepspeed/zero3.json"], 2, "deepspeed.config",
     "ZeRO stage 3"),
    (["parallel.tensor_parallel=2"], 3, "parallel.tensor_parallel", "does not divide the world size 3"),
    (["schedule.warmup_steps=500", "train.steps=100"], 1, "schedule.warmup_steps", "must be in [0, train.steps=100]"),
    (["deepspeed.precision=fp16"], 1, "deepspeed.precision", "fp16 is not supported"),
    (["deepspeed.config=configs/deepspeed/nope.json"], 1, "deepspeed.config", "file not found"),
    (["train.seed=-1"], 1, "train.seed", "must be in [0, 2**32), got -1"),
    ([f"train.seed={2**32}"], 1, "train.seed", f"must be in [0, 2**32), got {2**32}"),
])
def test_engine_config_errors_name_the_field(overrides, world, field, words):
    cfg = pretrain_config.load(TINY, overrides)
    with pytest.raises(config.ConfigError) as err:
        config.validate_engine(cfg, world)
    assert f"tiny.yaml: {field}" in str(err.value) and words in str(err.value)


def test_unknown_keys_and_bad_types_name_the_key():
    """A key typed on the command line is blamed on the command line, one in the YAML file on the file."""
    with pytest.raises(config.ConfigError) as err:
        pretrain_config.load(TINY, ["train.steps=5", "trian.steps=5"])
    assert str(err.value).startswith("command-line override 'trian.steps=5': Key 'trian' not in") and \
        "tiny.yaml" not in str(err.value)
    with pytest.raises(config.ConfigError, match=r"(?s)^command-line override 'train.steps=many': .*full_key: train.steps"):
        pretrain_config.load(TINY, ["train.steps=many"])


def test_a_key_in_the_yaml_file_is_blamed_on_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text() + "\ntrian:\n  steps: 5\n")
    with pytest.raises(config.ConfigError, match=rf"^{re.escape(str(bad))}: Key 'trian' not in"):
        pretrain_config.load(bad, ["train.steps=5"])


def test_seed_out_of_range_is_a_config_error_before_any_process_group(capsys):
    """Exit code 2 (the supervisor does not restart it) and the field named, not numpy's message."""
    from pretrain.run import main

    assert main(["--validate-only", "--config", TINY, "train.seed=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {TINY}: train.seed: must be in [0, 2**32), got -1"), err
    assert "numpy" not in err and "Seed must be" not in err


def test_resume_and_other_options_anywhere_on_the_command_line():
    parser = config.cli_parser("python -m pretrain", "", "")
    for argv in (["--config", TINY, "train.steps=5", "--resume", "train.log_every=1"],
                 ["--resume", "--config", TINY, "train.steps=5", "train.log_every=1"],
                 ["train.steps=5", "--config", TINY, "train.log_every=1", "--resume"]):
        args = config.parse_args(parser, argv)
        assert (args.config, args.resume, args.overrides) == (TINY, True, ["train.steps=5", "train.log_every=1"])


def test_deepspeed_json_may_not_set_what_the_typed_config_owns(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    cfg = pretrain_config.load(TINY, [f"deepspeed.config={bad}"])
    with pytest.raises(config.ConfigError, match=r"deepspeed.config: .*ds.json sets \['train_batch_size'\]"):
        config.validate_engine(cfg, 1)


def test_missing_shards_fail_before_any_process_group(tmp_path):
    """The CLI stops with exit code 2 and a message naming the missing folder; no process group, no output."""
    out = tmp_path / "out"
    env = dict(os.environ, WORLD_SIZE="2", DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", TINY, f"output_dir={out}",
                           f"data.overrides=['work_dir={tmp_path / 'nodata'}']"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: " in proc.stderr and "data.config: no shards at" in proc.stderr
    assert str(tmp_path / "nodata" / "shards" / "manifest.json") in proc.stderr
    assert not out.exists()


# --- the command line and the job around the engine ---------------------------------------------------------

def test_validate_only_and_world_size_flags(capsys, tmp_path):
    """--validate-only reports a ConfigError as `error: ...` with exit code 2, like a training job; --world-size
    belongs to --validate-only. (The `config ok:` path needs shards: tests/test_pretrain_distributed.py.)"""
    from pretrain.run import main

    out = tmp_path / "out"
    assert main(["--validate-only", "--world-size", "3", "--config", TINY, "parallel.tensor_parallel=2",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "parallel.tensor_parallel: =2 does not divide the world size 3" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--world-size", "2", "--config", TINY])
    assert exit_.value.code == 2
    assert "--world-size goes with --validate-only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--validate-only", "--world-size", "0", "--config", TINY])
    assert exit_.value.code == 2 and "--world-size must be >= 1, got 0" in capsys.readouterr().err


def test_validate_only_json_states_the_stage_facts_even_for_a_refused_config(capsys, tmp_path):
    """--validate-only --json: one JSON object with the verdict and what the launcher needs (folders, pointer,
    layout, store, inputs, shard folders), also when the config is refused (exit 2: no shards here); --json goes
    with --validate-only."""
    import json

    from pretrain.run import main

    nodata = tmp_path / "nodata"
    argv = ["--validate-only", "--json", "--world-size", "4", "--config", TINY, f"output_dir={tmp_path / 'o'}",
            f"checkpoint.dir={tmp_path / 'c'}", "parallel.tensor_parallel=2", "tracking.uri=sqlite:////x/m.db",
            "data.num_workers=3", f"data.overrides=['work_dir={nodata}']", "data.eval_overrides=[]"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["stage"], report["world_size"], report["ok"], report["message"]) == ("pretrain", 4, False, None)
    assert "data.config: no shards at" in report["error"] and captured.err == f"error: {report['error']}\n"
    assert (report["output_dir"], report["checkpoint_dir"], report["latest_pointer"]) == \
        (str(tmp_path / "o"), str(tmp_path / "c"), checkpoint.POINTER)
    assert (report["tensor_parallel"], report["mlflow"], report["tracking_uri"]) == (2, True, "sqlite:////x/m.db")
    assert report["config_file"] == TINY
    assert [i["field"] for i in report["inputs"]] == ["deepspeed.config", "data.config"]
    assert report["shards"] == [{"field": "data.config", "dir": str(nodata / "shards"), "training": True,
                                 "num_workers": 3, "num_shards": None, "num_samples": None,
                                 "problem": "manifest.json missing",
                                 "build": f"python -m data_pipeline prepare --config configs/data/tiny.yaml "
                                          f"work_dir={nodata}"}]
    assert main(["--validate-only", "--json", "--config", TINY, "trian.steps=1"]) == 2  # not even loadable
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and "trian" in report["error"] and "output_dir" not in report
    with pytest.raises(SystemExit) as exit_:
        main(["--json", "--config", TINY])
    assert exit_.value.code == 2 and "--json goes with --validate-only" in capsys.readouterr().err


def test_stop_signals_raise_once_and_wait_for_cleanup():
    """Inside stop_on_signals a SIGTERM raises Stopped; a signal inside signals_deferred is held until the block
    ends; outside the block the previous handler is back."""
    import signal

    from pretrain.core import job

    before = signal.getsignal(signal.SIGTERM)
    with job.stop_on_signals():
        with pytest.raises(job.Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes, at the latest here
                time.sleep(0.001)
        assert stopped.value.signum == signal.SIGTERM and str(stopped.value) == "stopped by SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # a repeat is recorded, not raised
        time.sleep(0.05)
        assert job.stop_signal() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before

    cleaned = []
    with job.stop_on_signals():
        with pytest.raises(job.Stopped) as stopped:
            with job.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                cleaned.append("after the signal")  # the cleanup ran to its end
        assert cleaned == ["after the signal"] and stopped.value.signum == signal.SIGINT


def test_tracking_store_default_env_and_launch_tags(monkeypatch):
    """One default store for pretraining and finetuning, an absolute path under the repository; tracking.uri wins
    over $MLFLOW_TRACKING_URI, which wins over the default. The launcher's ids become tags."""
    from finetune.tracking import resolve_uri as finetune_uri
    from pretrain.core.tracking import artifact_root, launch_tags, resolve_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{REPO_ROOT / 'runs' / 'mlflow.db'}"
    assert resolve_uri("") == resolve_uri(None) == finetune_uri("") == default
    assert default.startswith("sqlite:////")  # absolute: the same store from any working directory
    assert artifact_root(default) == REPO_ROOT / "runs" / "mlartifacts"
    assert artifact_root("http://mlflow:5000") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_uri("") == finetune_uri("") == "http://mlflow:5000"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert launch_tags({"TANDEM_LAUNCH_ID": "20260101-abc", "TANDEM_RESTART": "2", "OTHER": "x"}) == \
        {"tandem.launch_id": "20260101-abc", "tandem.restart": "2"}
    assert launch_tags({"TANDEM_LAUNCH_ID": ""}) == {}
