"""Pretraining end to end on real shards, with real processes (torchrun, 2 processes over gloo), real DeepSpeed,
megatron-core, webdataset and an MLflow sqlite store.

- TP=2 x DP=1 with ZeRO-2 (DeepSpeed's launcher) and TP=1 x DP=2 with ZeRO-3 (torchrun) train the mix objective
  and the loss falls.
- ZeRO 1/2/3 at DP=2 and a single process give the same losses for the same global batch (fp32, dropout 0).
- Stop at step k, resume, continue to 2k: the same losses as the uninterrupted run (exact in fp32 on CPU); no
  sample repeated or skipped.
- The MLflow run holds the resolved config, metrics and artifacts (read back through MlflowClient); the exported
  weights name that run and the tokenizer.
- SIGTERM to the launcher closes the run as KILLED; --resume reopens the same run, tagged with the launcher's ids.
- Bad configs fail before training and name the problem; --validate-only checks a job without starting it.

Shards: data_pipeline's own commands build them once per session from ../shared/data with configs/data/tiny.yaml
(sources narrowed to WikiText so the build takes seconds; held-out shards from a book the training text leaves
out). They are cached in .cache/test-data/ and rebuilt only when data_pipeline sees a change.

This file is also the worker that the ZeRO-equivalence test starts with torchrun (see `worker()` at the end).
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TINY = "configs/pretrain/tiny.yaml"
DATA_CONFIG = "configs/data/tiny.yaml"
TEST_DATA = REPO_ROOT / ".cache" / "test-data" / "pretrain"
# configs/data/tiny.yaml narrowed for speed: WikiText only (~2,900 samples of 128 tokens in 3 shards).
DATA_OVERRIDES = [f"work_dir={TEST_DATA}", "sources.wikipedia=[]", "sources.books=[]",
                  "shard.samples_per_shard=1000", "loader.batch_size=8"]
HELDOUT = ["sources.wikipedia=[]", "sources.wikitext=[]", "sources.books=[books/gutenberg/carroll-alice.txt]",
           "extract.out_dir=heldout/docs", "shard.out_dir=heldout/shards"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
ENV.pop("MLFLOW_TRACKING_URI", None)

# Measured on this machine: all four runs bit-identical (difference 0.0) over 5 steps. The tolerances leave room
# for float summation order (one process accumulating both halves vs two ranks averaging) on other hardware.
LOSS_TOL_STAGES = 1e-6
LOSS_TOL_SINGLE = 1e-5


def _data_cmd(command: str, overrides: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", command, "--config", DATA_CONFIG,
                           f"work_dir={TEST_DATA}", *overrides], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"data_pipeline {command} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="session")
def pretrain_shards(shared_data) -> list[str]:
    """Build (or find up to date) the training and held-out shards; returns the pretrain overrides that use them."""
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    data_root = f"data_root={shared_data}"
    with open(TEST_DATA / ".lock", "w") as lock:  # other sessions may build the same folder at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        _data_cmd("prepare", [data_root, *DATA_OVERRIDES])
        for step in ("extract", "shard"):  # held-out text, tokenized with the training tokenizer
            _data_cmd(step, [data_root, *DATA_OVERRIDES, *HELDOUT])
    data = ",".join(f"'{o}'" for o in [*DATA_OVERRIDES, data_root])
    return [f"data.overrides=[{data}]", "data.eval_overrides=['loader.shard_dir=heldout/shards']"]


def base_overrides(out: Path, steps: int) -> list[str]:
    return [f"output_dir={out}", f"train.steps={steps}", "train.log_every=1", "schedule.warmup_steps=2",
            "optim.lr=3e-3", "deepspeed.precision=fp32", "eval.every_steps=0", "eval.batches=2",
            "checkpoint.every_steps=0", "checkpoint.save_at_end=false", "tracking.mlflow=false"]


def launch(args: list[str], nproc: int = 2, timeout: int = 300, launcher: str = "torchrun"):
    """Start `args` (a script, or -m module) in nproc processes with torchrun or DeepSpeed's launcher."""
    from conftest import free_port

    if launcher == "deepspeed":  # DeepSpeed's runner takes --module instead of -m
        args = ["--module", *args[1:]] if args[0] == "-m" else args
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def pretrain(out: Path, steps: int, extra: list[str], shards: list[str], nproc: int = 2, resume: bool = False,
             launcher: str = "torchrun"):
    args = ["-m", "pretrain", "--config", TINY, *base_overrides(out, steps), *shards, *extra]
    return launch(args + (["--resume"] if resume else []), nproc=nproc, launcher=launcher)


