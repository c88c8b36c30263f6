"""Model FLOPs utilization (MFU) of a pretraining step: ours against Hugging Face BART of the same shape.

MFU = useful model FLOPs of a step / (step time x peak FLOP/s). Both models train on the same text in the same
run, steps interleaved so that load on a shared machine hits both alike; each figure is the median over the timed
steps of FLOPs / time. Ours runs the pretraining objective of the config (`--objective`, default: the config's BANG
+ ELMER mix, drawn per step by the data pipeline's own collator over synthetic documents); Hugging Face
BartForConditionalGeneration (built from a BartConfig of the same shape: nothing downloaded) runs BART's own
pretraining step, teacher-forced text infilling, on the BART/ELMER corruption of the same documents. A step is
forward + backward + torch's fused AdamW (the engine's, on CPU too), fp32 on CPU and bf16 weights on CUDA.

Peak: on CUDA the device's dense bf16 figure (H100 / H200: 989 TFLOP/s; table below) for `mfu`, and a large
bf16 GEMM measured in the same run is printed beside it; on CPU the best torch.matmul throughput measured in the
same run, same dtype and threads (there is no published figure that a 2-core VM reaches). On CPU the ratio of useful
FLOPs per CPU-second of the process (mfu_ratio_vs_hf_cpu) is printed before the last lines: where other jobs share
the cores, time-slicing inflates wall time (and each 2-thread matmul waits for its slower thread), not CPU time.

The FLOP formula (useful work only; a multiply-add is 2 FLOPs; backward = 2 x forward; per example b with s real
source tokens, t real target tokens, d = d_model, f = d_ffn, V = vocabulary, layers Le + Ld):
    encoder, per layer:   2(4d^2 + 2df) s                        Q K V O and the FFN on real tokens
                        + 4d s^2                                 scores and weighted sum, real pairs
    decoder, per layer:   2(4d^2 + 2d^2 + 2df) R                 self Q K V O, cross Q O, FFN on R = K t rows
                        + 4d^2 s                                 cross-attention K V of the encoder states
                        + 4d P + 4d R s                          self-attention over P visible pairs, cross
    head:                 2dV H                                  tied output projection on H rows with a loss
    step = 3 x sum over b (forward + backward)
K streams and the rows follow the objective's decoder layout: ar (BART, HF) K = 1, P = t(t+1)/2 (causal),
H = t; bang K = 1 + n, P = the visible (row, key) pairs of the bang stream mask among real rows, H = the trained
(stream, target) rows (span_index >= s); elmer K = 1 (mask slots), P = t^2 (bidirectional), H = t (each row's
loss at its exit layer; every layer is counted on every row, since exited rows still serve as keys and values).
Not counted: embeddings, norms, activations, softmax, the loss, the optimizer, padding, masked attention pairs.
tests/test_mfu.py checks it, with dense attention, against torch.utils.flop_counter.FlopCounterMode.

    python bench/mfu.py                                   # base shape; CPU: batch 4 x 64 tokens
    python bench/mfu.py --steps 2 --seq-len 32 --preset tiny   # quick
Last lines: mfu=, mfu_hf=, mfu_ratio_vs_hf=.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: do not spin idle OpenMP workers
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from model.config import SPECIAL, ModelConfig  # noqa: E402
from model.streams import build_streams  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
CUDA_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

LAYOUTS = {"ar": ("ar", "ar"), "bang": ("bang", "bang"), "elmer": ("elmer", "nar_bidir")}


# --- the formula --------------------------------------------------------------------------------------------------

def visible_pairs(layout: str, batch: dict[str, torch.Tensor], n_predict: int, dense: bool = False) -> torch.Tensor:
    """[B] (query row, key) pairs of decoder self-attention among real rows: visible per the layout's mask, or
    every pair of real rows (dense=True: what a dense kernel computes on an unpadded batch)."""
    real = batch["tgt_tokens"] != SPECIAL.pad
    mode = LAYOUTS[layout][1]
    streams = build_streams(mode, prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                            tgt_mask=real, n_predict=n_predict)
    rows = real.repeat(1, len(streams.names))
    if dense:
        return rows.sum(1) ** 2
    return (streams.attn_mask & rows[:, :, None] & rows[:, None, :]).sum((1, 2))


def head_rows(layout: str, batch: dict[str, torch.Tensor], n_predict: int) -> torch.Tensor:
    """[B] rows that go through the LM head with a loss."""
    real = batch["tgt_tokens"] != SPECIAL.pad
    if layout != "bang":
        return real.sum(1)
    span = batch["span_index"]
    return sum((real & (span >= s)).sum(1) for s in range(n_predict))


def step_flops(cfg: ModelConfig, batch: dict[str, torch.Tensor], layout: str, n_predict: int = 1,
               dense_attention: bool = False) -> int:
    """Model FLOPs of one training step (forward + backward) on `batch`; the formula of the module docstring."""
    d, f, V = cfg.d_model, cfg.d_ffn, cfg.vocab_size
    s = (batch["src_tokens"] != SPECIAL.pad).sum(1).long()
    t = (batch["tgt_tokens"] != SPECIAL.pad).sum(1).long()
    K = 1 + n_predict if layout == "bang" else 1
    R = K * t
    P = visible_pairs(layout, batch, n_predict, dense_attention).long()
    H = head_rows(layout, batch, n_predict).long()
    encoder = cfg.n_encoder_layers * (2 * (4 * d * d + 2 * d * f) * s + 4 * d * s * s)
    decoder = cfg.n_decoder_layers * (2 * (6 * d * d + 2 * d * f) * R + 4 * d * d * s + 4 * d * P + 4 * d * R * s)
    head = 2 * d * V * H
    return int(3 * (encoder + decoder + head).sum())


# --- batches: the data pipeline's collator over synthetic documents -----------------------------------------------

def synthetic_tables(vocab: int):
    from data_pipeline.corruption import CorruptionTables

    ends = np.zeros(vocab, dtype=bool)
    ends[6] = True  # token 6 ends a sentence (sentence permutation has sentences to permute)
    return CorruptionTables(vocab_size=vocab, word_start=np.ones(vocab, dtype=bool), sentence_end=ends)


@dataclass
class StepBatches:
    objective: str  # ours: bang | elmer | ar
    ours: dict[str, Any]
    hf: dict[str, Any]  # BART text infilling of the same documents


def make_batches(count: int, batch: int, seq_len: int, vocab: int, weights: dict[str, float],
                 seed: int = 0) -> list[StepBatches]:
    from data_pipeline.config import CorruptionConfig
    from data_pipeline.corruption import PretrainCollator, to_torch

    tables = synthetic_tables(vocab)
    rng = np.random.default_rng(seed)
    bart = PretrainCollator(CorruptionConfig(), tables, {"elmer": 1.0}, seed)
    ours = None if set(weights) == {"ar"} else PretrainCollator(CorruptionConfig(), tables, weights, seed)
    out = []
    for i in range(count):
        docs = rng.integers(7, vocab, size=(batch, seq_len))
        docs[:, 19::20] = 6  # sentences of 20 tokens
        samples = [(i * batch + j, {"tok": docs[j]}) for j in range(batch)]
        hf = to_torch(bart(samples, 0, i))
        mine = hf if ours is None else to_torch(ours(samples, 0, i))
        out.append(StepBatches("ar" if ours is None else mine["objective"], mine, hf))
    return out


# --- the two steps -----------------------------------------------------------------------------------------------

def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_models(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, n_predict: int):
    from transformers import BartForConditionalGeneration

    import finetune.objectives  # noqa: F401  (registers "ar")
    from model import parallel
    from model.hf_state import hf_config
    from model.seq2seq import Seq2SeqModel
    from pretrain.objectives import build

    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    ours = Seq2SeqModel(cfg).to(device=device, dtype=dtype).train()
    hf = BartForConditionalGeneration._from_config(hf_config(cfg), attn_implementation="sdpa")
    hf = hf.to(device=device, dtype=dtype).train()
    objectives = {"bang": build("bang", n_streams=n_predict, label_smoothing=0.1),
                  "elmer": build("elmer", n_layers=cfg.n_decoder_layers, label_smoothing=0.1),
                  "ar": build("ar", stream="ar", label_smoothing=0.1)}
    opt = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)  # the engine's AdamW, on CPU too
           for name, m in (("ours", ours), ("hf", hf))}
    return ours, hf, objectives, opt


def our_step(model, objectives, optimizer, objective: str, batch: dict[str, Any]) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss, _ = objectives[objective].loss(model, batch)
    loss.backward()
    optimizer.step()


def hf_step(model, optimizer, batch: dict[str, Any]) -> None:
    optimizer.zero_grad(set_to_none=True)
    labels = batch["tgt_tokens"].masked_fill(batch["tgt_tokens"] == SPECIAL.pad, -100)
    loss = model(input_ids=batch["src_tokens"], attention_mask=(batch["src_tokens"] != SPECIAL.pad).long(),
                 decoder_input_ids=batch["prev_tokens"], labels=labels).loss
    loss.backward()
    optimizer.step()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    return timed_wall_cpu(fn, device)[0]


def timed_wall_cpu(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


# --- peak ----------------------------------------------------------------------------------------------------------

def measured_matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 5) -> float:
    """The best FLOP/s of a square torch.matmul over the sizes and repeats."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            seconds = timed(lambda: a @ b, device)
            best = max(best, 2 * n ** 3 / seconds)
    return best


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, float, str]:
    """(peak used for MFU, measured GEMM FLOP/s, where the peak comes from)."""
    if device.type == "cuda":
        gemm = measured_matmul_peak(device, dtype, (8192,), repeats=10)
        name = torch.cuda.get_device_name(device)
        spec = next((v for k, v in CUDA_BF16_PEAK.items() if k in name), None)
        if spec is None or dtype != torch.bfloat16:
            return gemm, gemm, f"measured {dtype} GEMM on {name} (no table entry)"
        return spec, gemm, f"{name} dense bf16 spec"
    gemm = measured_matmul_peak(device, dtype, (256, 512, 768, 1024, 1536))
    return gemm, gemm, f"best torch.matmul {dtype}, {torch.get_num_threads()} threads"


