"""How fast a model learns Gigaword headlines: an in-process learning curve of plain `ar` finetuning.

The demo's question (issue 15) is what a few minutes of CPU buy. This loop answers it faster than the full
`python -m finetune` + `generate` + `evaluate` round trip: one process, plain AdamW (betas 0.9/0.98, weight decay
0.01 on matrices, clip 1.0, linear warmup over the first tenth then linear decay to a tenth), the `ar` objective with
label smoothing 0.1 on the task shards of a demo data folder; every `--every` steps the unsmoothed validation loss
on 8 batches and greedy ROUGE-1 on the first `--examples` validation pairs (max 40 tokens, no repeated 3-grams).

Two probes beside plain finetuning:
  --init DIR          start from a pretraining checkpoint folder (what pretraining adds);
  --copy-steps N      train the first N steps on lead copying (each source's first --copy-len tokens as its
                      target): how much a model that has learned to copy gains, since copying the first 8 words
                      of each source (printed as lead8_rouge1) scores above what the demo reaches.

    python bench/learning_curve.py --data runs/demo/data                      # the demo's data folder
    python bench/learning_curve.py --data runs/demo/data --copy-steps 200
    python bench/learning_curve.py --data runs/demo/data --init runs/demo/pretrain/checkpoints --set init_std=0.05
Last lines: lead8_rouge1=, valid_loss=, rouge1= (greedy, at the last step).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from configs import dotlist  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402
from finetune.config import FinetuneDataSection  # noqa: E402
from finetune.data import task_loader  # noqa: E402
from finetune.decoding import encode_sources, generate  # noqa: E402
from finetune.lead_copy import lead_copy_batch  # noqa: E402
from finetune.metrics import evaluate_task  # noqa: E402
from finetune.showcase import LEAD_WORDS, lead_scores  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.generation import DecodeOptions  # noqa: E402
from model.seq2seq import Seq2SeqModel  # noqa: E402
from pretrain import objectives  # noqa: E402
from pretrain.core.engine import param_groups  # noqa: E402
import finetune.objectives  # noqa: E402,F401  (registers `ar`)

TASK = "gigaword"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a data folder with tokenizer/ and tasks/easy/gigaword/ shards")
    p.add_argument("--gigaword", default=str(REPO_ROOT.parent / "shared/data/glge/gigaword"),
                   help="folder of valid.src / valid.tgt (the decoded examples)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--init", default="", help="a pretraining checkpoint folder (default: random weights)")
    p.add_argument("--copy-steps", type=int, default=0)
    p.add_argument("--copy-len", type=int, default=16)
    p.add_argument("--preset", default="small")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model config overrides")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    tok = Tokenizer.load(data / "tokenizer")
    overrides = OmegaConf.to_container(dotlist(args.set, where="--set: "))  # typed as YAML reads them
    model = Seq2SeqModel(ModelConfig.preset(args.preset, vocab_size=tok.padded_vocab_size, **overrides))
    if args.init:
        from finetune.init_checkpoint import load_weights, read_init
        load_weights(model, read_init(args.init))

    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.01), lr=args.lr, betas=(0.9, 0.98))
    warm = max(args.steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.1, 1 - (s - warm) / (args.steps - warm + 1)))

    section = FinetuneDataSection(batch_size=args.batch_size)
    shards = data / "tasks" / "easy" / TASK

    def batches(split: str, shuffle: bool, seed: int):
        return task_loader(shards / split, section, dp_rank=0, dp_size=1, seed=seed,
                           max_source_len=model.cfg.max_source_positions, shuffle=shuffle)

    valid = list(itertools.islice(iter(batches("valid", False, 0)), 8))
    sources = Path(args.gigaword, "valid.src").read_text().splitlines()[:args.examples]
    references = Path(args.gigaword, "valid.tgt").read_text().splitlines()[:args.examples]
    source_ids = encode_sources(tok, sources, model.cfg.max_source_positions)
    train_loss = objectives.build("ar", stream="ar", label_smoothing=0.1)
    valid_loss = objectives.build("ar", stream="ar", label_smoothing=0.0)
    options = DecodeOptions(ar_logits="ar", max_len=40, no_repeat_ngram_size=3)

    def measure() -> tuple[float, float, list[str]]:
        model.eval()
        with torch.no_grad():
            sums = [valid_loss.loss(model, b)[1]["ar/loss"] for b in valid]
            out = generate(model, tok, source_ids, "ar_greedy", options, 50)
        model.train()
        loss = float(sum(s for s, _ in sums) / sum(c for _, c in sums))
        return loss, evaluate_task(TASK, out.hypotheses, references)["rouge1"], out.hypotheses

    print(f"lead{LEAD_WORDS}_rouge1={lead_scores(TASK, sources, references)['rouge1']:.2f}", flush=True)
    step, epoch, start = 0, 0, time.thread_time()
    model.train()
    while step < args.steps:
        for batch in batches("train", True, epoch):
            if step < args.copy_steps:
                batch = lead_copy_batch(batch, args.copy_len)
            loss, _ = train_loss.loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                vloss, r1, hyps = measure()
                print(f"step {step} train_loss {loss.item():.3f} valid_loss {vloss:.3f} greedy_rouge1 {r1:.2f} "
                      f"cpu {time.thread_time() - start:.0f}s  e.g. {hyps[:2]}", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    print(f"valid_loss={vloss:.3f}")
    print(f"rouge1={r1:.2f}")


if __name__ == "__main__":
    main()
