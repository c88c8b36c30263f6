"""Typed finetuning config: the engine's sections (pretrain.core.EngineConfig) plus task, data, model, init
checkpoint, objective and decoding. One YAML per task in configs/finetune/; `key=value` overrides on top.

Validation (`finetune.run.prepare`, `finetune.resolve`) runs before any process group starts and names the field or
file at fault.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from configs import ConfigError, dotlist, merge_typed
from pretrain import core

DEFAULT_EXPERIMENT = "tandem-finetune"  # the store is the project's one (pretrain.core.resolve_uri)


@dataclass
class TaskSection:
    name: str = ""  # a GLGE task (cnndm, gigaword, xsum, msnews, squadqg, msqg, coqa, personachat) or iwslt14
    difficulty: str = "easy"  # GLGE version: easy, medium, medium+ or hard (a label for iwslt14)
    train_split: str = "train"
    valid_split: str = "valid"  # GLGE calls it dev; both names work
    epochs: float = 0.0  # > 0: train.steps = ceil(epochs x batches per epoch / grad_accum); 0: train.steps


@dataclass
class FinetuneDataSection:
    # The pretraining data config: its tokenizer, work_dir and `tasks` section (task folders: data_root/tasks.root
    # for GLGE, data_root/tasks.iwslt_root for IWSLT14). Task shards go to <work_dir>/<tasks.out_dir>/<difficulty>/.
    config: str = "configs/data/tiny.yaml"
    overrides: list[str] = field(default_factory=list)  # key=value applied to that config
    # A distilled set (`python -m finetune distill` of an AR teacher): the training split's targets are the
    # teacher's outputs; validation stays gold. "": the gold targets.
    distilled: str = ""
    batch_size: int = 32  # examples per micro-batch (upper bound when max_tokens > 0)
    max_tokens: int = 0  # > 0: token-budget batches (fairseq --max-tokens)
    max_source_len: int = 0  # truncate sources (0: the model's max_source_positions)
    shuffle_buffer: int = 512
    bucket_window: int = 64
    # Loader worker processes per rank for the training split (held-out splits load in the trainer): batches are
    # read and padded while the step runs. Preflight wants data-parallel ranks x workers <= shards.
    num_workers: int = 1


@dataclass
class ModelSection:
    preset: str = "tiny"  # must describe the pretrained model: the checkpoint's shapes are checked against it
    overrides: dict[str, Any] = field(default_factory=dict)  # vocab_size comes from the tokenizer


@dataclass
class InitSection:
    checkpoint: str = ""  # --init: a pretraining checkpoint (DeepSpeed folder/tag) or a full state dict (.pt);
    #                       "scratch" trains from random weights (a baseline)


@dataclass
class ArObjectiveSection:
    # "ar": the main stream, BART-style (what a Hugging Face export reproduces; the default by a measured comparison,
    # BENCHMARKS.md "Which stream AR finetuning trains"); "bang_ar": BANG's predicting stream, as BANG finetunes
    stream: str = "ar"
    label_smoothing: float = 0.1


@dataclass
class NarObjectiveSection:
    mode: str = "nar_bidir"  # nar_bidir (ELMER, CMLM) or nar_causal (BANG NAR)
    masking: str = "all"  # all: every target a slot; uniform: CMLM (for mask-predict decoding)
    label_smoothing: float = 0.1
    length_weight: float = 0.1
    exits: str = "last"  # layers the token loss trains: last; all (ELMER finetuning, mean CE of every layer's
    #                      off-ramp); random (LPLM exits). all/random train the exits early_exit decoding reads


@dataclass
class BangMixedObjectiveSection:
    nar_ratio: float = 0.5  # chance per batch of a NAR batch (0 = pure AR, 1 = pure NAR)
    label_smoothing: float = 0.1
    length_weight: float = 0.1


@dataclass
class JanusObjectiveSection:
    w_ar_c: float = 1.0  # symKL(P_AR, P_C)
    w_ar_q: float = 3.0  # symKL(P_AR, P_Q)
    w_c_q: float = 1.0  # symKL(P_C, P_Q)
    length_weight: float = 0.1
    label_smoothing: float = 0.1
    mask_ratio: float = 0.7
    span_lambda: float = 2.0


@dataclass
class LeadCopySection:
    # Copy steps beside the objective (finetune/lead_copy.py): targets = each source's first `tokens` tokens. An aid
    # for tiny data and budgets (the demo), outside the methods; off while both step counts are 0
    warmup_steps: int = 0  # steps 1..warmup_steps copy
    every: int = 0  # then every `every`-th step copies (0: none)
    tokens: int = 16


@dataclass
class FinetuneObjectiveSection:
    name: str = "ar"  # ar, nar, bang_mixed or janus: one of the sections below
    ar: ArObjectiveSection = field(default_factory=ArObjectiveSection)
    nar: NarObjectiveSection = field(default_factory=NarObjectiveSection)
    bang_mixed: BangMixedObjectiveSection = field(default_factory=BangMixedObjectiveSection)
    janus: JanusObjectiveSection = field(default_factory=JanusObjectiveSection)
    lead_copy: LeadCopySection = field(default_factory=LeadCopySection)  # with any of them


# The finetuning objectives: one section of settings each (finetune.objectives registers one class per name).
OBJECTIVES = tuple(f.name for f in fields(FinetuneObjectiveSection) if f.name not in ("name", "lead_copy"))


@dataclass
class DecodeSection:
    """Decoding for `generate` and for validation during training. Empty / null fields take the task's official
    settings (finetune/glge_tasks.py) or follow the objective (mode, ar_logits, nar_mode)."""

    mode: str = ""  # ar_beam, ar_greedy, nar, semi_nar, mask_predict, early_exit; "": the objective's own
    beam_size: Optional[int] = None
    length_penalty: Optional[float] = None
    min_len: Optional[int] = None
    max_len: Optional[int] = None
    no_repeat_ngram_size: Optional[int] = None
    ar_logits: str = ""  # "": the stream the objective trained (ar -> objective.ar.stream, others bang_ar)
    nar_mode: str = ""  # "": nar_causal for bang_mixed and objective.nar.mode=nar_causal, else nar_bidir
    length_source: str = "length_head"
    length_beam: int = 1
    length_candidates: str = "offsets"  # offsets: fairseq's argmax -1/0/+1 (beam 3); top: the likeliest classes
    fixed_length: Optional[int] = None
    block_size: int = 4
    iterations: int = 10
    remask_slots: str = "content"  # mask_predict: content (fairseq: never the EOS slot) or all
    exit_entropy: float = 1.0
    exit_layer: Optional[int] = None  # early_exit: every slot exits at this layer (1-based) instead of by entropy
    postprocess: bool = True
    batch_size: int = 32  # examples per decoding batch


@dataclass
class ValidGenerationSection:
    samples: int = 0  # > 0: at every evaluation, decode this many validation examples and log the task's metrics


@dataclass
class FinetuneConfig(core.EngineConfig):
    name: str = "finetune"
    output_dir: str = ""  # empty: runs/finetune/<task>-<difficulty>-<objective>
    task: TaskSection = field(default_factory=TaskSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    objective: FinetuneObjectiveSection = field(default_factory=FinetuneObjectiveSection)
    decode: DecodeSection = field(default_factory=DecodeSection)
    valid_generation: ValidGenerationSection = field(default_factory=ValidGenerationSection)
    tracking: core.TrackingSection = field(default_factory=lambda: core.TrackingSection(experiment=DEFAULT_EXPERIMENT))


def load(path: str, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """YAML + overrides -> FinetuneConfig (not yet validated); ConfigError names the file or key at fault."""
    return core.load_config(path, overrides, FinetuneConfig)


def fail(cfg: FinetuneConfig, field_name: str, why: str):
    where = f"{cfg.config_file}: " if cfg.config_file else ""
    raise ConfigError(f"{where}{field_name}: {why}")


def from_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> FinetuneConfig:
    """A config saved with a finetuned model (pretrain.core.to_dict) back into a FinetuneConfig, plus overrides."""
    where = (data.get("config_file") or "the model's saved config") + ": "
    extra = dotlist(overrides, where=where)
    dropped: list[str] = []
    data = _known_keys(data, OmegaConf.structured(FinetuneConfig), "", dropped)
    if dropped:  # written by another version of the config classes: keep what still means something
        warnings.warn(f"{where}ignoring saved config keys this version does not know: {dropped}", stacklevel=2)
    return merge_typed(FinetuneConfig, [data, extra], where=where)


def _known_keys(data: dict[str, Any], node, prefix: str, dropped: list[str]) -> dict[str, Any]:
    """`data` without the keys the structured config `node` lacks (free-form dict fields are kept whole)."""
    out = {}
    for key, value in data.items():
        if key not in node:
            dropped.append(prefix + key)
            continue
        child = node[key] if not OmegaConf.is_missing(node, key) else None
        if isinstance(value, dict) and isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            value = _known_keys(value, child, f"{prefix}{key}.", dropped)
        out[key] = value
    return out
