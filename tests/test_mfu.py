"""bench/mfu.py: its FLOP formula against torch's FlopCounterMode, and the script's last lines (a short run).

The counter sees what the kernels compute, so the check uses unpadded batches and dense attention (SDPA's math
backend, whose matmuls the counter counts): there the formula must equal the count exactly, for our BANG step
(LM head on the trained rows), our ELMER step (exit layers) and Hugging Face BART's step. The reported formula
counts only visible attention pairs; that part is checked against the masks' own arithmetic.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_mfu", REPO_ROOT / "bench" / "mfu.py")
mfu = sys.modules["bench_mfu"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mfu)

B, S, T, N_PREDICT = 2, 11, 8, 3


@pytest.fixture(scope="module")
def models():
    from model.config import ModelConfig

    cfg = ModelConfig.preset("tiny", vocab_size=512, dropout=0.0, attention_dropout=0.0)
    ours, hf, objectives, _ = mfu.build_models(cfg, torch.device("cpu"), torch.float32, N_PREDICT)
    return cfg, ours, hf, objectives


def unpadded_batch(layout: str) -> dict:
    g = torch.Generator().manual_seed(3)
    tgt = torch.randint(7, 512, (B, T), generator=g)
    span = torch.arange(T).expand(B, T) % 4 if layout == "bang" else torch.arange(T).expand(B, T)
    return {"src_tokens": torch.randint(7, 512, (B, S), generator=g), "tgt_tokens": tgt,
            "prev_tokens": torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], 1),
            "tgt_positions": torch.arange(1, T + 1).expand(B, T), "span_index": span,
            "span_counts": torch.bincount(span.reshape(-1)).tolist()}  # as the data pipeline's collator gives


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("layout", ["bang", "elmer", "ar"])
def test_formula_equals_torch_flop_counter_on_unpadded_batches(models, layout):
    cfg, ours, hf, objectives = models
    batch = unpadded_batch(layout)
    formula = mfu.step_flops(cfg, batch, layout, N_PREDICT, dense_attention=True)
    ours.zero_grad()
    assert counted(lambda: objectives[layout].loss(ours, batch)[0]) == formula
    if layout == "ar":  # BART's own step, the same formula
        labels = batch["tgt_tokens"]
        assert counted(lambda: hf(input_ids=batch["src_tokens"], decoder_input_ids=batch["prev_tokens"],
                                  labels=labels).loss) == formula
    if layout == "bang":  # without the host-side counts the head runs on every predicting row, trained or not
        untrained = B * N_PREDICT * T - int(mfu.head_rows("bang", batch, N_PREDICT).sum())
        del batch["span_counts"]
        assert counted(lambda: objectives[layout].loss(ours, batch)[0]) - formula == \
            3 * 2 * cfg.d_model * cfg.vocab_size * untrained > 0


def test_visible_pairs_follow_the_masks_on_real_rows():
    batch = unpadded_batch("bang")
    batch["tgt_tokens"][1, 5:] = 0  # example 1: 5 real targets
    t = torch.tensor([T, 5])
    assert mfu.visible_pairs("ar", batch, 1).tolist() == (t * (t + 1) // 2).tolist()
    assert mfu.visible_pairs("elmer", batch, 1).tolist() == (t * t).tolist()
    bang = mfu.visible_pairs("bang", batch, N_PREDICT)
    assert (bang < ((N_PREDICT + 1) * t) ** 2).all() and (bang > (N_PREDICT + 1) * t).all()
    real = batch["tgt_tokens"] != 0
    assert mfu.head_rows("bang", batch, N_PREDICT).tolist() == [
        int((real[b] & (batch["span_index"][b] >= torch.arange(N_PREDICT)[:, None])).sum()) for b in range(B)]


def test_script_prints_the_three_figures():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "bench/mfu.py", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                           "--batch", "2", "--seq-len", "24", "--threads", "1"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-3:]
    assert [line.split("=")[0] for line in last] == ["mfu", "mfu_hf", "mfu_ratio_vs_hf"]
    mine, theirs, ratio = (float(line.split("=")[1]) for line in last)
    assert 0 < mine < 1 and 0 < theirs < 1
    assert ratio == pytest.approx(mine / theirs, rel=0.01)
