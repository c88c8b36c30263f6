"""The memory plan (pretrain/plan.py, `python -m pretrain --plan`): its weights, gradients and optimizer parts
against closed-form sizes of the model, per ZeRO stage, precision and tensor-parallel size; its activation part
measured from the fake dry run and responding to the batch and to activation checkpointing as it must."""
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.plan import MiB, memory_plan, state_bytes
from pretrain.pretrain_config import load
from pretrain.run import build_objective, prepare
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "configs" / "pretrain" / "tiny.yaml"


def parameters_closed_form(V, d, f, n_enc, n_dec, src_pos, tgt_pos, n_len, tp) -> int:
    """One tensor-parallel rank's parameters of model/seq2seq.py, counted by hand: matrices and column-parallel
    biases split over tp; row-parallel biases, norms, positions, the slot embedding and the length head whole."""
    embeddings = d + V // tp * d + src_pos * d + (tgt_pos + 1) * d + 2 * 2 * d  # slot, tokens, positions, norms
    attention = 4 * d * d // tp + 3 * d // tp + d + 2 * d  # qkv (+bias), out (+bias), norm
    cross = 4 * d * d // tp + 3 * d // tp + d + 2 * d  # q, kv (+biases), out (+bias), norm
    ffn = 2 * d * f // tp + f // tp + d + 2 * d
    return embeddings + n_enc * (attention + ffn) + n_dec * (attention + cross + ffn) + n_len * d + n_len


@pytest.fixture(scope="module")
def data_overrides(tiny):
    return [f"data.overrides=['data_root={tiny.data_root}','work_dir={tiny.work_dir}','loader.batch_size=4']",
            "eval.batches=0"]


def plan_for(data_overrides, world, *overrides):
    return memory_plan(prepare(load(TINY, [*data_overrides, *overrides]), world), build_objective)


@pytest.mark.parametrize("world,tp,zero,precision", [(2, 1, 1, "bf16"), (4, 2, 2, "fp32"), (2, 1, 3, "bf16")])
def test_state_parts_match_the_closed_form(data_overrides, world, tp, zero, precision):
    plan = plan_for(data_overrides, world, f"parallel.tensor_parallel={tp}", f"deepspeed.precision={precision}",
                    f"deepspeed.config=configs/deepspeed/zero{zero}.json")
    cfg = prepare(load(TINY, data_overrides), world).model_cfg
    P = parameters_closed_form(cfg.vocab_size, cfg.d_model, cfg.d_ffn, cfg.n_encoder_layers, cfg.n_decoder_layers,
                               cfg.max_source_positions, cfg.max_target_positions, cfg.n_length_classes, tp)
    dp = world // tp
    assert plan.parameters == P
    low = 2 if precision == "bf16" else 4
    assert plan.weights == P * low // (dp if zero == 3 else 1)
    assert plan.gradients == P * (4 if precision == "bf16" else low) // (dp if zero >= 2 else 1)
    assert plan.optimizer == P * (12 if precision == "bf16" else 8) // dp
    assert plan.peak == plan.weights + plan.gradients + plan.optimizer + plan.activations
    assert plan.activations == max(plan.per_objective.values()) > 0
    assert set(plan.per_objective) == {"bang", "elmer"}


def test_state_bytes_without_zero_keeps_everything_whole():
    assert state_bytes(1000, "bf16", 0, 8) == (2000, 2000, 12000)  # bf16 grads without ZeRO: bf16 (no fp32 accum)
    assert state_bytes(1000, "fp32", 1, 4) == (4000, 4000, 2000)


def test_activations_follow_the_batch_and_checkpointing(data_overrides):
    """Activations of the tiny model at 4 samples: twice the samples nearly double them (the weights do not
    move); activation checkpointing (each layer keeps its inputs) cuts them well below."""
    base = plan_for(data_overrides, 1)
    double = plan_for([o.replace("batch_size=4", "batch_size=8") for o in data_overrides], 1)
    recompute = plan_for(data_overrides, 1, "train.activation_checkpointing=true")
    assert base.batch.startswith("4 x") and double.batch.startswith("8 x")
    assert 1.7 <= double.activations / base.activations <= 2.1, (base.activations / MiB, double.activations / MiB)
    assert recompute.activations < 0.75 * base.activations, (base.activations / MiB, recompute.activations / MiB)
    assert double.weights == base.weights == recompute.weights


def test_the_command_prints_the_plan_and_refuses_a_bad_config(data_overrides, tmp_path):
    cmd = [sys.executable, "-m", "pretrain", "--plan", "--world-size", "2", "--config", str(TINY), *data_overrides]
    ok = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("memory plan: world 2 = TP 1 x DP 2")
    peak = int(lines[-1].removeprefix("peak_bytes="))
    parts = {line.split()[0]: float(line.split()[1]) for line in lines[1:5]}
    assert set(parts) == {"weights", "gradients", "optimizer", "activations"}
    assert abs(sum(parts.values()) - peak / MiB) < 0.3  # each part printed to 0.1 MiB
    bad = subprocess.run([*cmd, "parallel.tensor_parallel=3"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "error:" in bad.stderr and "tensor_parallel" in bad.stderr
