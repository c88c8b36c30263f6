"""Data loader throughput against the trainer's demand, measured in the same run (CPU).

Loader side: the full training path of `data_pipeline.stream.build_pretrain_loader` over the tiny shards
(configs/data/tiny.yaml: 128-token samples, batch 16): webdataset tar reading, the planned shuffle/bucketing,
BANG or ELMER corruption per batch ({"bang": 0.5, "elmer": 0.5}) and collation in 2 DataLoader workers. Reported:
samples/s and text tokens/s (uncorrupted sample tokens) consumed by a loop that does nothing else.

Trainer side: one real pretraining step on the same batches (forward through the `bang` / `elmer` objective of
pretrain/objectives, backward, AdamW step) with model.seq2seq.Seq2SeqModel, presets "tiny" and "base" (vocab =
the tokenizer's padded 4096), alternating objectives as the mix does; demand = samples per second of step time
(median over the timed steps).

headroom = loader samples/s / the highest demand (the tiny model's): how many times faster the loader can feed
than the fastest trainer eats.

Shard verification: the sha256 the loader computes the first time it opens each shard in a run (loader.verify=
sha256), timed over every tiny shard, per sample, against the tiny model's step time per sample. Both sides run on the same machine one after the other, so neither slows the
other; on a shared box, compare the CPU-time figures printed beside the wall-clock ones.

    python bench/data_throughput.py                      # builds runs/data/tiny if needed; last line headroom=<x>
    python bench/data_throughput.py --loader-batches 600 --steps 6
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_pipeline.artifacts import load_manifest, sha256_file  # noqa: E402
from data_pipeline.config import REPO_ROOT, load_config  # noqa: E402
from data_pipeline.prepare import prepare  # noqa: E402
from data_pipeline.stream import build_pretrain_loader  # noqa: E402
from data_pipeline.tokenizer import EOS_ID  # noqa: E402

MIX = {"bang": 0.5, "elmer": 0.5}


def text_tokens(batch: dict) -> int:
    """Uncorrupted sample tokens in a batch (BANG keeps the length; ELMER's target is the text + EOS)."""
    if batch["objective"] == "bang":
        return int((batch["src_tokens"] != 0).sum())
    tgt = batch["tgt_tokens"]
    return int((tgt != 0).sum() - (tgt == EOS_ID).sum())


def measure_loader(cfg, workers: int, n_batches: int) -> dict:
    loader = build_pretrain_loader(cfg, dp_rank=0, dp_world_size=1, seed=0, objective_weights=MIX,
                                   num_workers=workers)
    it = loader.infinite()
    next(it)  # worker start-up is not throughput
    samples = tokens = 0
    t0 = os.times()
    wall0 = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
        samples += len(b["sample_ids"])
        tokens += text_tokens(b)
    wall = time.perf_counter() - wall0
    it.close()  # shuts the workers down: their CPU time then shows in os.times().children_*
    gc.collect()
    t1 = os.times()
    cpu = (t1.user - t0.user) + (t1.system - t0.system) + (t1.children_user - t0.children_user) + \
        (t1.children_system - t0.children_system)
    return {"samples_s": samples / wall, "tokens_s": tokens / wall, "batches": n_batches, "wall": wall,
            "samples_per_cpu_s": samples / cpu}


def measure_sha256(cfg) -> dict:
    """Hash every shard once, as the loader does on first opening (the page cache is warm: the bench just read
    them, and so has the loader when a training run opens a shard)."""
    shard_dir = cfg.in_work(cfg.loader.shard_dir)
    manifest = load_manifest(shard_dir)
    paths = [shard_dir / s["name"] for s in manifest["shards"]]
    nbytes = sum(p.stat().st_size for p in paths)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for p in paths:
        sha256_file(p)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"mb_s": nbytes / wall / 1e6, "us_per_sample": wall / manifest["num_samples"] * 1e6,
            "cpu_us_per_sample": cpu / manifest["num_samples"] * 1e6, "mb": nbytes / 1e6}


def trainer_batches(cfg, n: int) -> list[dict]:
    loader = build_pretrain_loader(cfg, dp_rank=0, dp_world_size=1, seed=1, objective_weights=MIX, num_workers=0)
    batches, it = [], loader.infinite()
    while len(batches) < n or {b["objective"] for b in batches} != set(MIX):
        batches.append(next(it))
    return batches


