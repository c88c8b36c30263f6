"""The quickstart (`make demo` = `python -m launch.demo`) end to end at its smoke size: data -> tokenizer -> shards
-> BANG + ELMER pretraining on 2 processes through the deepspeed launcher -> BANG mixed AR/NAR finetuning on Gigaword
on 2 processes -> AR, NAR and semi-NAR generation -> GLGE metrics -> the MLflow comparison table, the closing screen
(scores and speed per mode, examples side by side) and the MLflow UI command. Checked through what it leaves
behind: the MLflow store (read back with MlflowClient), the prediction files, the plots and the closing screen.

The full size is too slow for the suite; what is checked of it: README's settings table is the one the demo
runs with (no silent drift), and its overrides are fields the configs know, naming one model preset.
"""
from __future__ import annotations

import fcntl
import math
import os
import subprocess
import sys
from pathlib import Path

from finetune.showcase import lead_scores
from launch import demo

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
    n_steps = 8 + len(demo.SMOKE.modes)  # 3 data, pretrain, finetune data, finetune, evaluate, compare + 1 per mode
    assert f"all {n_steps} steps done" in proc.stdout
    store = out / "mlflow.db"
    assert proc.stdout.rstrip().splitlines()[-1].endswith(
        f"mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 --port 5000")
    assert "objective bang_mixed + lead copy (16 tokens: steps 1-1, then one step in 2) decode" in log  # SMOKE's copy steps
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
    assert (trained[0].data.tags["objective"], trained[0].data.tags["task"]) == ("bang_mixed", "gigaword")
    assert trained[0].data.tags["pretrain_run_id"] == pre[0].info.run_id
    assert trained[0].data.tags["world_size"] == "2"
    # Both launches found their run by its launch id tag and recorded that it needed no restart.
    for run in (pre[0], trained[0]):
        assert run.data.tags["tandem.launch_id"].startswith("local_cpu-") and run.data.tags["launch.restarts"] == "0"
    assert pre[0].data.tags["tandem.launch_id"] != trained[0].data.tags["tandem.launch_id"]

    evals = client.search_runs([fine], filter_string="tags.kind = 'evaluation'")
    assert sorted(r.data.tags["decoding_mode"] for r in evals) == sorted(demo.SMOKE.modes) == ["ar_beam", "nar",
                                                                                                 "semi_nar"]
    for run in evals:
        assert run.data.tags["finetune_run_id"] == trained[0].info.run_id
        for name in ("rouge1", "rouge2", "rougeL", "ms_per_sample"):
            value = run.data.metrics[name]
            assert math.isfinite(value) and value >= 0, (name, value)

    model_dir = out / "finetune" / "gigaword-bang_mixed"
    for mode in demo.SMOKE.modes:
        predictions = model_dir / "generate" / f"valid-{mode}" / "gigaword.easy.valid"
        assert len(predictions.read_text().split("\n")) - 1 == 8  # --limit 8 in the smoke size
    assert (out / "compare" / "quality_vs_speed.png").stat().st_size > 0
    table = proc.stdout[proc.stdout.index("== gigaword (easy) =="):]
    assert " ar_beam " in table and " nar " in table and " semi_nar " in table and "speedup" in table

    # The closing screen: each mode's scores as MLflow holds them, then the first examples side by side.
    screen = proc.stdout[proc.stdout.index("[demo] the finetuned model on the first 8 gigaword valid examples"):]
    by_mode = {r.data.tags["decoding_mode"]: r.data.metrics for r in evals}
    for mode, label in (("ar_beam", "AR beam search"), ("nar", "NAR, one pass"), ("semi_nar", "semi-NAR, blocks")):
        line = next(line for line in screen.splitlines() if line.startswith(f"[demo]   {label}  "))
        r1, r2, rl, ms = (float(v) for v in line.split()[-5:-1])
        m = by_mode[mode]
        assert (r1, r2, rl) == tuple(round(m[k], 2) for k in ("rouge1", "rouge2", "rougeL")), (line, m)
        assert ms == round(m["ms_per_sample"], 1)
    sources = (shared_data / "glge" / "gigaword" / "valid.src").read_text().splitlines()
    references = (shared_data / "glge" / "gigaword" / "valid.tgt").read_text().splitlines()
    # For scale, the lead baseline on the same examples, scored as the modes are (finetune.showcase.lead_scores).
    lead = next(line for line in screen.splitlines() if line.startswith("[demo]   lead-8 (copied)  "))
    expected = lead_scores("gigaword", sources[:8], references[:8])
    assert tuple(float(v) for v in lead.split()[-5:-2]) == tuple(round(expected[k], 2)
                                                                for k in ("rouge1", "rouge2", "rougeL")), lead
    side = screen[screen.index("side by side"):]
    assert "#1  source" in side and "#2  source" in side and "#3  source" not in side  # SMOKE.show == 2
    assert sources[0].split()[0] in side and references[1] in side.replace("\n[demo]", " ")
    ar_output = (model_dir / "generate" / "valid-ar_beam" / "gigaword.easy.valid").read_text().split("\n")[0]
    assert f"AR beam    {ar_output or '(empty)'}"[:60] in side
    assert f"quality against speed, plotted: {out / 'compare' / 'quality_vs_speed.png'}" in proc.stdout


def test_readme_lists_the_full_settings():
    """README's demo table is the demo's FULL settings, cell for cell."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert demo.settings_markdown(demo.FULL) in readme


def test_full_settings_are_config_fields():
    """Every FULL override is a field its config knows (an unknown key raises), and both training stages name the
    same model preset, so the finetune step can load the pretrained checkpoint."""
    from data_pipeline.config import load_config
    from finetune.config import load as load_finetune
    from model.config import PRESETS
    from pretrain.pretrain_config import load as load_pretrain

    data = load_config(REPO_ROOT / demo.DATA_CONFIG, demo.FULL.data)
    pre = load_pretrain(REPO_ROOT / demo.PRETRAIN_CONFIG, demo.FULL.pretrain)
    fine = load_finetune(str(REPO_ROOT / demo.FINETUNE_CONFIG), [*demo.FULL.finetune, *demo.FULL.decode])
    assert pre.model.preset == fine.model.preset == demo.setting(demo.FULL.pretrain, "model.preset", "") == "small"
    assert pre.model.preset in PRESETS and not pre.model.overrides and not fine.model.overrides
    assert data.tokenizer.vocab_size == int(demo.setting(demo.FULL.data, "tokenizer.vocab_size", "0"))
    assert demo.FULL.decode_limit == 200 and set(demo.FULL.modes) == {"ar_beam", "nar", "semi_nar"}