def train_records(out: Path) -> dict[int, dict]:
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "train":
            records[entry["step"]] = entry
    return records


def eval_records(out: Path) -> list[dict]:
    return [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e.get("kind") == "eval"]


def sample_ids(out: Path, rank: int) -> dict[int, list[int]]:
    per_step: dict[int, list[int]] = {}
    for line in (out / "samples" / f"rank_{rank:05d}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        per_step.setdefault(entry["step"], []).extend(entry["ids"])
    return per_step


def assert_loss_falls(records: dict[int, dict]) -> None:
    """Per objective (their scales differ: BANG sums two streams): the mean of the last three values is below
    the mean of the first three by a clear margin (from ln(4096) = 8.3 at initialisation)."""
    for key in ("bang/loss_s0", "elmer/loss"):
        values = [records[s][key] for s in sorted(records) if key in records[s]]
        assert len(values) >= 6, f"{key} logged only {len(values)} times"
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        assert last < first - 0.5, f"{key} did not fall: {values}"


# --- bad configs that need the data to be judged -------------------------------------------------------------

def test_config_errors_against_real_shards(pretrain_shards):
    """Checked before any process group: the model shape against TP and the tokenizer's padded vocabulary, the
    data config, the held-out shards. Each message names the field at fault."""
    from pretrain import pretrain_config, run
    from pretrain.core import config

    def error(overrides: list[str], world: int) -> str:
        cfg = pretrain_config.load(TINY, [*pretrain_shards, *overrides])
        with pytest.raises(config.ConfigError) as err:
            run.prepare(cfg, world)
        return str(err.value)

    plan = run.prepare(pretrain_config.load(TINY, pretrain_shards), 2)  # the good config passes
    assert plan.model_cfg.vocab_size == 4096 and plan.data_parallel == 2
    assert "model: model.n_heads=4: must be divisible by the tensor-parallel size 3" in \
        error(["parallel.tensor_parallel=3"], 3)
    assert "model: model.vocab_size=4096: must be divisible by the tensor-parallel size 3" in \
        error(["parallel.tensor_parallel=3", "model.overrides={n_heads: 6, d_model: 96}"], 3)
    assert "model.overrides.vocab_size: 4000 is smaller than the tokenizer's padded vocabulary 4096" in \
        error(["model.overrides={vocab_size: 4000}"], 1)
    assert "data.overrides: " in error(["data.overrides=['loader.batch_size=0']"], 1)
    assert "data.eval_overrides: no shards at" in error(["data.eval_overrides=['loader.shard_dir=nothing/here']"], 1)
    assert "objective.weights" in error(["objective.weights={bang: 1.0, janus: 1.0}"], 1)
    assert "objective.bang.stream_weights: has 3 entries for 2 streams" in \
        error(["objective.bang.stream_weights=[1.0,1.0,1.0]"], 1)


def test_validate_only_checks_the_job_without_starting_it(pretrain_shards, tmp_path):
    """The launcher's preflight contract: `python -m pretrain --validate-only --world-size N ...` runs prepare()
    for N processes in this one process, prints one `config ok:` line and exits 0; it writes nothing (no output
    folder, no MLflow store). A world size the layout cannot use is refused with exit code 2."""
    out, store = tmp_path / "out", tmp_path / "mlflow.db"
    args = [sys.executable, "-m", "pretrain", "--validate-only", "--config", TINY, *pretrain_shards,
            f"output_dir={out}", f"tracking.uri=sqlite:///{store}", "parallel.tensor_parallel=2"]
    ok = subprocess.run([*args, "--world-size", "4"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = [line for line in ok.stdout.splitlines() if line.startswith("config ok:")]
    assert len(lines) == 1 and "world 4 = TP 2 x DP 2, ZeRO-2" in lines[0] and "vocab=4096" in lines[0], ok.stdout
    assert not out.exists() and not store.exists()
    bad = subprocess.run([*args, "--world-size", "3"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "error: " in bad.stderr
    assert "parallel.tensor_parallel: =2 does not divide the world size 3" in bad.stderr


def _start_pretrain(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    from conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain", "--config", TINY, *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_sigterm_closes_the_mlflow_run_as_killed_and_resume_reopens_it(pretrain_shards, tmp_path):
    """SIGTERM to torchrun (what a scheduler or the launcher's supervisor sends) after the first logged step: the
    ranks stop, rank 0 ends its MLflow run as KILLED (not left RUNNING), the job exits non-zero. --resume continues
    the same MLflow run, which ends FINISHED, tagged with the launcher's TANDEM_LAUNCH_ID / TANDEM_RESTART."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*base_overrides(out, 500), *pretrain_shards, "checkpoint.every_steps=1", "tracking.mlflow=true",
            f"tracking.uri={store}", "eval.batches=0", "data.eval_overrides=[]"]
    env = dict(ENV, TANDEM_LAUNCH_ID="launch-7", TANDEM_RESTART="0")
    log = tmp_path / "first.log"
    proc = _start_pretrain(args, env, log)
    try:
        deadline = time.time() + 300
        while "saved checkpoint" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be stopped:\n{log.read_text()[-4000:]}"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code != 0, text[-4000:]
    assert text.count("[pretrain] stopped by SIGTERM; exiting with code 143") == 2, text[-4000:]  # both ranks
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("tandem-pretrain").experiment_id])
    assert run.info.status == "KILLED"
    assert (run.data.tags["tandem.launch_id"], run.data.tags["tandem.restart"], run.data.tags["kind"]) == \
        ("launch-7", "0", "pretrain")
    stopped_at = int((out / "checkpoints" / "latest").read_text()[len("step_"):])
    assert stopped_at >= 1

    resumed = _start_pretrain([*args, f"train.steps={stopped_at + 2}", "--resume"],
                              dict(env, TANDEM_RESTART="1"), tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-4000:]
    (again,) = client.search_runs([client.get_experiment_by_name("tandem-pretrain").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    # MLflow params cannot change: the first value stays, the resumed job's changed one is logged beside it
    assert (again.data.params["train.steps"], again.data.params["resume.1.train.steps"],
            again.data.params["resume.1.at_step"]) == ("500", str(stopped_at + 2), str(stopped_at))
    assert (again.data.tags["tandem.launch_id"], again.data.tags["tandem.restart"]) == ("launch-7", "1")
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert set(range(1, stopped_at + 3)) <= steps


# --- TP=2 x DP=1, ZeRO-2, mix; MLflow -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2_zero2_run(pretrain_shards, tmp_path_factory) -> Path:
    """Started by DeepSpeed's launcher (the other runs use torchrun)."""
    out = tmp_path_factory.mktemp("tp2_zero2")
    pretrain(out, 14, ["parallel.tensor_parallel=2", "deepspeed.config=configs/deepspeed/zero2.json",
                       "tracking.mlflow=true", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", "eval.at_end=true",
                       "checkpoint.save_at_end=true"], pretrain_shards, launcher="deepspeed")
    return out


def test_tp2_zero2_mix_loss_falls(tp2_zero2_run):
    records = train_records(tp2_zero2_run)
    assert sorted(records) == list(range(1, 15))
    assert_loss_falls(records)
    final = eval_records(tp2_zero2_run)[-1]
    for key in ("bang/ar_loss", "bang/nar_loss", "bang/loss_s0", "bang/loss_s1", "elmer/ar_loss", "elmer/nar_loss",
                "elmer/loss_exit1", "elmer/loss_exit2"):
        assert 0 < final[key] < 8.3, (key, final[key])  # held-out loss below the uniform-guess level


def test_final_weights_are_exported_tp_merged(tp2_zero2_run, pretrain_shards):
    """final_model.pt holds full weights (the vocab-parallel embedding's two halves joined) that load into a
    TP=1 model here and give the held-out losses the TP=2 run reported at its end."""
    import torch

    from data_pipeline.stream import build_pretrain_loader
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel
    from pretrain import pretrain_config, run
    from pretrain.core.metrics import MetricSums

    from mlflow.tracking import MlflowClient

    saved = torch.load(tp2_zero2_run / "final_model.pt", weights_only=True)  # plain values only: no pickled code
    assert saved["step"] == 14 and saved["model"]["embed_tokens.weight"].shape == (4096, 64)
    # The run record: finetuning links its run to this one and checks the tokenizer against its task shards.
    store = f"sqlite:///{tp2_zero2_run / 'mlflow.db'}"
    (run_record,) = MlflowClient(tracking_uri=store).search_runs(
        [MlflowClient(tracking_uri=store).get_experiment_by_name("tandem-pretrain").experiment_id])
    assert (saved["job"], saved["mlflow_run_id"], saved["tracking_uri"]) == ("pretrain", run_record.info.run_id, store)
    manifest = json.loads((TEST_DATA / "shards" / "manifest.json").read_text())
    assert saved["tokenizer_checksum"] == manifest["tokenizer"]["checksum"]
    parallel.ensure_initialized(seed=0)
    model = Seq2SeqModel(ModelConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    model.eval()
    plan = run.prepare(pretrain_config.load(TINY, pretrain_shards), 1)
    objective = run.build_objective(plan, dp_rank=0)
    sums = MetricSums(objective.eval_metric_names())
    for name in ("bang", "elmer"):  # what the engine's evaluation reads: 2 batches per objective
        loader = build_pretrain_loader(plan.eval_data_cfg, dp_rank=0, dp_world_size=1, seed=0,
                                       objective_weights={name: 1.0}, num_workers=0)
        for _, batch in zip(range(2), loader):
            with torch.no_grad():
                sums.add(objective.eval_metrics(model, batch))
    here, _ = sums.reduce()
    reported = eval_records(tp2_zero2_run)[-1]
    for key in ("bang/nar_loss", "bang/loss_s1", "elmer/nar_loss", "elmer/loss_exit1", "elmer/ar_loss"):
        assert abs(here[key] - reported[key]) < 1e-4, (key, here[key], reported[key])


def test_mlflow_run_holds_params_metrics_artifacts(tp2_zero2_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tp2_zero2_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tandem-pretrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one run per job, from rank 0 only
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["parallel.tensor_parallel"] == "2"
    assert params["deepspeed.config"] == "configs/deepspeed/zero2.json"
    assert params["objective.name"] == "mix"
    assert params["train.steps"] == "14"
    assert params["resolved.model.d_model"] == "64" and params["resolved.model.vocab_size"] == "4096"
    assert params["resolved.data_parallel"] == "1"
    tags = run.data.tags
    assert (tags["world_size"], tags["tensor_parallel"], tags["zero_stage"]) == ("2", "2", "2")
    assert len(tags["mlflow.source.git.commit"]) in (40, len("unknown"))  # MLflow's own source tags
    assert (tags["mlflow.source.type"], tags["mlflow.source.name"]) == ("LOCAL", "pretrain/__main__.py")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI view
    inputs = {d.dataset.name: (json.loads(d.dataset.source)["uri"], d.tags[0].value, d.dataset.digest)
              for d in run.inputs.dataset_inputs}
    assert {name: (uri, context) for name, (uri, context, _) in inputs.items()} == {
        "pretrain/shards": (str(TEST_DATA / "shards"), "training"),
        "heldout/shards": (str(TEST_DATA / "heldout" / "shards"), "validation")}
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_seen",
                 "train/bang/loss_s0", "train/bang/loss_s1", "train/elmer/loss", "eval/bang/nar_loss",
                 "eval/elmer/ar_loss"):
        assert name in run.data.metrics, name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 15))
    samples = client.get_metric_history(run.info.run_id, "train/samples_seen")
    assert max(m.value for m in samples) == 14 * 8  # 8 samples per step (DP=1), TP peers counted once
    artifacts = {a.path for folder in ("config", "deepspeed", "data", "resolved")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"config/tiny.yaml", "deepspeed/zero2.json", "data/tiny.yaml",
                         "resolved/config.resolved.yaml", "resolved/deepspeed_config.json"}
    ds = json.loads(Path(client.download_artifacts(run.info.run_id, "resolved/deepspeed_config.json")).read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 8


# --- TP=1 x DP=2, ZeRO-3, mix -------------------------------------------------------------------------------

def test_dp2_zero3_mix_loss_falls(pretrain_shards, tmp_path):
    pretrain(tmp_path, 14, ["deepspeed.config=configs/deepspeed/zero3.json"], pretrain_shards)
    records = train_records(tmp_path)
    assert sorted(records) == list(range(1, 15))
    assert_loss_falls(records)
    assert records[14]["samples_seen"] == 14 * 2 * 8


# --- resume ---------------------------------------------------------------------------------------------------

def test_resume_reproduces_uninterrupted_run(pretrain_shards, tmp_path):
    """Run A trains 2k steps and checkpoints at k; run B starts fresh processes from that checkpoint and trains
    k+1..2k. B's losses equal A's exactly (fp32, CPU) and the samples of 1..2k are each seen once."""
    k = 4
    common = ["deepspeed.config=configs/deepspeed/zero1.json", "train.record_sample_ids=true"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    pretrain(full, 2 * k, [*common, f"checkpoint.every_steps={k}", "checkpoint.keep_last=0"], pretrain_shards)
    assert (full / "checkpoints" / "latest").read_text() == f"step_{k:08d}"
    pretrain(resumed, 2 * k, [*common, f"checkpoint.dir={full / 'checkpoints'}"], pretrain_shards, resume=True)

    a, b = train_records(full), train_records(resumed)
    assert sorted(b) == list(range(k + 1, 2 * k + 1))
    for step in b:
        keys = {key for key in a[step] if "loss" in key or key in ("grad_norm", "lr")}
        assert keys == {key for key in b[step] if "loss" in key or key in ("grad_norm", "lr")}
        for key in keys:
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
        assert a[step]["samples_seen"] == b[step]["samples_seen"]
    for rank in (0, 1):
        ids_a, ids_b = sample_ids(full, rank), sample_ids(resumed, rank)
        assert sorted(ids_b) == list(range(k + 1, 2 * k + 1))
        for step in ids_b:
            assert ids_a[step] == ids_b[step]
    seen = [i for rank in (0, 1) for step in range(1, k + 1) for i in sample_ids(full, rank)[step]]
    seen += [i for rank in (0, 1) for step in range(k + 1, 2 * k + 1) for i in sample_ids(resumed, rank)[step]]
    assert len(seen) == len(set(seen)) == 2 * k * 2 * 8  # nothing repeated; every step full, so nothing skipped
    everything = [i for rank in (0, 1) for ids in sample_ids(full, rank).values() for i in ids]
    assert sorted(seen) == sorted(everything)


# --- ZeRO stages and a single process agree -------------------------------------------------------------------

EQUIV_STEPS = 5


def test_zero_stages_and_single_process_agree(pretrain_shards, tmp_path):
    """Same global batch (2 x 8 samples) everywhere: at DP=2 each rank reads its half; the single process reads
    both halves as two accumulation micro-batches. BANG objective (no sampling), fp32, dropout 0."""
    stages = ["zero1", "zero2", "zero3"]
    launch([__file__, str(tmp_path), ",".join(stages), *pretrain_shards], nproc=2, timeout=400)
    launch([__file__, str(tmp_path), "single", *pretrain_shards], nproc=1)
    losses = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in [*stages, "single"]}
    reference = losses["zero1"]
    assert len(reference) == EQUIV_STEPS and reference[-1] < reference[0]
    for name in ("zero2", "zero3"):
        assert max(abs(a - b) for a, b in zip(reference, losses[name])) <= LOSS_TOL_STAGES, (name, losses)
    assert max(abs(a - b) for a, b in zip(reference, losses["single"])) <= LOSS_TOL_SINGLE, losses


class _Interleave:
    """Two dp-rank loaders read alternately: one process sees exactly the global batch of two ranks."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __iter__(self):
        streams = [iter(loader) for loader in self.loaders]
        while True:
            for stream in streams:
                yield next(stream)

    def state_dict(self):
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, state):
        for loader, s in zip(self.loaders, state):
            loader.load_state_dict(s)


def worker(out: str, which: str, overrides: list[str]) -> None:
    """torchrun entry: train EQUIV_STEPS steps of BANG for each named ZeRO config (in one set of processes), or
    once in a single process with both data-parallel halves; write each run's per-step losses as JSON."""
    from data_pipeline.stream import build_pretrain_loader
    from model import parallel
    from model.seq2seq import Seq2SeqModel
    from pretrain import pretrain_config, run
    from pretrain.core import config, distributed
    from pretrain.core.engine import Engine

    single = which == "single"
    names = ["single"] if single else which.split(",")
    for name in names:
        stage = "zero1" if single else name
        cfg = pretrain_config.load(TINY, [*base_overrides(Path(out) / name, EQUIV_STEPS), *overrides,
                                          "objective.name=bang", f"deepspeed.config=configs/deepspeed/{stage}.json",
                                          "train.progress_bar=false", "eval.at_end=false",
                                          f"train.grad_accum={2 if single else 1}"])
        plan = run.prepare(cfg, config.launch_world_size())
        mpu = distributed.init(1, cfg.train.seed)  # reseeds: every run starts from the same weights
        model = Seq2SeqModel(plan.model_cfg)
        objective = run.build_objective(plan, parallel.dp_rank())

        def loader(rank: int):
            return build_pretrain_loader(plan.data_cfg, dp_rank=rank, dp_world_size=2, seed=cfg.train.seed,
                                         objective_weights={"bang": 1.0}, num_workers=0)

        data = _Interleave([loader(0), loader(1)]) if single else loader(parallel.dp_rank())
        engine = Engine(cfg, model, objective, data, mpu, micro_batch_size=plan.micro_batch_size)
        engine.fit(run_name=name)
        if distributed.is_rank0():
            records = train_records(Path(out) / name)
            (Path(out) / f"{name}.json").write_text(json.dumps([records[s]["loss"] for s in sorted(records)]))
        del engine
        distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])
