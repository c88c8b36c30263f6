"""Tracking in one process, against a real MLflow sqlite store and, for an MLflow that is away, a 127.0.0.1 port
nothing listens on (tests/test_tracking_server.py stops a real `mlflow server` under a training run):

- a resumed job reopens its run and logs the params it changed under resume.<n>.* (MLflow params cannot change);
  the shard folders are the run's datasets with the manifest's digest; the experiment is a training experiment;
  the run carries MLflow's source tags; replaying the whole metrics.jsonl again duplicates nothing;
- a job that ran while MLflow was away leaves everything in metrics.jsonl, and `python -m pretrain.core backfill`
  creates its run from it, with every point and the outage counted, and closes it with the job's status.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pretrain.core.mlflow_sync import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT, resume_changes
from pretrain.core.tracking import HTTP_LIMITS, Tracker, shard_dataset, source_tags
from test_pretrain_distributed import TEST_DATA, pretrain_shards  # noqa: F401  (the shard fixture)


def events(out: Path) -> list[str]:
    return [json.loads(line).get("event") for line in (out / "metrics.jsonl").read_text().splitlines()
            if "event" in json.loads(line)]


def history(client, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_resume_changes_are_taken_against_the_values_the_run_says_now():
    assert resume_changes({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) == {}
    assert resume_changes({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == \
        {"resume.1.b": "3", "resume.1.c": "4"}
    existing = {"a": "1", "b": "2", "resume.1.b": "3", "resume.1.at_step": "10", "resume.2.b": "5",
                "resume.2.at_step": "20"}
    assert resume_changes(existing, {"a": "1", "b": "5"}) == {}  # the latest resume's value is the current one
    assert resume_changes(existing, {"a": "1", "b": "3"}) == {"resume.3.b": "3"}  # back to an earlier value


def test_shard_dataset_digest_follows_the_shards(pretrain_shards, tmp_path):
    shards = TEST_DATA / "shards"
    entry = shard_dataset(shards, "training")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert (entry["name"], entry["source"], entry["context"]) == ("pretrain/shards", str(shards.resolve()), "training")
    assert json.loads(entry["profile"]) == {"num_samples": manifest["num_samples"],
                                            "num_tokens": manifest["num_tokens"], "num_shards": len(manifest["shards"])}
    assert len(entry["digest"]) == 32 and int(entry["digest"], 16) >= 0
    copy = tmp_path / "copy" / "shards"
    copy.mkdir(parents=True)
    shutil.copy(shards / "manifest.json", copy / "manifest.json")
    assert shard_dataset(copy, "training")["digest"] == entry["digest"]  # the same shards wherever they are
    manifest["shards"][1]["sha256"] = "0" * 64  # one shard rewritten
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert shard_dataset(copy, "training")["digest"] != entry["digest"]


def test_a_resumed_job_reopens_its_run_and_logs_what_it_changed(pretrain_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from pretrain.core.mlflow_sync import backfill

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("e")  # made elsewhere, without the kind tag: MLflow 3 would open it as GenAI
    out = tmp_path / "out"
    datasets = [(TEST_DATA / "shards", "training"), (TEST_DATA / "heldout" / "shards", "validation")]
    tags = {"kind": "pretrain", **source_tags()}
    config = tmp_path / "config.yaml"
    config.write_text("train: {steps: 30}\n")

    attempts = [(30, 0, "KILLED"), (40, 10, "KILLED"), (40, 20, "KILLED"), (50, 30, "FINISHED")]
    run_id = None
    for steps, at, status in attempts:
        tracker = Tracker(out, active=True, uri=uri, experiment="e")
        started = tracker.start("r", {"train": {"steps": steps}, "seed": 1}, tags, [(config, "config")],
                                resume_run_id=run_id, datasets=datasets, step=at)
        assert started is not None and started == (run_id or started)  # the resumed attempts reopen the first run
        run_id = started
        for step in range(at + 5, at + 11, 5):
            tracker.log_metrics({"loss": 10.0 / step, "lr": 1e-3, "nan_stays_local": float("nan")}, step)
        tracker.finish(status)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "30", "seed": "1", "resume.1.train.steps": "40",
                               "resume.1.at_step": "10", "resume.2.train.steps": "50", "resume.2.at_step": "30"}
    expected = [(s, 10.0 / s) for s in range(5, 41, 5)]
    assert history(client, run_id) == expected
    assert "train/nan_stays_local" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id, "config")} == {"config/config.yaml"}
    inputs = {(d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"], d.tags[0].value)
              for d in run.inputs.dataset_inputs}
    assert inputs == {(e["name"], e["digest"], e["source"], e["context"])
                      for e in (shard_dataset(folder, context) for folder, context in datasets)}
    assert client.get_experiment_by_name("e").tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and len(run.data.tags["mlflow.source.git.commit"]) in (40, 7)
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.runName"] == "r"
    assert "tandem.mlflow_outages" not in run.data.tags  # MLflow was there all along

    # Every line sent again (as if no job had ever been confirmed): nothing changes in MLflow.
    jsonl = out / "metrics.jsonl"
    jsonl.write_text("".join(line + "\n" for line in jsonl.read_text().splitlines()
                             if json.loads(line).get("event") != "mlflow_synced"))
    assert backfill(out, echo=lambda _: None) is True
    again = client.get_run(run_id)
    assert again.data.params == run.data.params and again.info.status == "FINISHED"
    assert history(client, run_id) == expected and len(again.inputs.dataset_inputs) == 2
    assert len(client.search_runs([client.get_experiment_by_name("e").experiment_id])) == 1


def test_a_job_that_ran_while_mlflow_was_away_is_backfilled_by_the_command(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from conftest import free_port
    from pretrain.core.__main__ import main

    for var, value in HTTP_LIMITS.items():  # what the Tracker sets in a training process (restored afterwards)
        monkeypatch.setenv(var, value)
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "out"
    tracker = Tracker(out, active=True, uri=away, experiment="away", finish_wait_s=0)
    assert tracker.start("offline", {"train": {"steps": 3}}, {"kind": "pretrain"}, []) is None  # no run yet
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 4.0 - step}, step)
    tracker.finish("KILLED")
    err = capsys.readouterr().err
    assert "training goes on, figures are kept in" in err
    assert f"Once it is back, send them and close the run with:\n    python -m pretrain.core backfill {out}" in err
    assert events(out) == ["start", "mlflow_unreachable", "finish", "mlflow_pending"]

    assert main(["backfill", str(out)]) == 1  # still away: nothing lost, try again later
    assert "nothing lost, run this again once MLflow is reachable" in capsys.readouterr().err
    assert main(["backfill", str(tmp_path / "nowhere")]) == 2

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the server came back elsewhere
    assert main(["backfill", str(out), "--tracking-uri", store]) == 0
    assert "5 record(s) sent to run" in capsys.readouterr().out  # start, 3 windows, finish
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("away").experiment_id])
    assert (run.info.status, run.info.run_name, run.data.params, run.data.tags["kind"]) == \
        ("KILLED", "offline", {"train.steps": "3"}, "pretrain")
    assert history(client, run.info.run_id) == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert run.data.tags["tandem.mlflow_outages"] == "1"  # away from start to finish: one outage, counted
    assert 0 < float(run.data.tags["tandem.mlflow_outage_s"]) < 120
    assert main(["backfill", str(out), "--tracking-uri", store]) == 0
    assert "already in MLflow" in capsys.readouterr().out
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
