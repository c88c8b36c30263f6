"""Checkpoint faults, with real processes (torchrun, 2 processes, gloo), real DeepSpeed (ZeRO-1) and the tiny model
on real shards: the Checkpoints rows of docs/reliability.md.

The reference run trains STEPS steps at DP=2 and checkpoints every EVERY steps (step_2, step_4), on a copy of the
test shards with garbage in three samples of its first two steps and `loader.on_corrupt_shard=skip`, so it also
shows the loader's skip counts reaching metrics.jsonl and MLflow (summed over the data-parallel ranks). Every
other run starts from a copy of its checkpoints and must give the reference's figures, step by step:

- a truncated file in the latest checkpoint: the resume names the file, falls back to the previous checkpoint
  and continues with the reference's losses;
- a checkpoint whose files match its manifest but do not load (a file written broken): the attempt fails, the
  tag is marked broken and `latest` moves back, so the supervisor's restart resumes from the previous checkpoint
  and never tries the broken one again;
- a rank killed inside a checkpoint write (the TANDEM_TEST_PAUSE_IN_SAVE hook holds it between two files): the
  next start resumes from the previous checkpoint;
- a write that fails (a file-size limit, RLIMIT_FSIZE, on the ranks: EFBIG takes the path ENOSPC takes, without
  root or a small file system): a clear error naming the folder, the previous checkpoint intact.

Tolerance: 0. fp32 on CPU, the same ranks, data split and summation order: a resumed run repeats the reference's
figures bit for bit (as in test_pretrain_distributed.py's resume test).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_bad_input import damage_payloads  # noqa: E402
from test_pretrain_distributed import (DATA_CONFIG, DATA_OVERRIDES, ENV, REPO_ROOT, TEST_DATA, TINY,  # noqa: E402
                                       base_overrides, pretrain_shards, train_records)

from pretrain.core import checkpoint_manifest as manifest  # noqa: E402

STEPS, EVERY = 6, 2
SEED = 1234  # configs/pretrain/tiny.yaml train.seed
COMPARED = ("loss", "bang/loss_s0", "elmer/loss", "grad_norm", "lr", "samples_seen")
MLFLOW_EXPERIMENT = "tandem-pretrain"

__all__ = ["pretrain_shards"]  # the fixture, imported for this module's runs


def tag(step: int) -> str:
    return f"step_{step:08d}"


def torchrun(args: list[str], log: Path, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain", "--config", TINY, *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=preexec_fn)


def finish(proc: subprocess.Popen, log: Path, code: int | None = 0, timeout: int = 400) -> str:
    """Wait; returns the log. code: the exit code wanted (None: any non-zero)."""
    got = proc.wait(timeout=timeout)
    text = log.read_text(errors="replace")
    assert (got != 0) if code is None else (got == code), f"exit code {got}:\n{text[-6000:]}"
    return text


@pytest.fixture(scope="module")
def damaged_shards(pretrain_shards, shared_data, tmp_path_factory) -> tuple[list[str], dict[int, int]]:
    """A copy of the test shards with garbage in one sample of data-parallel rank 0's first batch and two of rank
    1's second batch; returns the overrides that train on it (skipping bad samples, size check only) and the skip
    count the run must log at each step."""
    from data_pipeline.config import load_config
    from data_pipeline.shards import load_manifest
    from data_pipeline.stream import build_pretrain_loader

    copy = shutil.copytree(TEST_DATA / "shards", tmp_path_factory.mktemp("ckpt-data") / "shards")
    data = [*DATA_OVERRIDES, f"data_root={shared_data}", f"loader.shard_dir={copy}", "loader.verify=size",
            "loader.on_corrupt_shard=skip"]
    cfg = load_config(REPO_ROOT / DATA_CONFIG, data)
    first = {}
    for rank in (0, 1):  # the planned batches (the plan reads only manifest.json and lengths.npy)
        batches = iter(build_pretrain_loader(cfg, dp_rank=rank, dp_world_size=2, seed=SEED,
                                             objective_weights={"bang": 0.5, "elmer": 0.5}, num_workers=0))
        first[rank] = [next(batches)["sample_ids"].tolist() for _ in range(2)]
    victims = [first[0][0][3], first[1][1][0], first[1][1][5]]
    for entry in load_manifest(copy)["shards"]:
        first, count = entry["first_id"], entry["samples"]
        members = [i - first for i in victims if first <= i < first + count]
        if members:
            damage_payloads(copy, entry["name"], members)
    overrides = ["data.overrides=[" + ",".join(f"'{o}'" for o in data) + "]", "data.eval_overrides=[]"]
    return overrides, {1: 1, **{s: 3 for s in range(2, STEPS + 1)}}


def run_args(out: Path, data: list[str], extra: list[str] = ()) -> list[str]:
    return [*base_overrides(out, STEPS), *data, f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0",
            "eval.at_end=false", "eval.batches=0", *extra]


@pytest.fixture(scope="module")
def reference(damaged_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt-reference")
    log = out.parent / f"{out.name}.log"
    tracked = ["tracking.mlflow=true", f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    finish(torchrun(run_args(out, damaged_shards[0], tracked), log), log)
    assert (out / "checkpoints" / "latest").read_text() == tag(2 * EVERY)
    return out


def copy_checkpoints(reference: Path, out: Path, steps: list[int]) -> Path:
    """The reference's checkpoints at `steps` in out/checkpoints, `latest` naming the last."""
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    for step in steps:
        shutil.copytree(reference / "checkpoints" / tag(step), ckpt / tag(step))
    (ckpt / "latest").write_text(tag(steps[-1]))
    return ckpt


