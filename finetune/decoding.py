"""From a finetune config to a decoding mode and its options, and decoding a list of source lines in batches.

Unset options take the task's official settings (finetune/glge_tasks.py: beam, length penalty, min/max length,
no-repeat n-gram). The AR logits source and the NAR attention follow what the objective trained: BANG's predicting
stream ("bang_ar") unless the `ar` objective trained the plain main stream; causal NAR for BANG-style training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from configs import progress
from finetune.glge_tasks import get_task
from model.config import SPECIAL
from model.generation import MODES, DecodeOptions, decode
from model.generation.postprocess import finish_text

DEFAULT_MODE = {"ar": "ar_beam", "nar": "nar", "bang_mixed": "ar_beam", "janus": "ar_beam"}


def default_mode(objective) -> str:
    if objective.name == "nar" and objective.nar.masking == "uniform":
        return "mask_predict"  # a CMLM-trained model is decoded by iterative refinement
    return DEFAULT_MODE.get(objective.name, "ar_beam")


def resolve(section, task: str, objective) -> tuple[str, DecodeOptions]:
    """(mode, validated DecodeOptions); ValueError naming decode.<field> when a value cannot work."""
    official = get_task(task).decoding
    mode = section.mode or default_mode(objective)
    if mode not in MODES:
        raise ValueError(f"decode.mode={mode!r}: choose one of {sorted(MODES)}")

    def pick(value, default):
        return default if value is None else value

    ar_logits = section.ar_logits or (objective.ar.stream if objective.name == "ar" else "bang_ar")
    causal = objective.name == "bang_mixed" or (objective.name == "nar" and objective.nar.mode == "nar_causal")
    options = DecodeOptions(
        beam_size=pick(section.beam_size, official.beam),
        length_penalty=float(pick(section.length_penalty, official.lenpen)),
        min_len=pick(section.min_len, official.min_len),
        max_len=pick(section.max_len, official.max_len),
        no_repeat_ngram_size=pick(section.no_repeat_ngram_size, official.no_repeat_ngram_size),
        ar_logits=ar_logits,
        nar_mode=section.nar_mode or ("nar_causal" if causal else "nar_bidir"),
        length_source=section.length_source,
        length_beam=section.length_beam,
        length_candidates=section.length_candidates,
        fixed_length=section.fixed_length,
        block_size=section.block_size,
        iterations=section.iterations,
        remask_slots=section.remask_slots,
        exit_entropy=float(section.exit_entropy),
        exit_layer=section.exit_layer,
        postprocess=section.postprocess,
    )
    return mode, options.validate()


def encode_sources(tokenizer, sources: list[str], max_source_len: int) -> list[list[int]]:
    """Token ids of each source line, GLGE's "[SEP]" as <sep>, truncated as the task shards are. An empty source
    becomes one <unk> (an all-pad row would leave the encoder nothing to attend to)."""
    ids = []
    for line in sources:
        toks = tokenizer.encode_with_sep(line)[:max_source_len]
        ids.append(toks or [SPECIAL.unk])
    return ids


@dataclass
class Generated:
    hypotheses: list[str]  # detokenized, one per source, in input order
    figures: dict[str, float] = field(default_factory=dict)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def decode_ids(model, source_ids: list[list[int]], mode: str, options: DecodeOptions,
               batch_size: int) -> tuple[list[list[int]], dict[str, float]]:
    """Decode every source (longest first, in batches; restored to input order): output ids per source and the
    timing figures. Each batch is built on the host and moved to the model's device in one copy.

    Latency counts the decoding calls only (encoder + decoder + search, like fairseq's timer), not tokenizing or
    writing: ms_per_sample = total decode time / examples, samples_per_s its inverse x 1000."""
    if batch_size < 1:
        raise ValueError(f"decode.batch_size={batch_size}: must be >= 1")
    device = model_device(model)
    order = sorted(range(len(source_ids)), key=lambda i: -len(source_ids[i]))
    outputs: list[list[int]] = [[] for _ in source_ids]
    wall = exit_sum = passes_sum = 0.0
    batches = 0
    shown = progress.bar(len(order), desc=f"generate {mode}", unit="ex")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(source_ids[i]) for i in rows)
        src = torch.full((len(rows), width), SPECIAL.pad, dtype=torch.long)
        for r, i in enumerate(rows):
            src[r, :len(source_ids[i])] = torch.tensor(source_ids[i])
        t0 = time.perf_counter()
        result = decode(mode, model, src.to(device), options)
        wall += time.perf_counter() - t0
        for r, i in enumerate(rows):
            outputs[i] = result.tokens[r]
        exit_sum += result.figures.get("mean_exit_layer", 0.0) * len(rows)
        passes_sum += result.figures.get("decoder_passes", 0.0)
        batches += 1
        shown.update(len(rows))
    shown.close()
    n = len(source_ids)
    figures = {"examples": float(n), "batch_size": float(batch_size), "decode_wall_s": wall,
               "ms_per_sample": 1000.0 * wall / max(n, 1), "samples_per_s": n / wall if wall > 0 else 0.0,
               "mean_output_tokens": sum(map(len, outputs)) / max(n, 1),
               "decoder_passes_per_batch": passes_sum / max(batches, 1)}
    if mode == "early_exit":
        figures["mean_exit_layer"] = exit_sum / max(n, 1)
    return outputs, figures


def generate(model, tokenizer, source_ids: list[list[int]], mode: str, options: DecodeOptions,
             batch_size: int) -> Generated:
    """Decode every source (decode_ids) and detokenize the outputs, one line each, in input order."""
    outputs, figures = decode_ids(model, source_ids, mode, options, batch_size)
    hyps = [finish_text(tokenizer.decode(ids), mode, options.postprocess) for ids in outputs]
    return Generated(hyps, figures)
