"""Decoding latency per mode on one model and one set of inputs: AR beam 4, AR greedy, NAR, semi-NAR (k=4),
mask-predict (10 iterations) and ELMER early exit, at batch 1 and batch 32, as ratios to AR beam 4.

Every mode produces the same number of output tokens (`--tgt-len`, EOS excluded), so the figures compare decoding
procedures, not how long each mode happens to make its outputs: AR and semi-NAR run with min_len = max_len =
tgt-len (semi-NAR without collapsing repeats, which would shorten outputs); the NAR modes get tgt-len + 1 slots
(the length head is skipped: `length_source=fixed`). Mask-predict always runs its 10 passes with this length.
Early exit uses the entropy threshold given (`--exit-entropy`) and reports the mean exit layer it reached: with
random weights few slots are confident, so expect the last layer; pass `--checkpoint` (a finetuning or
pretraining output folder, or a final_model.pt) to measure a trained model. `early_exit@k` rows exit every slot at
layer k (`--exit-layers`, those within the model's decoder layers): k of the L layers run, no entropy computed.

Latency is the wall time of `model.generation.decode` (encoder + decoder + search, like fairseq's timer) per
sample: at batch 1 the time of one call; at batch B the time of one call / B. Modes are interleaved round by round
so that load on a shared machine hits them alike. In a round each mode runs `--repeats` times back to back and
keeps its fastest call (Python's garbage collector off while timing, as timeit does); each figure is the median
over the rounds, after `--warmup` rounds. The CPU time of the process per call is printed beside it.

Why (issue 10): a run once gave NAR one pass 563 ms/sample at batch 1 but early exit 352 ms, although early exit
runs the same encoder and 6 decoder layers plus a full-vocabulary entropy after each of the first 5. Timed part by
part at the base shape (src 128, 49 slots; 2 threads), one NAR pass is encoder ~160 ms + decoder ~125 ms + head
and log-softmax ~60 ms of CPU time, stable to +-10% from call to call, and early exit ~2x that (five more heads):
the computation cannot give that order. Wall time did: the same calls jumped to 2x (encoder 160 -> 328 ms, head
60 -> 174 ms) whenever another process took one of the two cores, because each matmul's two threads wait for the
slower one. NAR's call is the shortest of all modes, so one such interruption can land on most of its samples.
Fastest-of-repeats per round drops the interrupted calls, and the CPU column shows what the computation costs.

    python bench/decode_latency.py                          # base preset (6+6, d=768, vocab 30592), src 128, tgt 48
    python bench/decode_latency.py --preset tiny --rounds 3  # quick
Last lines: nar_speedup_b1_cpu=<the same by CPU time>, nar_speedup_b1=<AR beam 4 latency / NAR latency at batch 1>.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: do not spin idle OpenMP workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model import parallel  # noqa: E402
from model.config import SPECIAL, ModelConfig  # noqa: E402
from model.generation import DecodeOptions, decode  # noqa: E402
from model.seq2seq import Seq2SeqModel  # noqa: E402


def modes(tgt_len: int, exit_entropy: float, exit_layers: list[int]) -> dict[str, tuple[str, DecodeOptions]]:
    fixed = dict(length_source="fixed", fixed_length=tgt_len + 1)
    ar = dict(min_len=tgt_len, max_len=tgt_len, ar_logits="bang_ar")
    return {
        "ar_beam4": ("ar_beam", DecodeOptions(beam_size=4, length_penalty=1.0, **ar)),
        "ar_greedy": ("ar_greedy", DecodeOptions(**ar)),
        "nar": ("nar", DecodeOptions(nar_mode="nar_bidir", **fixed)),
        "semi_nar_k4": ("semi_nar", DecodeOptions(block_size=4, min_len=tgt_len, max_len=tgt_len, postprocess=False)),
        "mask_predict_10": ("mask_predict", DecodeOptions(iterations=10, **fixed)),
        "early_exit": ("early_exit", DecodeOptions(exit_entropy=exit_entropy, **fixed)),
        **{f"early_exit@{k}": ("early_exit", DecodeOptions(exit_layer=k, **fixed)) for k in exit_layers},
    }


def sources(batch: int, src_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids of real-looking sources: lengths spread over the last quarter of src_len, right padded."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(SPECIAL.sep + 1, vocab, (batch, src_len), generator=g)
    lengths = src_len - torch.randint(0, max(src_len // 4, 1), (batch,), generator=g)
    lengths[0] = src_len
    src[torch.arange(src_len)[None, :] >= lengths[:, None]] = SPECIAL.pad
    return src


def build_model(args) -> Seq2SeqModel:
    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    if args.checkpoint:
        from pretrain.core import load_into, read_weights as read_init

        weights = read_init(args.checkpoint)
        if not weights.meta.get("model_config"):
            raise SystemExit("--checkpoint: give weights that carry their model config (a final_model.pt)")
        model = Seq2SeqModel(ModelConfig(**weights.meta["model_config"]))
        load_into(model, weights)
    else:
        overrides = {"n_encoder_layers": args.layers, "n_decoder_layers": args.layers} if args.layers else {}
        model = Seq2SeqModel(ModelConfig.preset(args.preset, dropout=0.0, attention_dropout=0.0, **overrides))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--layers", type=int, default=0, help="encoder and decoder layers (0: the preset's)")
    parser.add_argument("--checkpoint", default="",
                        help="trained weights (final_model.pt or a run folder) instead of random weights")
    parser.add_argument("--src-len", type=int, default=128)
    parser.add_argument("--tgt-len", type=int, default=48)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocator, caches)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per mode and round; the fastest counts")
    parser.add_argument("--exit-entropy", type=float, default=1.0)
    parser.add_argument("--exit-layers", default="2,4", help="fixed exit layers to time (early_exit@k rows)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model and the sources go there; fp32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args).to(device)
    cfg = model.cfg
    print(f"model: {cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, d={cfg.d_model}, heads={cfg.n_heads}, "
          f"ffn={cfg.d_ffn}, vocab={cfg.vocab_size} ({'checkpoint' if args.checkpoint else 'random weights'}); "
          f"src {args.src_len} tokens, output {args.tgt_len} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, {device}")
    exit_layers = [int(k) for k in args.exit_layers.split(",") if k and int(k) <= cfg.n_decoder_layers]
    table = modes(args.tgt_len, args.exit_entropy, exit_layers)
    results: dict[tuple[str, int], dict] = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        src = sources(batch, args.src_len, min(cfg.vocab_size, 30000)).to(device)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in table}
        figures: dict[str, dict] = {}
        for round_ in range(args.warmup + args.rounds):
            for name, (mode, options) in table.items():
                calls = []
                for _ in range(args.repeats):
                    out, wall, cpu = timed_decode(mode, model, src, options)
                    calls.append((wall, cpu))
                lengths = {len(t) for t in out.tokens}
                if mode in ("ar_beam", "ar_greedy", "semi_nar") and lengths != {args.tgt_len}:
                    raise RuntimeError(f"{name}: outputs of lengths {lengths}, expected {args.tgt_len}")
                if round_ >= args.warmup:
                    times[name].append(min(calls))
                figures[name] = out.figures
        for name in table:
            seconds = statistics.median(wall for wall, _ in times[name])
            cpu = statistics.median(cpu for _, cpu in times[name])
            results[(name, batch)] = {"ms_per_sample": 1000 * seconds / batch, "samples_per_s": batch / seconds,
                                      "cpu_ms_per_sample": 1000 * cpu / batch,
                                      "passes": figures[name].get("decoder_passes"),
                                      "exit": figures[name].get("mean_exit_layer")}
    print(f"{'mode':<16}{'batch':>6}{'ms/sample':>12}{'samples/s':>12}{'speedup':>10}{'cpu ms/sample':>15}"
          f"{'passes':>8}{'exit layer':>12}")
    for (name, batch), r in results.items():
        base = results[("ar_beam4", batch)]["ms_per_sample"]
        exit_layer = f"{r['exit']:.2f}" if r["exit"] is not None else "-"
        print(f"{name:<16}{batch:>6}{r['ms_per_sample']:>12.2f}{r['samples_per_s']:>12.1f}"
              f"{base / r['ms_per_sample']:>9.1f}x{r['cpu_ms_per_sample']:>15.2f}{str(r['passes']):>8}{exit_layer:>12}")
    first = int(args.batches.split(",")[0])
    ratio = lambda key: results[("ar_beam4", first)][key] / results[("nar", first)][key]  # noqa: E731
    print(f"nar_speedup_b{first}_cpu={ratio('cpu_ms_per_sample'):.2f}")
    print(f"nar_speedup_b{first}={ratio('ms_per_sample'):.2f}")


def timed_decode(mode: str, model, src: torch.Tensor, options: DecodeOptions):
    """(result, wall seconds, CPU seconds of this process) of one decode call, the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        out = decode(mode, model, src, options)  # returns host lists: the device work is done
        return out, time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()


if __name__ == "__main__":
    main()
