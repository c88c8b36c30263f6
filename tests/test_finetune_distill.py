"""Sequence-level distillation and its recipe with real components, on the Gigaword test shards
(tests/finetune_helpers.py): a real AR teacher (`python -m finetune`, tiny model from scratch, TEACHER_STEPS steps,
MLflow in a sqlite store); `python -m finetune distill` under torchrun (2 processes, gloo, DeepSpeed's process
groups), killed (SIGKILL to the whole job) after its first chunks and run again; then the recipe script
finetune/scripts/distill.sh, which finds that distilled set complete, decodes with the teacher's beam search, trains
a NAR student on the set and one on the gold targets under torchrun (2 processes, DeepSpeed), decodes both in NAR
and semi-NAR mode (the script's default adds early exit; two modes keep the test shorter), evaluates and compares.

What is asserted:
  * the resumed 2-rank job skipped the chunks finished before the kill, decoded the rest on both ranks, and wrote
    exactly what one uninterrupted process writes (same hypotheses, same shard bytes); the set is a task shard set
    (every shard's sha256 verified, the gold shards' tokenizer checksum, sources equal to the gold shards', targets
    the hypotheses' tokens) whose manifest names the teacher, its MLflow run (which exists) and the decoding
    settings; progress lines with an ETA were printed;
  * `--validate-only` knows the finished set, refuses other settings over it and non-AR decoding;
  * the student trained on the distilled set read its training samples from it (sample ids < DISTILL_EXAMPLES,
    where the gold split has 10,000) and its MLflow run links to the teacher's run (teacher_run_id, the set's path
    and manifest sha256; training_targets=distilled), the gold student says training_targets=gold; `compare`
    shows both students' evaluations side by side with a targets column.
"""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import psutil  # DeepSpeed's dependency
import pytest

from finetune_helpers import ENV, GIGAWORD, REPO_ROOT, as_list_override, build_test_data, run

TEACHER_STEPS = 3  # near its random start: outputs differ between sources (30 steps collapse to one line)
DISTILL_EXAMPLES = 240
CHUNK = 10  # 24 chunks: the kill comes after the first ones
DISTILL_ARGS = ["--split", "train", "--limit", str(DISTILL_EXAMPLES), "--chunk-size", str(CHUNK), "--batch-size", "2",
                "decode.max_len=20"]
EXPERIMENT = "distill-test"
MODES = ("nar", "semi_nar")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "distilled": root / "recipe" / "distilled"}


@pytest.fixture(scope="module")
def data(shared_data) -> list[str]:
    return build_test_data(shared_data)


def common_overrides(data: list[str], store: dict) -> list[str]:
    return [as_list_override("data.overrides", data), "task.epochs=0", "train.log_every=5", "train.progress_bar=false",
            "optim.lr=1e-3", "schedule.decay=constant", "schedule.warmup_steps=2", "data.batch_size=8",
            "data.max_source_len=32", "eval.batches=1", "valid_generation.samples=0", "deepspeed.precision=fp32",
            "decode.max_len=20", f"tracking.uri={store['uri']}", f"tracking.experiment={EXPERIMENT}"]


@pytest.fixture(scope="module")
def teacher(data, store) -> Path:
    out = store["root"] / "teacher"
    run(["-m", "finetune", "--config", GIGAWORD, "--init", "scratch", *common_overrides(data, store),
         "objective.name=ar", f"train.steps={TEACHER_STEPS}", f"output_dir={out}"], timeout=600)
    return out


def torchrun(args: list[str]) -> list[str]:
    from conftest import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "finetune", *args]


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def chunk_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "chunks").glob("chunk_*.json")) if (out / "chunks").is_dir() else []