# --- main ----------------------------------------------------------------------------------------------------------

def model_config(args) -> tuple[ModelConfig, int, dict[str, float]]:
    from pretrain.pretrain_config import load

    cfg = load(REPO_ROOT / args.config)
    overrides = {k: v for k, v in cfg.model.overrides.items()}
    preset = args.preset or cfg.model.preset
    model_cfg = ModelConfig.preset(preset, **overrides)
    n_predict = cfg.objective.bang.n_streams or model_cfg.n_predict
    weights = {args.objective: 1.0} if args.objective != "mix" else cfg.objective.active()
    return model_cfg, n_predict, weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain/base.yaml", help="pretraining config: model and mix")
    parser.add_argument("--preset", default="", help="model preset instead of the config's (e.g. tiny)")
    parser.add_argument("--objective", default="mix", choices=["mix", "bang", "elmer", "ar"],
                        help="ours: the config's mix, one of its objectives, or plain AR on BART's batch")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (0: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--seq-len", type=int, default=0, help="document tokens (0: 511 on CUDA, 64 on CPU)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each model (median; at 6 the CPU ratio "
                        "moved by up to 0.05 from run to run, BENCHMARKS.md)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="print where one step of each model spends its time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (32 if device.type == "cuda" else 4)
    seq_len = args.seq_len or (511 if device.type == "cuda" else 64)
    cfg, n_predict, weights = model_config(args)
    if seq_len + 2 > min(cfg.max_source_positions, cfg.max_target_positions):
        parser.error(f"--seq-len {seq_len}: the model takes {cfg.max_target_positions} positions")

    peak, gemm, peak_source = device_peak(device, dtype)
    ours, hf, objectives, opt = build_models(cfg, device, dtype, n_predict)
    steps = make_batches(args.warmup + args.steps, batch, seq_len, cfg.vocab_size, weights)
    print(f"# {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, {dtype}; model {cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, "
          f"d={cfg.d_model}, ffn={cfg.d_ffn}, vocab={cfg.vocab_size}, n_predict={n_predict}; batch {batch} x "
          f"{seq_len} tokens; ours: {'+'.join(weights)}, HF: BART text infilling")
    print(f"# peak {peak / 1e12:.3f} TFLOP/s ({peak_source}); measured GEMM {gemm / 1e12:.3f} TFLOP/s")
    if args.profile:
        profile(ours, hf, objectives, opt, steps[0], device)
        return

    rates: dict[str, list[float]] = {"ours": [], "hf": [], "ours_cpu": [], "hf_cpu": []}
    by_objective: dict[str, list[tuple[int, float]]] = {}
    for i, step in enumerate(steps):
        mine, theirs = to_device(step.ours, device), to_device(step.hf, device)
        t_ours, cpu_ours = timed_wall_cpu(lambda: our_step(ours, objectives, opt["ours"], step.objective, mine), device)
        t_hf, cpu_hf = timed_wall_cpu(lambda: hf_step(hf, opt["hf"], theirs), device)
        if i < args.warmup:
            continue
        f_ours = step_flops(cfg, step.ours, LAYOUTS[step.objective][0], n_predict)
        f_hf = step_flops(cfg, step.hf, "ar")
        rates["ours"].append(f_ours / t_ours)
        rates["hf"].append(f_hf / t_hf)
        rates["ours_cpu"].append(f_ours / cpu_ours)
        rates["hf_cpu"].append(f_hf / cpu_hf)
        by_objective.setdefault(step.objective, []).append((f_ours, t_ours))
        by_objective.setdefault("hf_bart", []).append((f_hf, t_hf))
    print(f"{'step':<10}{'steps':>6}{'GFLOP/step':>12}{'ms/step':>10}{'TFLOP/s':>9}{'MFU':>8}")
    for name, runs in by_objective.items():
        flops = statistics.mean(f for f, _ in runs)
        ms = 1000 * statistics.median(t for _, t in runs)
        rate = statistics.median(f / t for f, t in runs)
        print(f"{name:<10}{len(runs):>6}{flops / 1e9:>12.2f}{ms:>10.1f}{rate / 1e12:>9.3f}{rate / peak:>8.3f}")
    mfu, mfu_hf = statistics.median(rates["ours"]) / peak, statistics.median(rates["hf"]) / peak
    if device.type == "cuda":
        print(f"mfu_vs_measured_gemm={statistics.median(rates['ours']) / gemm:.4f}")
    else:  # FLOPs per CPU-second of this process: the steadier ratio where other jobs share the cores
        print(f"mfu_ratio_vs_hf_cpu={statistics.median(rates['ours_cpu']) / statistics.median(rates['hf_cpu']):.3f}")
    print(f"mfu={mfu:.4f}")
    print(f"mfu_hf={mfu_hf:.4f}")
    print(f"mfu_ratio_vs_hf={mfu / mfu_hf:.3f}")


def profile(ours, hf, objectives, opt, step: StepBatches, device: torch.device, rows: int = 22) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    mine, theirs = to_device(step.ours, device), to_device(step.hf, device)
    for name, fn in ((f"ours ({step.objective})", lambda: our_step(ours, objectives, opt["ours"], step.objective, mine)),
                     ("hf", lambda: hf_step(hf, opt["hf"], theirs))):
        fn()
        with torch_profile(activities=activities) as prof:
            for _ in range(2):
                fn()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n=== {name}: 2 steps ===")
        print(prof.key_averages().table(sort_by=key, row_limit=rows))


if __name__ == "__main__":
    main()
