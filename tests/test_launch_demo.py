"""The quickstart (`make demo` = `python -m launch.demo`) end to end at its smoke size: data -> tokenizer -> shards
-> BANG + ELMER pretraining on 2 processes through the deepspeed launcher -> JANUS finetuning on Gigaword on 2
processes -> AR and NAR generation -> GLGE metrics -> the MLflow comparison table, and the closing MLflow UI
command. Checked through what it leaves behind: the MLflow store (read back with MlflowClient), the prediction
files and the plots.
"""
from __future__ import annotations

import fcntl
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / ".cache" / "test-data" / "launch"  # shared with test_launch_multinode.py (same overrides)
ENV = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
           TORCH_EXTENSIONS_DIR=str(REPO_ROOT / ".cache" / "torch_extensions"))
ENV.pop("MLFLOW_TRACKING_URI", None)
ENV.pop("TANDEM_DEMO_SMOKE", None)


def test_quickstart_smoke(shared_data, tmp_path):
    out = tmp_path / "demo"
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with open(DATA_DIR / ".lock", "w") as lock:  # the data steps write into the shared cache
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-m", "launch.demo", "--smoke", "--data-root", str(shared_data),
                               "--out", str(out), "--data-dir", str(DATA_DIR)], cwd=REPO_ROOT, env=ENV,
                              capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert "all 10 steps done" in proc.stdout
    store = out / "mlflow.db"
    assert proc.stdout.rstrip().splitlines()[-1].endswith(
        f"mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 --port 5000")
    # Both distributed stages went through the deepspeed launcher with 2 ranks.
    assert log.count("--num_nodes 1 --num_gpus 2 --master_addr 127.0.0.1") >= 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    pre = client.search_runs([client.get_experiment_by_name("tandem-pretrain").experiment_id])
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"
    tags = pre[0].data.tags
    assert (tags["world_size"], tags["data_parallel"], tags["zero_stage"], tags["objective"]) == ("2", "2", "2", "mix")
    assert {"train/bang/loss_s0", "train/elmer/loss"} <= set(pre[0].data.metrics)

    fine = client.get_experiment_by_name("tandem-finetune").experiment_id
    trained = client.search_runs([fine], filter_string="tags.kind = 'finetune'")
    assert len(trained) == 1 and trained[0].info.status == "FINISHED"
    assert (trained[0].data.tags["objective"], trained[0].data.tags["task"]) == ("janus", "gigaword")
    assert trained[0].data.tags["pretrain_run_id"] == pre[0].info.run_id
    assert trained[0].data.tags["world_size"] == "2"
    # Both launches found their run by its launch id tag and recorded that it needed no restart.
    for run in (pre[0], trained[0]):
        assert run.data.tags["tandem.launch_id"].startswith("local_cpu-") and run.data.tags["launch.restarts"] == "0"
    assert pre[0].data.tags["tandem.launch_id"] != trained[0].data.tags["tandem.launch_id"]

    evals = client.search_runs([fine], filter_string="tags.kind = 'evaluation'")
    assert sorted(r.data.tags["decoding_mode"] for r in evals) == ["ar_beam", "nar"]
    for run in evals:
        assert run.data.tags["finetune_run_id"] == trained[0].info.run_id
        for name in ("rouge1", "rouge2", "rougeL", "ms_per_sample"):
            value = run.data.metrics[name]
            assert math.isfinite(value) and value >= 0, (name, value)

    model_dir = out / "finetune" / "gigaword-janus"
    for mode in ("ar_beam", "nar"):
        predictions = model_dir / "generate" / f"valid-{mode}" / "gigaword.easy.valid"
        assert len(predictions.read_text().split("\n")) - 1 == 8  # --limit 8 in the smoke size
    assert (out / "compare" / "quality_vs_speed.png").stat().st_size > 0
    table = proc.stdout[proc.stdout.index("== gigaword (easy) =="):]
    assert " ar_beam " in table and " nar " in table and "speedup" in table