def data_records(out: Path) -> dict[int, dict]:
    """The `data` records of metrics.jsonl (the loader's skip counts, data/... in MLflow) by step."""
    entries = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {e["step"]: e for e in entries if e.get("kind") == "data"}


def assert_continues_reference(reference: Path, out: Path, first_step: int) -> None:
    """out's training records (and skip counts) from first_step on equal the reference's, value by value
    (tolerance 0)."""
    ref, got = train_records(reference), train_records(out)
    assert sorted(got) == list(range(first_step, STEPS + 1)), sorted(got)
    for step in got:
        for key in COMPARED:
            assert got[step].get(key) == ref[step].get(key), (step, key, got[step].get(key), ref[step].get(key))
    ref_data, got_data = data_records(reference), data_records(out)
    for step in got:
        for key in ("samples_skipped", "shards_skipped"):
            assert got_data[step][key] == ref_data[step][key], (step, key, got_data[step][key], ref_data[step][key])


def assert_intact(tag_dir: Path) -> None:
    recorded = manifest.read(tag_dir)
    assert recorded is not None and manifest.check_share(tag_dir, recorded, 0, 1) == []
    assert manifest.broken_note(tag_dir) is None


# --- what a checkpoint records; data skips reach the log and MLflow -------------------------------------------

def test_checkpoints_record_their_files_and_the_skip_counts_reach_the_log(reference, damaged_shards):
    tag_dir = reference / "checkpoints" / tag(2 * EVERY)
    recorded = manifest.read(tag_dir)
    names = set(recorded["files"])
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank_00000.pt", "rank_00001.pt"} <= names
    assert names == set(manifest.data_files(tag_dir))  # every file of the tag, nothing else
    same = subprocess.run([sys.executable, "-m", "pretrain", "--validate-only", "--world-size", "2", "--config", TINY,
                           *run_args(reference, damaged_shards[0]), "--resume"],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stdout + same.stderr  # the job that wrote it can continue it
    for rel, entry in recorded["files"].items():
        assert entry["size"] == (tag_dir / rel).stat().st_size and entry["sha256"] == manifest.sha256(tag_dir / rel)
    assert (recorded["step"], recorded["layout"], recorded["objective"]) == \
        (2 * EVERY, {"world_size": 2, "tensor_parallel": 1}, "mix")
    assert recorded["config"]["checkpoint"]["every_steps"] == EVERY
    assert recorded["loader"]["plan_facts"]["batching"]["batch_size"] == 8

    expected = damaged_shards[1]
    data = data_records(reference)
    assert {s: data[s]["samples_skipped"] for s in data} == expected  # summed over both dp ranks
    assert all(data[s]["shards_skipped"] == 0 for s in data)
    assert train_records(reference)[STEPS]["samples_seen"] == STEPS * 2 * 8 - 3  # the skipped ones not trained on
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{reference / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id])
    history = client.get_metric_history(run.info.run_id, "data/samples_skipped")
    assert {m.step: m.value for m in history} == expected
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "data/shards_skipped")} == \
        {s: 0.0 for s in expected}


