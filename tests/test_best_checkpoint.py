"""Best checkpoints, early stopping and checkpoint averaging (pretrain/core/best.py, pretrain/core/averaging.py, the
engine's hooks): the rules by hand, then two real finetuning runs under torchrun (2 processes, gloo, DeepSpeed) on
the Gigaword test shards (tests/finetune_helpers.py), tiny model (dropout 0) from scratch, fp32, a few steps, run at
the same time:

  (a) ZeRO-3, DP=2: checkpoint.keep_best=nar/loss with 2 kept, keep_last=1, export_from=best, average=2. The kept
      checkpoints are the two best evaluations of metrics.jsonl, pruning left them, and final_model.pt holds the
      mean of their weights read back from DeepSpeed's ZeRO-3 files (zero_to_fp32), value by value, and says so
      (its `export` record, the MLflow params export.*).
  (b) ZeRO-1, DP=2, a learning rate that makes the held-out loss climb: train.early_stop_patience=2 stops at the
      first evaluation that ends two in a row without a new best (derived here from metrics.jsonl), and
      average=3 of the last weights exports the mean of the final weights (in memory, gathered by the engine) and
      the two newest checkpoints before them.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune_helpers import ENV, GIGAWORD, REPO_ROOT, as_list_override, build_test_data, train_losses

WEIGHT_TOL = 1e-6  # fp32 means of the same tensors, summed in another order at most


# --- the rules, by hand ---------------------------------------------------------------------------------------

def test_directions_come_from_one_table():
    from pretrain.core import best

    assert [best.direction(n) for n in ("rouge1", "eval/gen/rouge1", "gen/bleu4", "gen/task_score", "meteor")] == \
        ["max"] * 5
    assert [best.direction(n) for n in ("loss", "nar/loss", "eval/nar/token_loss", "elmer/loss_exit3",
                                        "janus/kl_ar_content", "ppl")] == ["min"] * 6
    with pytest.raises(ValueError, match="'janus/ar': no known direction"):
        best.direction("janus/ar")
    with pytest.raises(ValueError, match="not among the metrics"):
        best.check_keep_best("gen/rouge1", ["nar/loss", "nar/token_loss"])
    best.check_keep_best("eval/nar/loss", ["nar/loss"])


def test_ranking_patience_and_state_by_hand():
    from pretrain.core.best import BestCheckpoints

    ranking = BestCheckpoints("gen/rouge1", count=2, patience=3)
    # step: value -> kept?, evaluations since the best, entries (step, value) best first
    expected = [(1, 1.0, True, 0, [(1, 1.0)]),
                (2, 3.0, True, 0, [(2, 3.0), (1, 1.0)]),
                (3, 2.0, True, 1, [(2, 3.0), (3, 2.0)]),
                (4, 3.0, True, 2, [(2, 3.0), (4, 3.0)]),  # a tie is no new best; the earlier step stays ahead
                (5, math.nan, False, 3, [(2, 3.0), (4, 3.0)])]
    for step, value, kept, since, entries in expected:
        assert ranking.observe(step, value) is kept, step
        assert ranking.since_best == since and [(e.step, e.value) for e in ranking.entries] == entries, step
        assert ranking.should_stop() is (since >= 3)
    assert ranking.observe(5, 9.0) is False and ranking.since_best == 3  # the end-of-run evaluation of step 5
    assert ranking.tags() == {"step_00000002", "step_00000004"} and ranking.steps(1) == [2]

    again = BestCheckpoints("eval/gen/rouge1", count=2, patience=3)
    assert again.load_state_dict(json.loads(json.dumps(ranking.state_dict())))
    assert (again.entries, again.since_best, again.last_step) == (ranking.entries, 3, 5)
    assert not BestCheckpoints("nar/loss").load_state_dict(ranking.state_dict())

    loss = BestCheckpoints("nar/loss", count=1)
    assert [loss.observe(s, v) for s, v in ((1, 5.0), (2, 4.0), (3, 4.5))] == [True, True, False]
    assert [(e.step, e.value) for e in loss.entries] == [(2, 4.0)] and loss.since_best == 1


def test_pruning_never_removes_a_protected_checkpoint(tmp_path):
    from pretrain.core import checkpoint

    for protected, left in (((), [5, 6]), ({"step_00000002"}, [2, 5, 6])):
        folder = tmp_path / str(len(protected))
        for step in range(1, 7):
            (folder / checkpoint.tag_for(step)).mkdir(parents=True)
        checkpoint._prune(folder, keep=2, current=checkpoint.tag_for(6), protected=protected)
        assert sorted(int(p.name[5:]) for p in folder.iterdir()) == left


def test_average_states_is_the_parameter_wise_mean():
    from pretrain.core.averaging import average_states

    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=gen), "h": torch.randn(5, generator=gen).bfloat16(),
               "n": torch.tensor([7 + i]), "_extra_state": None} for i in range(3)]
    mean = average_states(iter(states))
    assert torch.allclose(mean["w"], torch.stack([s["w"] for s in states]).mean(0), rtol=0, atol=1e-7)
    assert torch.allclose(mean["h"], torch.stack([s["h"].float() for s in states]).mean(0), rtol=0, atol=1e-7)
    assert mean["w"].dtype == mean["h"].dtype == torch.float32
    assert mean["n"].tolist() == [7] and mean["_extra_state"] is None  # not averaged: the first's
    with pytest.raises(ValueError, match="different tensors"):
        average_states([states[0], {"w": states[1]["w"]}])
    with pytest.raises(ValueError, match="shape"):
        average_states([states[0], {**states[1], "w": torch.zeros(4, 3)}])


def test_export_choice_by_hand(tmp_path):
    from pretrain.core.averaging import choose
    from pretrain.core.best import BestCheckpoints

    for step in (2, 4, 6, 8):
        (tmp_path / f"step_{step:08d}").mkdir()
    (tmp_path / "latest").write_text("step_00000006")  # step 8: a save that never completed
    ranking = BestCheckpoints("nar/loss", count=2)
    for step, value in ((2, 3.0), (4, 1.0), (6, 2.0)):
        ranking.observe(step, value)
    last3 = choose(SimpleNamespace(export_from="last", average=3), ranking, tmp_path, 10)
    assert (last3.steps, last3.step) == ([10, 6, 4], 10)
    assert choose(SimpleNamespace(export_from="last", average=1), None, tmp_path, 10).steps == [10]
    best2 = choose(SimpleNamespace(export_from="best", average=2), ranking, tmp_path, 10)
    assert (best2.steps, best2.step, best2.record()["values"]) == ([4, 6], 6, [1.0, 2.0])
    assert best2.params() == {"export": {"source": "best", "steps": "4,6", "averaged": 2, "final_step": 10,
                                         "metric": "nar/loss"}}


@pytest.mark.parametrize("overrides, field", [
    (["checkpoint.keep_best=janus/ar"], "checkpoint.keep_best: 'janus/ar': no known direction"),
    (["checkpoint.keep_best=nar/loss", "eval.every_steps=0", "eval.at_end=false"], "checkpoint.keep_best: needs"),
    (["checkpoint.export_from=best"], "checkpoint.export_from: best needs checkpoint.keep_best"),
    (["checkpoint.export_from=first"], "checkpoint.export_from: must be one of"),
    (["checkpoint.keep_best=nar/loss", "checkpoint.export_from=best", "checkpoint.average=3"],
     "checkpoint.average: =3 averages the best checkpoints, but only checkpoint.keep_best_count=1"),
    (["checkpoint.average=2", "checkpoint.every_steps=0"], "checkpoint.average: =2 averages the last checkpoints, "
                                                           "but checkpoint.every_steps is 0"),
    (["checkpoint.average=3", "checkpoint.every_steps=10", "checkpoint.keep_last=2"], "checkpoint.keep_last=2 keeps"),
    (["train.early_stop_patience=2"], "train.early_stop_patience: watches"),
    (["train.early_stop_patience=-1"], "train.early_stop_patience: must be >= 0"),
])
def test_engine_config_refuses_what_cannot_work(overrides, field):
    from configs import ConfigError
    from finetune.config import load
    from pretrain import core

    cfg = load(GIGAWORD, ["task.epochs=0", *overrides])
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        core.validate_engine(cfg, 1)


def test_finetune_refuses_a_metric_its_evaluation_does_not_report(shared_data):
    from configs import ConfigError
    from finetune.config import load
    from finetune.run import prepare

    data = build_test_data(shared_data)
    base = [as_list_override("data.overrides", data), "init.checkpoint=scratch", "task.epochs=0", "train.steps=5",
            "schedule.warmup_steps=1"]
    cfg = load(GIGAWORD, [*base, "checkpoint.keep_best=gen/rouge1", "valid_generation.samples=0"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best: 'gen/rouge1' is not among the metrics this job's "
                                          r"evaluation reports: \['ar/loss'\]"):
        prepare(cfg, 1)
    cfg = load(GIGAWORD, [*base, "checkpoint.keep_best=gen/rouge1", "valid_generation.samples=4"])
    assert prepare(cfg, 1).cfg.checkpoint.keep_best == "gen/rouge1"


# --- real runs ------------------------------------------------------------------------------------------------

def finetune_args(data: list[str], out: Path, uri: str, extra: list[str]) -> list[str]:
    return ["-m", "finetune", "--config", GIGAWORD, "--init", "scratch", as_list_override("data.overrides", data),
            "objective.name=nar", "task.epochs=0", "train.log_every=1", "train.progress_bar=false",
            "schedule.decay=constant", "data.batch_size=8", "data.max_source_len=32", "valid_generation.samples=0",
            "deepspeed.precision=fp32", f"output_dir={out}", f"tracking.uri={uri}",
            "tracking.experiment=best-checkpoints", *extra]


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory) -> dict:
    from conftest import free_port

    data = build_test_data(shared_data)
    root = tmp_path_factory.mktemp("best")
    # one store per run: two jobs creating the same fresh sqlite store at once can race (README: a server for that)
    uris = {name: f"sqlite:///{root / name}.db" for name in ("best", "early")}
    settings = {
        "best": ["train.steps=6", "optim.lr=1e-3", "schedule.warmup_steps=2", "eval.every_steps=2", "eval.batches=2",
                 "checkpoint.every_steps=2", "checkpoint.keep_last=1", "checkpoint.keep_best=nar/loss",
                 "checkpoint.keep_best_count=2", "checkpoint.export_from=best", "checkpoint.average=2",
                 "deepspeed.config=configs/deepspeed/zero3.json"],
        "early": ["train.steps=14", "optim.lr=0.3", "optim.clip_grad=0", "schedule.warmup_steps=0",
                  "eval.every_steps=1", "eval.batches=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3",
                  "checkpoint.keep_best=eval/nar/loss", "train.early_stop_patience=2", "checkpoint.average=3",
                  "deepspeed.config=configs/deepspeed/zero1.json"],
    }
    procs = {}
    for name, extra in settings.items():
        cmd = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *finetune_args(data, root / name, uris[name], extra)[1:]]
        procs[name] = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, env=ENV, stderr=subprocess.STDOUT,
                                       stdout=open(root / f"{name}.log", "w"))
    for name, proc in procs.items():
        code = proc.wait(timeout=600)
        assert code == 0, f"{name} failed ({code}):\n{(root / f'{name}.log').read_text()[-6000:]}"
    return {"root": root, "uris": uris}


def evaluations(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["nar/loss"] for r in records if r.get("kind") == "eval"}


def export(output_dir: Path) -> dict:
    return torch.load(output_dir / "final_model.pt", map_location="cpu", weights_only=False)


def checkpoint_weights(output_dir: Path, step: int) -> dict:
    from pretrain.core import read_weights

    return read_weights(output_dir / "checkpoints" / f"step_{step:08d}").shards[0]


def assert_mean_of(exported: dict, states: list[dict]) -> None:
    tensors = [k for k, v in exported.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 50 and all(set(tensors) <= set(s) for s in states)
    for name in tensors:
        mean = torch.stack([s[name].float() for s in states]).mean(0)
        assert torch.allclose(exported[name].float(), mean, rtol=0, atol=WEIGHT_TOL), name
    # and not simply one of them: the runs' weights moved between the averaged steps
    assert max((exported[n].float() - states[0][n].float()).abs().max().item() for n in tensors) > 1e-4


def test_best_checkpoints_kept_and_averaged_under_zero3(runs):
    from pretrain.core import read_weights
    from finetune.tracking import client

    out = runs["root"] / "best"
    evals = evaluations(out)
    assert sorted(evals) == [2, 4, 6]
    best = sorted(evals, key=lambda s: (evals[s], s))[:2]
    kept = json.loads((out / "checkpoints" / "best.json").read_text())
    assert [e["step"] for e in kept["entries"]] == best
    assert [e["value"] for e in kept["entries"]] == pytest.approx([evals[s] for s in best], abs=1e-12)
    on_disk = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert on_disk == sorted({*best, 6}), "keep_last=1 must not prune a best checkpoint"

    payload = export(out)
    assert payload["export"]["steps"] == best and payload["export"]["source"] == "best"
    assert payload["step"] == max(best) and payload["export"]["final_step"] == 6
    assert read_weights(out / "final_model.pt").meta["export"]["steps"] == best
    assert_mean_of(payload["model"], [checkpoint_weights(out, s) for s in best])
    assert "[average] 2/2 ckpt (100%)" in (runs["root"] / "best.log").read_text()  # progress off a terminal
    run_id = payload["mlflow_run_id"]
    params = client(runs["uris"]["best"]).get_run(run_id).data.params
    assert (params["export.source"], params["export.steps"], params["export.averaged"]) == \
        ("best", ",".join(map(str, best)), "2")


def test_early_stop_and_average_of_the_last_checkpoints(runs):
    from finetune.tracking import client

    out = runs["root"] / "early"
    evals = evaluations(out)
    since, best, stop = 0, math.inf, None
    for step in sorted(evals):  # the rule: two evaluations in a row without a new best
        since, best = (0, evals[step]) if evals[step] < best else (since + 1, best)
        if since == 2:
            stop = step
            break
    assert stop is not None and stop < 14, f"the loss never failed to improve twice: {evals}"
    assert max(evals) == stop and max(train_losses(out)) == stop
    assert f"[finetune] early stop at step {stop}: 2 evaluations without a new best" in \
        (runs["root"] / "early.log").read_text()

    payload = export(out)
    assert payload["export"]["steps"] == [stop, stop - 1, stop - 2] and payload["export"]["source"] == "last"
    assert_mean_of(payload["model"], [checkpoint_weights(out, s) for s in (stop, stop - 1, stop - 2)])
    params = client(runs["uris"]["early"]).get_run(payload["mlflow_run_id"]).data.params
    assert params["train.stopped_early_at"] == str(stop) and params["export.steps"] == f"{stop},{stop - 1},{stop - 2}"
