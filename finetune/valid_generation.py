"""Generation metrics during finetuning: the engine's `extra_eval` hook decodes the first N validation examples with
the run's decoding mode and returns the task's metrics (logged as eval/gen/<metric>).

Every rank decodes the same examples (tensor-parallel peers must run in lockstep; data-parallel copies are cheap
for a few hundred examples). Under ZeRO-3 the parameters are gathered for the duration.
"""
from __future__ import annotations

import contextlib

from finetune.data import read_split
from finetune.decoding import encode_sources, generate
from finetune.glge_tasks import get_task
from finetune.metrics import evaluate_task


class ValidGeneration:
    def __init__(self, plan):
        from data_pipeline.tokenizer import Tokenizer
        from pretrain.config import zero_stage

        cfg = plan.cfg
        n = cfg.valid_generation.samples
        sources, references = read_split(plan.task, cfg.task.valid_split)
        self.task = cfg.task.name
        self.sources, self.references = sources[:n], references[:n]
        self.tokenizer = Tokenizer.load(plan.task.tokenizer)
        self.source_ids = encode_sources(self.tokenizer, self.sources, plan.max_source_len)
        self.mode, self.options = plan.decode_mode, plan.decode_options
        self.batch_size = cfg.decode.batch_size
        self.zero3 = zero_stage(cfg) == 3
        self.pass_sources = get_task(self.task).family == "qg"

    def __call__(self, model) -> dict[str, float]:
        gather = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with gather:
            out = generate(model, self.tokenizer, self.source_ids, self.mode, self.options, self.batch_size)
        scores = evaluate_task(self.task, out.hypotheses, self.references,
                               self.sources if self.pass_sources else None)
        metrics = {f"gen/{k}": float(v) for k, v in scores.items() if v is not None}
        metrics["gen/ms_per_sample"] = out.figures["ms_per_sample"]
        return metrics
