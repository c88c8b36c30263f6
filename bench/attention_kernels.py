"""Dense SDPA against FlexAttention block masks for the decoder's stream layouts.

    .venv/bin/python bench/attention_kernels.py [--batch 8] [--heads 12] [--head-dim 64] [--lengths 128 256]

Layouts: bang with n=2 predicting streams (3T rows, shape-only rule, block mask cached) and janus (5T rows,
per-batch rule: 70% of targets NAR-masked). Both attend over the same rule; the dense path hands SDPA the
[B, L, L] boolean mask from model/streams.py, the flex path hands compiled FlexAttention the BlockMask from
model/attention.py. On CPU only the forward is timed (torch 2.13 has no FlexAttention backward on CPU); on CUDA
forward and forward+backward. Prints one line per (layout, T) and the shares of skipped / partial / full tiles.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.attention import SPARSE_BLOCK, attend, block_kinds, stream_block_mask  # noqa: E402
from model.streams import build_streams  # noqa: E402


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def layout(name: str, T: int, B: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(6, 1000, (B, T), generator=g)
    if name == "bang":
        streams = build_streams("bang", prev_tokens=prev, n_predict=2)
        masked = None
        build = lambda: stream_block_mask("bang", T, n_predict=2, device=device)  # noqa: E731
    else:
        masked = torch.rand(B, T, generator=g) < 0.7
        streams = build_streams("janus", prev_tokens=prev, tgt_tokens=prev, masked=masked)
        masked = masked.to(device)
        build = lambda: stream_block_mask("janus", T, masked=masked, device=device)  # noqa: E731
    return streams.attn_mask.to(device), build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--layouts", nargs="+", default=["bang", "janus"], choices=["bang", "janus"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    B, H, hd = args.batch, args.heads, args.head_dim
    what = "fwd+bwd" if device.type == "cuda" else "fwd (no_grad)"
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"torch {torch.__version__} on {where}; B={B} heads={H} head_dim={hd} {args.dtype} tile={SPARSE_BLOCK}")
    for name in args.layouts:
        for T in args.lengths:
            mask, build = layout(name, T, B, device)
            L = mask.shape[-1]
            g = torch.Generator().manual_seed(1)
            q, k, v = (torch.randn(B, H, L, hd, generator=g).to(device, dtype) for _ in range(3))

            start = time.perf_counter()
            block_mask = build()
            build_s = time.perf_counter() - start
            kinds = block_kinds(block_mask)
            shares = [(kinds == kind).float().mean().item() for kind in (0, 1, 2)]

            with torch.no_grad():
                start = time.perf_counter()
                out_flex = attend(q, k, v, block_mask, backend="flex")
                compile_s = time.perf_counter() - start
                out_dense = attend(q, k, v, mask, backend="sdpa")
                diff = (out_flex.float() - out_dense.float()).abs().max().item()
                dense_s = timed(lambda: attend(q, k, v, mask, backend="sdpa"), args.repeats, device)
                flex_s = timed(lambda: attend(q, k, v, block_mask, backend="flex"), args.repeats, device)
            line = (f"{name:5s} T={T:4d} L={L:5d}  tiles skipped/partial/full {shares[0]:.2f}/{shares[1]:.2f}/"
                    f"{shares[2]:.2f}  block_mask {build_s * 1e3:7.1f} ms  first flex call (compile) "
                    f"{compile_s:5.1f} s  fwd: sdpa {dense_s * 1e3:8.2f} ms  flex {flex_s * 1e3:8.2f} ms  "
                    f"speedup {dense_s / flex_s:4.2f}x  max|diff| {diff:.1e}")
            if device.type == "cuda":
                for t in (q, k, v):
                    t.requires_grad_(True)

                def step(backend, m):
                    out = attend(q, k, v, m, backend=backend)
                    torch.autograd.grad(out.float().square().sum(), (q, k, v))

                dense_b = timed(lambda: step("sdpa", mask), args.repeats, device)
                flex_b = timed(lambda: step("flex", block_mask), args.repeats, device)
                line += f"  {what}: sdpa {dense_b * 1e3:8.2f} ms  flex {flex_b * 1e3:8.2f} ms " \
                        f"speedup {dense_b / flex_b:4.2f}x"
                for t in (q, k, v):
                    t.requires_grad_(False)
            print(line, flush=True)


if __name__ == "__main__":
    main()