# --- a broken checkpoint never costs the run ----------------------------------------------------------------

def test_a_truncated_file_falls_back_to_the_previous_checkpoint(reference, damaged_shards, tmp_path):
    out = tmp_path / "out"
    ckpt = copy_checkpoints(reference, out, [EVERY, 2 * EVERY])
    victim = ckpt / tag(2 * EVERY) / "mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    log = tmp_path / "resume.log"
    text = finish(torchrun([*run_args(out, damaged_shards[0]), "--resume"], log), log)
    assert (f"WARNING: checkpoint {ckpt / tag(2 * EVERY)} is broken: mp_rank_00_model_states.pt: {size // 2} bytes, "
            f"checkpoint.json says {size} (truncated or rewritten); falling back to {ckpt / tag(EVERY)}") in text
    assert f"resumed from {ckpt / tag(EVERY)} at step {EVERY}" in text
    assert_continues_reference(reference, out, EVERY + 1)
    assert (ckpt / "latest").read_text() == tag(2 * EVERY)  # written again by this run, whole
    assert_intact(ckpt / tag(2 * EVERY))


def test_a_checkpoint_that_fails_to_load_is_never_tried_again(reference, damaged_shards, tmp_path):
    """Rank 1's optimizer partition is cut short and the manifest made to match (a file written broken): it
    verifies, then fails to load on rank 1 only. The launcher's supervisor restarts the job once; the restart
    resumes from the previous checkpoint, because the failing rank marked the tag and moved `latest` back."""
    out = tmp_path / "out"
    ckpt = copy_checkpoints(reference, out, [EVERY, 2 * EVERY])
    broken = ckpt / tag(2 * EVERY)
    victim = broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    recorded = json.loads((broken / manifest.MANIFEST).read_text())
    recorded["files"][victim.name] = {"size": victim.stat().st_size, "sha256": manifest.sha256(victim)}
    (broken / manifest.MANIFEST).write_text(json.dumps(recorded))

    cmd = [sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml", "launcher=torchrun",
           "--max-restarts", "1", "restart.backoff_s=0", f"run_dir={tmp_path / 'launch'}", "--", "pretrain",
           "--config", TINY, *run_args(out, damaged_shards[0]), "--resume"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    assert re.search(rf"CheckpointLoadError: {re.escape(str(broken))} failed to load on rank 1: .*Marked broken "
                     rf"\({re.escape(str(broken / manifest.BROKEN))}\); `latest` now names {tag(EVERY)}", text), \
        text[-6000:]
    events = [json.loads(line) for line in (tmp_path / "launch" / "local_cpu" / "supervisor.jsonl").read_text()
              .splitlines()]
    restarts = [e for e in events if e["event"] == "restart"]
    assert [r["resumed_from"] for r in restarts] == [tag(EVERY)]  # the supervisor reads the moved pointer
    assert f"restart 1/1 from {ckpt / tag(EVERY)}" in text
    assert f"resumed from {ckpt / tag(EVERY)} at step {EVERY}" in text
    assert f"resumed from {broken}" not in text
    assert_continues_reference(reference, out, EVERY + 1)  # logged by attempt 2 (attempt 1 failed before step 3)
    assert_intact(broken)  # rewritten whole by the restarted run


def test_a_rank_killed_inside_a_checkpoint_write(reference, damaged_shards, tmp_path):
    """Rank 1 stops right after writing its rank file of step_4 (before the manifest and the pointer) and is killed
    with SIGKILL there; the next start resumes from step_2 and continues the reference run."""
    out = tmp_path / "out"
    args = run_args(out, damaged_shards[0])
    log = tmp_path / "first.log"
    proc = torchrun(args, log, env=dict(ENV, **{manifest.PAUSE_VAR: f"{tag(2 * EVERY)}/rank_00001.pt"}))
    try:
        deadline = time.monotonic() + 400
        while not (found := re.search(rf"{manifest.PAUSE_VAR}: paused after \S+rank_00001.pt \(pid (\d+)\)",
                                      log.read_text(errors="replace"))):
            assert proc.poll() is None, f"the run ended before the pause:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.2)
        torn = out / "checkpoints" / tag(2 * EVERY)
        assert (torn / "rank_00001.pt").is_file() and not (torn / manifest.MANIFEST).exists()
        os.kill(int(found.group(1)), signal.SIGKILL)
        finish(proc, log, code=None, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "checkpoints" / "latest").read_text() == tag(EVERY)
    log2 = tmp_path / "next.log"
    text = finish(torchrun([*args, "--resume"], log2), log2)
    assert f"resumed from {out / 'checkpoints' / tag(EVERY)} at step {EVERY}" in text
    assert_continues_reference(reference, out, 1)  # 1..4 from the killed run, 3..6 again from the next
    assert_intact(out / "checkpoints" / tag(2 * EVERY))


def test_a_failed_write_stops_naming_the_folder_and_keeps_the_previous_checkpoint(reference, damaged_shards,
                                                                                 tmp_path):
    """The ranks may write no file over 256 KiB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a longer write fails
    with EFBIG like a full disk's ENOSPC): the save at step 4 fails on every rank with an error naming the folder,
    and step_2, which `latest` still names, is intact."""
    import resource

    out = tmp_path / "out"
    ckpt = copy_checkpoints(reference, out, [EVERY])
    limit = 256 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    log = tmp_path / "resume.log"
    text = finish(torchrun([*run_args(out, damaged_shards[0]), "--resume"], log, preexec_fn=small_files), log,
                  code=None)
    failed = ckpt / tag(2 * EVERY)
    assert re.search(rf"CheckpointWriteError: writing checkpoint {re.escape(str(failed))} failed on rank [01]: .*"
                     rf"MiB free on its file system, file-size limit {limit} bytes \(ulimit -f\)\)\. `latest` still "
                     rf"names {tag(EVERY)}, which is intact and what a restart resumes from; {re.escape(str(failed))} "
                     "is incomplete and can be deleted", text), text[-6000:]
    assert (ckpt / "latest").read_text() == tag(EVERY)
    assert_intact(ckpt / tag(EVERY))
    assert not (failed / manifest.MANIFEST).exists()
    assert max(train_records(out)) == 2 * EVERY  # it stopped at the save


# --- a resume this job cannot continue is explained before any process starts --------------------------------

@pytest.mark.parametrize("extra, world, words", [
    (["parallel.tensor_parallel=2"], 2, "was written with parallel.tensor_parallel=1 (world size 2), and this job has "
                                        "parallel.tensor_parallel=2: a checkpoint continues only with the layout "
                                        "that wrote it (set parallel.tensor_parallel=1, or start a new run)"),
    ([], 1, "was written by 2 processes (tensor parallel 1 x data parallel 2), and this job has 1 (the world size): "
            "a checkpoint continues only with the world size that wrote it (launch 2 processes, or start a new run)"),
    (["objective.name=bang"], 2, "was written training objective 'mix', and this job trains 'bang': a checkpoint "
                                 "continues only with its own objective (changed since: objective.name: 'mix' -> "
                                 "'bang')"),
    (["BATCH=4"], 2, "was written with other training batches than this job's config gives: batching.batch_size: 8 "
                     "-> 4 (changed since: data.overrides"),
])
def test_a_resume_this_job_cannot_continue_is_named_by_validate_only(reference, damaged_shards, tmp_path, extra,
                                                                     world, words):
    """`--validate-only --resume` (what preflight and the supervisor ask; no process group) refuses, exit code 2, in
    one line naming the field that changed, before any rank would fail on a raw `size mismatch` or a plan hash."""
    out = tmp_path / "out"
    ckpt = copy_checkpoints(reference, out, [EVERY, 2 * EVERY])
    data = damaged_shards[0]
    if extra == ["BATCH=4"]:
        data, extra = [o.replace("loader.batch_size=8", "loader.batch_size=4") for o in data], []
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--validate-only", "--world-size", str(world),
                           "--config", TINY, *run_args(out, data), *extra, "--resume"],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: --resume: {ckpt / tag(2 * EVERY)} {words}" in proc.stderr, proc.stderr
