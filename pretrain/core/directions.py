"""Whether higher or lower is better, per validation metric: the one table checkpoint.keep_best ranks by
(pretrain.core.best) and the engine config checks a name against. A leaf: config and best both ask it.
"""
from __future__ import annotations

MAX, MIN = "max", "min"
# Direction per metric name (the part after the last '/'): the task scores of finetune/metrics (higher is better)
# and the losses. Any other name with a word `loss` or `kl` (`nar/token_loss`, `elmer/loss_exit3`,
# `janus/kl_ar_content`) is a loss.
DIRECTIONS: dict[str, str] = {
    **{name: MAX for name in ("rouge1", "rouge2", "rougeL", "bleu", "bleu1", "bleu2", "bleu4", "meteor", "f1",
                              "distinct1", "distinct2", "task_score", "accuracy")},
    **{name: MIN for name in ("loss", "nll", "ppl", "perplexity")},
}
LOSS_WORDS = ("loss", "kl")


def metric_key(name: str) -> str:
    """The name as the engine's evaluation returns it (MLflow shows it under `eval/`)."""
    return name[len("eval/"):] if name.startswith("eval/") else name


def direction(name: str) -> str:
    """MAX or MIN for a metric name; ValueError for a name whose direction is not known."""
    base = metric_key(name).rsplit("/", 1)[-1]
    if base in DIRECTIONS:
        return DIRECTIONS[base]
    if any(word in LOSS_WORDS for word in base.split("_")):
        return MIN
    raise ValueError(f"{name!r}: no known direction for this metric (higher or lower is better?); known: the losses "
                     f"(names with a word {' or '.join(LOSS_WORDS)}) and {sorted(DIRECTIONS)}")
