"""bench/gpu_check.sh, the one prepared GPU check, on what a CPU can check: its syntax, the exact commands of its
GPU parts (--dry-run), and its CPU mode run for real at a tiny size (pretraining through the real engine with the
loss falling, every decoding mode, the memory-plan guard), which exercises the summary it writes."""
from __future__ import annotations

import os
import subprocess

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"
ENV = {k: v for k, v in os.environ.items() if k not in ("OUT", "DS_ACCELERATOR")}


def test_script_parses_and_its_gpu_parts_run_the_base_config_through_the_engine():
    for script in (SCRIPT, REPO_ROOT / "bench" / "gpu_rehearsal.sh"):
        assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0, script
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    commands = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in proc.stdout.splitlines() if ": " in line
                and line.split(": ", 1)[0] in ("fake_cuda", "pretrain", "mfu", "decode", "plan")}
    assert set(commands) == {"fake_cuda", "pretrain", "mfu", "decode", "plan"}
    assert commands["fake_cuda"] == "python3 -m pytest tests/test_fake_cuda.py -q -x -p no:cacheprovider"
    pretrain = proc.stdout.split("pretrain: ", 1)[1].split("\nmfu: ")[0]
    for setting in ("--config configs/pretrain/base.yaml train.steps=30 train.grad_accum=1",
                    r"data.overrides=\[work_dir=.gpu_data/base\]", "model.overrides.attention_dropout=0.0",
                    "model.overrides.attention_backend=flex", "tracking.mlflow=false", "max_memory_allocated"):
        assert setting in pretrain, setting
    assert commands["mfu"].strip() == "python3 bench/mfu.py --steps 8 --warmup 3"
    assert commands["decode"].strip() == r"python3 bench/decode_latency.py --device cuda --rounds 3 --repeats 2 --batches 1\,32"
    assert commands["plan"].startswith("python3 -m pretrain --plan --config configs/pretrain/base.yaml train.steps=30")


def test_cpu_mode_runs_the_parts_and_writes_the_summary(tiny, tmp_path):
    summary = tmp_path / "out" / "gpu_summary.txt"
    summary.parent.mkdir()
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--data", str(tiny.work()), "--parts",
                           "fake_cuda,pretrain,decode,plan", str(summary)],
                          cwd=REPO_ROOT, env={**ENV, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = summary.read_text().splitlines()
    assert lines[0].startswith("# Tandem GPU check (cpu): ") and lines[-1].startswith("total: ")
    by_part = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines if ": " in line}
    assert by_part["fake_cuda"].startswith(("ok (", "skipped: tests/test_fake_cuda.py not present"))
    pretrain = by_part["pretrain"]
    assert pretrain.startswith("ok (") and "steps=8 " in pretrain and "loss_falls=yes" in pretrain, pretrain
    assert "max_memory_allocated_bytes=0" in pretrain  # read at the process's exit (0: no GPU here)
    assert by_part["decode"].startswith("ok (")
    modes = {line.split()[0] for line in lines if line.split() and line.split()[-1] in ("-", "2.00")}
    # early_exit@2: the fixed-exit row for each decoder layer the CPU mode's tiny model has below its last
    assert modes == {"ar_beam4", "ar_greedy", "nar", "semi_nar_k4", "mask_predict_10", "early_exit", "early_exit@2"}
    assert by_part["plan"].startswith(("ok (", "skipped: not available"))
    assert (summary.parent / "gpu_check_logs" / "pretrain.log").is_file()