def build_step(preset: str, vocab: int):
    """A real step if the model and objectives import; otherwise a labelled plain torch stand-in."""
    try:
        from model.config import ModelConfig
        from model.seq2seq import Seq2SeqModel
        from pretrain import objectives

        mcfg = ModelConfig.preset(preset, vocab_size=vocab)
        model = Seq2SeqModel(mcfg)
        objs = {"bang": objectives.build("bang", n_streams=mcfg.n_predict),
                "elmer": objectives.build("elmer", n_layers=mcfg.n_decoder_layers, seed=0)}
        label = f"Seq2SeqModel preset {preset} (d={mcfg.d_model}, {mcfg.n_encoder_layers}+{mcfg.n_decoder_layers} " \
                f"layers, n_predict={mcfg.n_predict})"

        def loss_fn(batch):
            return objs[batch["objective"]].loss(model, batch)[0]
    except ImportError as exc:  # the model is written elsewhere; keep the bench usable without it
        shapes = {"tiny": (64, 4, 128, 2), "base": (768, 12, 3072, 6)}
        d, h, f, n = shapes[preset]
        emb = torch.nn.Embedding(vocab, d)
        net = torch.nn.Transformer(d, h, n, n, f, dropout=0.1, batch_first=True)
        model = torch.nn.ModuleDict({"emb": emb, "net": net})
        label = f"STAND-IN plain torch nn.Transformer of the {preset} shape (model import failed: {exc})"

        def loss_fn(batch):
            out = net(emb(batch["src_tokens"]), emb(batch["prev_tokens"]))
            return torch.nn.functional.cross_entropy((out @ emb.weight.T).flatten(0, 1), batch["tgt_tokens"].flatten(),
                                                     ignore_index=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, label, sum(p.numel() for p in model.parameters())


def measure_trainer(preset: str, batches: list[dict], vocab: int, steps: int) -> dict:
    step, label, params = build_step(preset, vocab)
    step(batches[0])  # warm-up (allocations, first-call overheads)
    walls, cpus, samples = [], [], []
    for i in range(steps):
        b = batches[(i + 1) % len(batches)]
        w0, c0 = time.perf_counter(), time.process_time()
        step(b)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        samples.append(len(b["sample_ids"]))
    per_sample = statistics.median(w / s for w, s in zip(walls, samples))
    per_sample_cpu = statistics.median(c / s for c, s in zip(cpus, samples))
    return {"label": label, "params": params, "step_s": statistics.median(walls), "samples_s": 1 / per_sample,
            "samples_per_cpu_s": 1 / per_sample_cpu, "tokens_s": 128 / per_sample}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO_ROOT / "configs/data/tiny.yaml"))
    ap.add_argument("--work-dir", default="runs/data/tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-batches", type=int, default=800)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per model")
    args = ap.parse_args()

    cfg = load_config(args.config, [f"work_dir={args.work_dir}"])
    prepare(cfg)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    lo = measure_loader(cfg, args.workers, args.loader_batches)
    print(f"loader ({args.workers} workers, batch {cfg.loader.batch_size}x{cfg.shard.seq_len}, bang/elmer mix): "
          f"{lo['samples_s']:.0f} samples/s, {lo['tokens_s']:.0f} tokens/s over {lo['batches']} batches "
          f"({lo['wall']:.1f} s; {lo['samples_per_cpu_s']:.0f} samples per CPU second, main process + workers)",
          flush=True)

    vocab = build_pretrain_loader(cfg, dp_rank=0, dp_world_size=1, seed=0, objective_weights=MIX,
                                  num_workers=0).padded_vocab_size
    batches = trainer_batches(cfg, 6)
    demand, cpu_demand = {}, {}
    for preset in ("tiny", "base"):
        steps = args.steps if preset == "tiny" else max(2, args.steps // 3)
        tr = measure_trainer(preset, batches, vocab, steps)
        demand[preset] = tr["samples_s"]
        cpu_demand[preset] = tr["samples_per_cpu_s"]
        print(f"trainer {preset}: {tr['label']}, {tr['params'] / 1e6:.1f}M params: step {tr['step_s'] * 1000:.0f} ms "
              f"-> demand {tr['samples_s']:.1f} samples/s ({tr['tokens_s']:.0f} tokens/s; "
              f"{tr['samples_per_cpu_s']:.1f} samples per CPU second); loader headroom "
              f"{lo['samples_s'] / tr['samples_s']:.1f}x", flush=True)
    sha = measure_sha256(cfg)
    step_us = 1e6 / max(demand.values())
    print(f"shard sha256: {sha['mb_s']:.0f} MB/s over {sha['mb']:.1f} MB, {sha['us_per_sample']:.2f} us per sample "
          f"({sha['cpu_us_per_sample']:.2f} CPU us), once per shard and run = {sha['us_per_sample'] / step_us:.1e} of "
          f"the tiny model's step time per sample ({step_us:.0f} us)")
    print(f"cpu_headroom={lo['samples_per_cpu_s'] / max(cpu_demand.values()):.1f} (CPU seconds: loader samples per "
          f"CPU second / trainer samples per CPU second; insensitive to other load on the machine)")
    print(f"headroom={lo['samples_s'] / max(demand.values()):.1f}")


if __name__ == "__main__":
    main()
