"""Training-step throughput of our model against Hugging Face BART of identical shape, CPU, TP=1.

Both models hold the same weights (ours exported through model.hf; HF with attn_implementation="sdpa"), see the
same padded batch and take the same step: forward, loss (mean cross entropy over real target tokens), backward,
torch AdamW; before timing, both losses are checked equal with dropout off. Steps alternate ours / HF so that
load on the machine hits both alike; the figure is the median of the timed steps after warmup. tokens/s counts
real (non-pad) source + target tokens. Wall-clock tokens/s is the figure (ratio_vs_hf); tokens per CPU second of
this process is printed beside it (ratio_vs_hf_cpu) because on a shared machine time-slicing by other processes
inflates wall time but hardly CPU time: trust the CPU ratio when the +- spread column is large.

Also measured on the base-like shape: a `bang` training step with n=2 predicting streams against plain `ar`
(same targets), and decoding (no grad, eval) of a fixed number of tokens: AR greedy with the main-stream KV
cache, bang_ar greedy, semi-NAR (block 4) and NAR one pass, plus HF greedy generate as a peer.

    python bench/model_step.py                  # tiny and base-like shapes; last line ratio_vs_hf=<x>
    python bench/model_step.py --profile base   # where the time of one step goes, ours and HF
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

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The machine may be shared: spinning OpenMP workers collapse when cores are oversubscribed (set before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import SPECIAL, ModelConfig  # noqa: E402
from model.hf import to_hf  # noqa: E402
from model.seq2seq import Seq2SeqModel  # noqa: E402
from model.streams import build_streams  # noqa: E402


@dataclass
class Shape:
    preset: str
    batch: int
    src_len: int
    tgt_len: int
    gen_len: int  # tokens generated per example in the decoding comparison


SHAPES = {
    "tiny": Shape("tiny", batch=16, src_len=64, tgt_len=64, gen_len=32),
    # The base preset itself (6+6 layers, d=768, 12 heads, FFN 3072, vocab 30592), short sequences.
    "base": Shape("base", batch=4, src_len=64, tgt_len=64, gen_len=32),
}


@dataclass
class Batch:
    src: torch.Tensor  # [B, S], right-padded
    prev: torch.Tensor  # [B, T] BOS then targets shifted right
    tgt: torch.Tensor  # [B, T] targets ending with EOS, right-padded
    tgt_mask: torch.Tensor  # [B, T] real targets

    @property
    def tokens(self) -> int:
        return int((self.src != SPECIAL.pad).sum() + self.tgt_mask.sum())


def make_batch(shape: Shape, vocab: int, seed: int = 0) -> Batch:
    """Random tokens; every row's length drawn from [3/4 L, L], as a length-bucketed batch would have."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = shape.batch, shape.src_len, shape.tgt_len
    src_lens = torch.randint(3 * S // 4, S + 1, (B,), generator=g)
    tgt_lens = torch.randint(3 * T // 4, T + 1, (B,), generator=g)
    src = torch.randint(SPECIAL.sep + 1, vocab, (B, S), generator=g)
    src[torch.arange(S)[None] >= src_lens[:, None]] = SPECIAL.pad
    tgt = torch.randint(SPECIAL.sep + 1, vocab, (B, T), generator=g)
    tgt[torch.arange(T)[None] == (tgt_lens - 1)[:, None]] = SPECIAL.eos
    tgt_mask = torch.arange(T)[None] < tgt_lens[:, None]
    tgt[~tgt_mask] = SPECIAL.pad
    prev = torch.cat([torch.full((B, 1), SPECIAL.bos), tgt[:, :-1]], dim=1)
    return Batch(src, prev, tgt, tgt_mask)


# --- one training step of each model ---------------------------------------------------------------------

def our_loss(model: Seq2SeqModel, b: Batch, mode: str = "ar", n_predict: int = 2) -> torch.Tensor:
    streams = build_streams(mode, prev_tokens=b.prev, tgt_mask=b.tgt_mask, n_predict=n_predict)
    hidden = model(b.src, streams).hidden
    names = ["main"] if mode == "ar" else [n for n in streams.names if n != "main"]
    mask = b.tgt_mask.float()
    losses = [(model.token_loss(streams.slice(hidden, n), b.tgt) * mask).sum() / mask.sum() for n in names]
    return sum(losses) / len(losses)


def hf_loss(hf_model, b: Batch) -> torch.Tensor:
    # The usual HF seq2seq training call: labels with -100 at pads, no decoder_attention_mask.
    labels = b.tgt.masked_fill(~b.tgt_mask, -100)
    return hf_model(input_ids=b.src, attention_mask=(b.src != SPECIAL.pad).long(), decoder_input_ids=b.prev,
                    labels=labels).loss


def timed_step(loss_fn, optimizer) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step. On a shared machine the CPU time is the
    steadier figure: time-slicing by other processes inflates wall time, not CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def median_after_warmup(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def spread(times: list[float], warmup: int) -> float:
    """Relative half-range of the timed steps around their median (a noise indicator)."""
    t = times[warmup:]
    return (max(t) - min(t)) / 2 / statistics.median(t)


def build(shape: Shape, seed: int = 0) -> tuple[Seq2SeqModel, torch.nn.Module]:
    torch.manual_seed(seed)
    model = Seq2SeqModel(ModelConfig.preset(shape.preset)).train()
    hf_model = to_hf(model, attn_implementation="sdpa").train()
    return model, hf_model


def check_same_loss(model: Seq2SeqModel, hf_model, b: Batch) -> None:
    """Same weights, same batch, same loss (dropout off): the two steps do the same work."""
    model.eval()
    hf_model.eval()
    with torch.no_grad():
        ours, theirs = float(our_loss(model, b)), float(hf_loss(hf_model, b))
    model.train()
    hf_model.train()
    if abs(ours - theirs) > 1e-4:
        raise RuntimeError(f"our loss {ours:.6f} != HF loss {theirs:.6f}: the comparison would be unfair")


def train_figures(shape: Shape, steps: int, warmup: int, with_bang: bool) -> dict[str, float]:
    model, hf_model = build(shape)
    b = make_batch(shape, model.cfg.vocab_size)
    check_same_loss(model, hf_model, b)
    opt_ours, opt_hf = adamw(model), adamw(hf_model)
    runs = {"ours_ar": (lambda: our_loss(model, b), opt_ours), "hf": (lambda: hf_loss(hf_model, b), opt_hf)}
    if with_bang:
        runs["ours_bang2"] = (lambda: our_loss(model, b, "bang", 2), opt_ours)
    walls, cpus = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(warmup + steps):  # interleaved, so that machine load hits every run alike
        for name, (loss_fn, opt) in runs.items():
            wall, cpu = timed_step(loss_fn, opt)
            walls[name].append(wall)
            cpus[name].append(cpu)
    figures = {name: b.tokens / median_after_warmup(t, warmup) for name, t in walls.items()}
    figures.update({f"{name}_cpu": b.tokens / median_after_warmup(t, warmup) for name, t in cpus.items()})
    figures.update({f"{name}_spread": spread(t, warmup) for name, t in walls.items()})
    return figures


# --- decoding (no grad, eval) ----------------------------------------------------------------------------

def decode_figures(shape: Shape, repeats: int) -> dict[str, float]:
    """Output tokens/s for a fixed output length (EOS banned before gen_len and forced at it)."""
    from model.generation import DecodeOptions, decode

    model, hf_model = build(shape)
    model.eval()
    hf_model.eval()
    src = make_batch(shape, model.cfg.vocab_size, seed=1).src
    L = shape.gen_len
    runs = {
        "ar_greedy": lambda: decode("ar_greedy", model, src, DecodeOptions(min_len=L, max_len=L)),
        "bang_ar_greedy": lambda: decode("ar_greedy", model, src,
                                         DecodeOptions(min_len=L, max_len=L, ar_logits="bang_ar")),
        "semi_nar_k4": lambda: decode("semi_nar", model, src, DecodeOptions(min_len=L, max_len=L, block_size=4)),
        "nar_one_pass": lambda: decode("nar", model, src, DecodeOptions(length_source="fixed", fixed_length=L + 1,
                                                                      postprocess=False)),
        "hf_greedy": lambda: hf_model.generate(input_ids=src, attention_mask=(src != SPECIAL.pad).long(),
                                               max_new_tokens=L + 1, min_new_tokens=L + 1, num_beams=1,
                                               do_sample=False),
    }
    walls, cpus = {name: [] for name in runs}, {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(1 + repeats):
            for name, fn in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
    out_tokens = shape.batch * (L + 1)
    figures = {name: out_tokens / median_after_warmup(t, 1) for name, t in walls.items()}
    figures.update({f"{name}_cpu": out_tokens / median_after_warmup(t, 1) for name, t in cpus.items()})
    return figures


# --- profile ---------------------------------------------------------------------------------------------

def profile(shape: Shape, steps: int = 3, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model, hf_model = build(shape)
    b = make_batch(shape, model.cfg.vocab_size)
    for name, loss_fn, opt in (("ours (ar)", lambda: our_loss(model, b), adamw(model)),
                               ("hf", lambda: hf_loss(hf_model, b), adamw(hf_model))):
        timed_step(loss_fn, opt)  # warmup
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(steps):
                timed_step(loss_fn, opt)
        print(f"\n=== {name}: {steps} steps, shape {shape} ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shapes", default="tiny,base", help=f"comma-separated, from {sorted(SHAPES)}; the "
                        "last one gives ratio_vs_hf, bang and decoding figures")
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--profile", choices=sorted(SHAPES), help="profile one step of each model and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(SHAPES[args.profile])
        return
    names = args.shapes.split(",")
    for name in names:
        if name not in SHAPES:
            parser.error(f"--shapes: {name!r} is unknown; choose from {sorted(SHAPES)}")
    print(f"# torch {torch.__version__}, {args.threads} threads, fp32, TP=1, median of {args.steps} interleaved "
          f"steps after {args.warmup} warmup; tokens = real source + target tokens; step = fwd + bwd + AdamW")
    print(f"# wall: tokens/s by wall clock; cpu: by this process's CPU time; +-: half-range of step times / median")
    print(f"{'shape':<32} {'ours tok/s':>10} {'HF tok/s':>9} {'ours/HF':>8} {'cpu ours/HF':>11} {'+-ours':>7} "
          f"{'+-HF':>6} {'bang2 tok/s':>11} {'bang2/ar':>8}")
    ratio = cpu_ratio = None
    for i, name in enumerate(names):
        shape = SHAPES[name]
        last = i == len(names) - 1
        f = train_figures(shape, args.steps, args.warmup, with_bang=last)
        ratio, cpu_ratio = f["ours_ar"] / f["hf"], f["ours_ar_cpu"] / f["hf_cpu"]
        label = f"{name} (B={shape.batch}, S={shape.src_len}, T={shape.tgt_len})"
        bang = f"{f['ours_bang2']:>11.0f} {f['ours_bang2'] / f['ours_ar']:>8.2f}" if last else ""
        print(f"{label:<32} {f['ours_ar']:>10.0f} {f['hf']:>9.0f} {ratio:>8.2f} "
              f"{cpu_ratio:>11.2f} {f['ours_ar_spread']:>7.0%} {f['hf_spread']:>6.0%} {bang}",
              flush=True)
    shape = SHAPES[names[-1]]
    d = decode_figures(shape, args.decode_repeats)
    print(f"\n# decoding, {names[-1]}: B={shape.batch}, S={shape.src_len}, {shape.gen_len} tokens + EOS per "
          f"example, no grad; output tokens/s (median of {args.decode_repeats} after 1 warmup)")
    print(f"{'decoder':<16} {'tok/s':>8} {'vs ar_greedy':>13} {'cpu vs ar_greedy':>17}")
    for name in [n for n in d if not n.endswith("_cpu")]:
        print(f"{name:<16} {d[name]:>8.0f} {d[name] / d['ar_greedy']:>13.2f} "
              f"{d[name + '_cpu'] / d['ar_greedy_cpu']:>17.2f}")
    print(f"ratio_vs_hf_cpu={cpu_ratio:.3f}")
    print(f"ratio_vs_hf={ratio:.3f}")


if __name__ == "__main__":
    main()
