"""Shared pieces of the finetuning tests: the test data (built once and cached), the subprocess environment and
launchers. Imported by tests/test_finetune_*.py (pytest puts tests/ on sys.path).

Test data, built by the project's own commands into .cache/test-data/finetune/ (rebuilt only when data_pipeline
sees a change; a file lock serializes concurrent sessions):
  * pretraining shards: WikiText-2 plus the Gigaword *training sources* (in-domain news text, no headlines) from
    ../shared/data, tokenized with a 1000-piece sentencepiece model (padded to 1024 = the tiny preset's vocab);
  * Gigaword task shards (train 10,000 / valid 1,000 pairs) with that tokenizer (`python -m finetune data`).
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache" / "test-data" / "finetune"
GIGAWORD = "configs/finetune/gigaword.yaml"

ENV = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
ENV.pop("MLFLOW_TRACKING_URI", None)


def data_overrides(shared_data: Path) -> list[str]:
    """The data-config overrides every test command uses (pretraining and finetuning alike)."""
    return [f"work_dir={CACHE}", f"data_root={shared_data}", "sources.wikipedia=[]",
            "sources.books=[glge/gigaword/train.src]", "tokenizer.vocab_size=1000", "shard.samples_per_shard=2000"]


def as_list_override(key: str, values: list[str]) -> str:
    return f"{key}=[" + ",".join(f"'{v}'" for v in values) + "]"


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args[:4])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A command in the background, output to `log` (wait with finish())."""
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: int = 300) -> str:
    code = proc.wait(timeout=timeout)
    text = log.read_text()
    assert code == 0, f"{' '.join(map(str, proc.args[1:5]))} failed ({code}):\n{text[-6000:]}"
    return text


def build_test_data(shared_data: Path) -> list[str]:
    """Build (or find up to date) the pretraining and Gigaword task shards; returns the data overrides."""
    CACHE.mkdir(parents=True, exist_ok=True)
    overrides = data_overrides(shared_data)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run(["-m", "data_pipeline", "prepare", "--config", "configs/data/tiny.yaml", *overrides], timeout=600)
        run(["-m", "finetune", "data", "--config", GIGAWORD, as_list_override("data.overrides", overrides)])
    return overrides


def train_losses(output_dir: Path) -> dict[int, dict]:
    """The training records of a run, by step, from the metrics.jsonl the engine writes on rank 0."""
    records = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "train":
            records[entry["step"]] = entry
    return records
