"""Generation metrics during finetuning: the engine's `extra_eval` hook decodes the first N validation examples with
the run's decoding mode and returns the task's metrics (logged as eval/gen/<metric>).

Every rank decodes the same examples (tensor-parallel peers must run in lockstep; data-parallel copies are cheap
for a few hundred examples). Under ZeRO-3 the parameters are gathered once and copied into a plain model (same
tensor-parallel layout), which decodes and is then freed: decoding the ZeRO-3 module itself inside
GatheredParameters fails, as DeepSpeed's module hooks release parameters (the tied embedding weight among them,
read by the output projection outside its module) while sub-modules run.
"""
from __future__ import annotations

import torch

from configs import progress
from data_pipeline.tokenizer import load_tokenizer
from finetune.data import read_split
from finetune.decoding import encode_sources, generate
from finetune.glge_tasks import get_task
from finetune.metrics import evaluate_task
from pretrain import core


class ValidGeneration:
    def __init__(self, plan):
        cfg = plan.cfg
        n = cfg.valid_generation.samples
        sources, references = read_split(plan.task, cfg.task.valid_split)
        self.task = cfg.task.name
        self.sources, self.references = sources[:n], references[:n]
        self.tokenizer = load_tokenizer(plan.task.tokenizer)
        self.source_ids = encode_sources(self.tokenizer, self.sources, plan.max_source_len)
        self.mode, self.options = plan.decode_mode, plan.decode_options
        self.batch_size = cfg.decode.batch_size
        self.zero3 = core.zero_stage(cfg) == 3
        self.pass_sources = get_task(self.task).family == "qg"

    def __call__(self, model) -> dict[str, float]:
        decoder = plain_copy(model) if self.zero3 else model
        with progress.silenced():  # on every rank, under the training bar: the engine's evaluation line reports it
            out = generate(decoder, self.tokenizer, self.source_ids, self.mode, self.options, self.batch_size)
            del decoder
            scores = evaluate_task(self.task, out.hypotheses, self.references,
                                   self.sources if self.pass_sources else None)
        metrics = {f"gen/{k}": float(v) for k, v in scores.items() if v is not None}
        metrics["gen/ms_per_sample"] = out.figures["ms_per_sample"]
        return metrics


def plain_copy(model):
    """A Seq2SeqModel outside ZeRO-3 holding this rank's full (tensor-parallel shard of the) weights of `model`,
    in their dtype and on their device, in eval mode."""
    import deepspeed

    from model.seq2seq import Seq2SeqModel

    with torch.random.fork_rng(devices=[]):  # its random initialisation, overwritten below, draws no training RNG
        copy = Seq2SeqModel(model.cfg)
    targets = dict(copy.named_parameters())
    sources = dict(model.named_parameters())
    if targets.keys() != sources.keys():
        raise RuntimeError(f"valid_generation: the ZeRO-3 model's parameters differ from a Seq2SeqModel's: "
                           f"{sorted(targets.keys() ^ sources.keys())}")
    with deepspeed.zero.GatheredParameters(list(sources.values()), modifier_rank=None):
        for name, param in sources.items():
            targets[name].data = param.data.detach().clone()
    return copy.eval()