def test_distill_on_two_ranks_resumes_after_a_kill(teacher, store, data):
    from data_pipeline.artifacts import check_shards, load_manifest
    from data_pipeline.shards import read_piece
    from data_pipeline.tokenizer import Tokenizer
    from finetune.tracking import client

    out, reference = store["distilled"], store["root"] / "reference"
    args = ["distill", "--teacher", str(teacher), *DISTILL_ARGS]
    logs = store["root"]
    ref = subprocess.Popen([sys.executable, "-m", "finetune", *args, "--out", str(reference)], cwd=REPO_ROOT, env=ENV,
                           stdout=open(logs / "reference.log", "w"), stderr=subprocess.STDOUT)
    first = subprocess.Popen(torchrun([*args, "--out", str(out)]), cwd=REPO_ROOT, env=ENV,
                             stdout=open(logs / "attempt1.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not chunk_files(out) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job = psutil.Process(first.pid)
    workers = job.children(recursive=True)
    for member in [*workers, job]:  # torchrun and its workers at once, as a lost node goes
        member.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    while not all(ended(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    done = chunk_files(out)
    assert 1 <= len(done) < DISTILL_EXAMPLES // CHUNK, (done, (logs / "attempt1.log").read_text()[-3000:])
    assert not (out / "manifest.json").exists()

    second = subprocess.run(torchrun([*args, "--out", str(out)]), cwd=REPO_ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    log = second.stdout + second.stderr
    left = DISTILL_EXAMPLES // CHUNK - len(done)
    for rank, share in ((0, (left + 1) // 2), (1, left // 2)):
        assert f"[distill] rank {rank}: {share} of {left} chunks to decode ({len(done)} done before)" in log, log[-3000:]
    assert " ex/s, eta " in log and f"[distill] {DISTILL_EXAMPLES}/{DISTILL_EXAMPLES} ex (100%)" in log
    assert ref.wait(timeout=600) == 0, (logs / "reference.log").read_text()[-5000:]

    # what one uninterrupted process wrote, byte for byte
    assert (out / "hypotheses.txt").read_text() == (reference / "hypotheses.txt").read_text()
    manifest, same = load_manifest(out), load_manifest(reference)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in same["shards"]]
    assert not (out / "chunks").exists()

    # a task shard set in the usual format, tied to the gold shards' tokenizer
    gold_dir = REPO_ROOT / ".cache" / "test-data" / "finetune" / "tasks" / "easy" / "gigaword" / "train"
    gold = load_manifest(gold_dir)
    assert manifest["kind"] == "task" and manifest["num_samples"] == DISTILL_EXAMPLES
    assert manifest["tokenizer"]["checksum"] == gold["tokenizer"]["checksum"]
    assert check_shards(manifest, out, "sha256") == {}
    tok = Tokenizer.load(out / "tokenizer.model")
    hypotheses = (out / "hypotheses.txt").read_text().splitlines()
    assert len(hypotheses) == DISTILL_EXAMPLES and len(set(hypotheses)) > 1
    ours = [s for e in manifest["shards"] for s in read_piece(out / e["name"], e["first_id"], 0, e["samples"],
                                                               ["src", "tgt"], manifest["token_dtype"])]
    theirs = read_piece(gold_dir / gold["shards"][0]["name"], 0, 0, DISTILL_EXAMPLES, ["src", "tgt"],
                        gold["token_dtype"])
    for (sid, sample), (gid, gold_sample), hypothesis in zip(ours, theirs, hypotheses):
        assert sid == gid and sample["src"].tolist() == gold_sample["src"].tolist()
        assert sample["tgt"].tolist() == tok.encode(hypothesis)[:manifest["config"]["max_target_len"]]

    record = manifest["distilled"]
    meta = json.loads((teacher / "finetune_meta.json").read_text())
    assert record["teacher"] == str(teacher.resolve()) and record["teacher_run_id"] == meta["finetune_run_id"]
    assert client(store["uri"]).get_run(record["teacher_run_id"]).info.status == "FINISHED"
    assert (record["mode"], record["decode"]["beam_size"], record["decode"]["max_len"]) == ("ar_beam", 4, 20)
    assert (record["task"], record["difficulty"], record["split"], record["examples"]) == \
        ("gigaword", "easy", "train", DISTILL_EXAMPLES)


def distill_in_process(argv: list[str]) -> tuple[int, str]:
    from finetune.distill import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


def test_distill_knows_a_finished_set_and_refuses_other_jobs_over_it(teacher, store):
    base = ["--teacher", str(teacher), "--out", str(store["distilled"]), "--validate-only", *DISTILL_ARGS]
    code, text = distill_in_process(base)
    assert code == 0 and "(already complete)" in text, text
    code, text = distill_in_process([*base, "decode.beam_size=2"])
    assert code == 2 and "holds a distilled set of another job" in text and "--force" in text, text
    code, text = distill_in_process([*base, "decode.mode=nar"])
    assert code == 2 and "decode.mode: 'nar': the teacher decodes with AR search" in text, text
    code, text = distill_in_process(["--teacher", str(store["root"]), "--validate-only"])
    assert code == 2 and "not a finetune output folder" in text, text


def test_the_launcher_starts_distill_on_every_rank(teacher, store):
    """`python -m launch ... -- finetune distill ...`: the launcher asks the subcommand about itself (its
    --validate-only --json, for the layout's 2 ranks), runs preflight on that, and starts it on every rank."""
    from configs import ConfigError
    from launch.stage import check_stage

    check_stage("finetune", ["distill", "--teacher", "t"])  # a subcommand names its inputs: no --config needed
    with pytest.raises(ConfigError, match="give the stage's config"):
        check_stage("pretrain", ["distill", "--teacher", "t"])
    stage = ["finetune", "distill", "--teacher", str(teacher), "--out", str(store["distilled"]), *DISTILL_ARGS]
    proc = subprocess.run([sys.executable, "-m", "launch", "--config", "configs/launch/local_cpu.yaml", "--check",
                           f"run_dir={store['root'] / 'launch'}", "--", *stage], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preflight ok: stage config: config ok: distill gigaword-easy train: 240 examples in 24 chunks of 10 " \
           "(already complete)" in proc.stdout and " on 2 process(es)" in proc.stdout, proc.stdout
    assert f"--no_local_rank --module finetune distill --teacher {teacher}" in proc.stdout.splitlines()[-1]


def test_recipe_script_trains_students_on_distilled_and_gold_targets_and_compares(teacher, store, data):
    from data_pipeline.artifacts import sha256_file
    from finetune.tracking import client

    assert (store["distilled"] / "manifest.json").is_file(), "runs after the distillation test (module order)"
    recipe = store["root"] / "recipe"
    student = ["train.steps=4", "train.record_sample_ids=true"]
    common = [a for a in common_overrides(data, store) if not a.startswith("tracking.")]
    cmd = ["bash", "finetune/scripts/distill.sh", "--task", "gigaword", "--init", "scratch", "--teacher", str(teacher),
           "--gold", "--nproc", "2", "--limit", "30", "--modes", " ".join(MODES), "--out", str(recipe),
           "--experiment", EXPERIMENT, "--tracking-uri", store["uri"],
           *[a for arg in DISTILL_ARGS for a in ("--distill-arg", arg)],
           *[a for s in student for a in ("--student-set", s)], *common]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**ENV, "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "already holds this distillation" in proc.stdout

    mlflow = client(store["uri"])
    teacher_run = json.loads((teacher / "finetune_meta.json").read_text())["finetune_run_id"]
    for targets in ("distilled", "gold"):
        folder = recipe / f"student-{targets}"
        meta = json.loads((folder / "finetune_meta.json").read_text())
        tags = mlflow.get_run(meta["finetune_run_id"]).data.tags
        assert tags["training_targets"] == meta["training_targets"] == targets
        ids = {i for line in (folder / "samples" / "rank_00000.jsonl").read_text().splitlines()
               for i in json.loads(line)["ids"]}
        if targets == "distilled":  # read from the distilled set: the teacher's run linked, the set named
            assert (tags["teacher_run_id"], tags["distilled_set"], tags["distilled_digest"]) == \
                (teacher_run, str(store["distilled"].resolve()), sha256_file(store["distilled"] / "manifest.json"))
            assert max(ids) < DISTILL_EXAMPLES
        else:
            assert "teacher_run_id" not in tags and max(ids) >= DISTILL_EXAMPLES

    evaluations = mlflow.search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id],
                                     "tags.kind = 'evaluation'")
    pairs = sorted((r.data.tags["decoding_mode"], r.data.tags["training_targets"]) for r in evaluations)
    assert pairs == sorted([("ar_beam", "gold"), *((m, t) for m in MODES for t in ("distilled", "gold"))])
    table = proc.stdout[proc.stdout.index("== gigaword (easy) =="):].split("\n\n")[0].splitlines()
    header = table[1].split()
    assert header[:4] == ["run", "objective", "targets", "mode"]
    rows = [line.split() for line in table[2:]]
    assert [(r[3], r[2]) for r in rows] == pairs, table  # each mode's distilled row beside its gold row
    speedups = [r[header.index("speedup")] for r in rows if r[3] != "ar_beam"]
    # against the teacher's beam search
    assert len(speedups) == 2 * len(MODES) and all(s.endswith("x") for s in speedups), table
    assert (recipe / "compare" / "quality_vs_speed.png").is_file()
