"""Score one task's predictions the way GLGE's official scripts do, and combine tasks into the GLGE score."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from finetune.glge_tasks import GLGE_TASKS, TaskSpec, get_task
from finetune.metrics import meteor, scores
from finetune.metrics.text import cnndm_filter_sentences, digits_to_hash, normalize_space, ptb_fix, split_sentences

Reference = str | Sequence[str]  # several references per example only for coqa and the QG tasks


@dataclass
class TaskEvaluation:
    task: str
    scores: dict[str, float | None]  # the task's metrics in official order, then "task_score"
    notes: dict[str, str] = field(default_factory=dict)  # metric -> why it is None, or the sacrebleu signature


def evaluate_task(
    task: str, hypotheses: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None
) -> dict[str, float | None]:
    """The task's metrics by name plus "task_score". A metric that cannot run here (METEOR 1.5 without Java or
    its jar) is None, never 0."""
    return evaluate_task_detailed(task, hypotheses, references, sources).scores


def evaluate_task_detailed(
    task: str, hypotheses: Sequence[str], references: Sequence[Reference], sources: Sequence[str] | None = None
) -> TaskEvaluation:
    """Like evaluate_task, with notes (why a metric is unavailable; sacrebleu's signature).

    `sources` is used by squadqg / msqg only: their official scripts group the references of examples that share a
    source sentence and score each group once (with the last prediction for it). Without sources each line is
    scored against its own reference."""
    spec = get_task(task)
    _check_inputs(spec, hypotheses, references, sources)
    hyps = [normalize_space(h) for h in hypotheses]
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    notes: dict[str, str] = {}
    if spec.family == "summary":
        metrics = _summary(spec, hyps, [r[0] for r in refs])
    elif spec.family == "qg":
        metrics = _question_generation(spec, hyps, refs, sources, notes)
    elif spec.family == "coqa":
        metrics = {"f1": scores.coqa_f1(hyps, refs)}
    elif spec.family == "dialog":
        flat_refs = [normalize_space(r[0]) for r in refs]
        metrics = {
            "bleu1": scores.sentence_bleu_avg(hyps, flat_refs, max_n=1),
            "bleu2": scores.sentence_bleu_avg(hyps, flat_refs, max_n=2),
            "distinct1": scores.distinct(hyps, 1),
            "distinct2": scores.distinct(hyps, 2),
        }
    else:  # translation
        bleu, signature = scores.sacrebleu_corpus(hyps, [r[0] for r in refs], spec.sacrebleu_tokenize)
        metrics = {"bleu": bleu}
        notes["bleu"] = f"sacrebleu {signature}"
    ordered: dict[str, float | None] = {name: metrics[name] for name in spec.metrics}
    ordered["task_score"] = task_score(task, ordered)
    unavailable = [name for name in spec.metrics if ordered[name] is None]
    if unavailable:  # the task score then differs in kind from the leaderboard's: say so
        available = [name for name in spec.metrics if ordered[name] is not None]
        notes["task_score"] = f"mean of {', '.join(available)} only; unavailable: {', '.join(unavailable)}"
    return TaskEvaluation(task, ordered, notes)


def task_score(task: str, metrics: Mapping[str, float | None]) -> float | None:
    """Mean of the task's available metrics, Distinct scaled x100 as GLGE does; None if none is available."""
    spec = get_task(task)
    missing = [name for name in spec.metrics if name not in metrics]
    if missing:
        raise ValueError(f"{task}: metrics {missing} missing; the task's metrics are {list(spec.metrics)}")
    values = [metrics[n] * (100.0 if n.startswith("distinct") else 1.0) for n in spec.metrics if metrics[n] is not None]
    return sum(values) / len(values) if values else None


def glge_score(per_task_scores: Mapping[str, float | Mapping[str, float | None]]) -> float:
    """Mean over the given GLGE tasks of their task_score (a number, or a dict as evaluate_task returns)."""
    if not per_task_scores:
        raise ValueError("glge_score needs at least one task")
    values = []
    for task, value in per_task_scores.items():
        if task not in GLGE_TASKS:
            raise ValueError(f"{task!r} is not a GLGE task; GLGE tasks: {', '.join(GLGE_TASKS)}")
        value = value["task_score"] if isinstance(value, Mapping) else value
        if value is None:
            raise ValueError(f"{task}: no task_score (none of its metrics was available)")
        values.append(float(value))
    return sum(values) / len(values)


def _check_inputs(spec: TaskSpec, hypotheses, references, sources) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{spec.name}: {len(hypotheses)} hypotheses but {len(references)} references; they must pair line by line"
        )
    if not hypotheses:
        raise ValueError(f"{spec.name}: nothing to score (0 hypotheses)")
    if sources is not None and len(sources) != len(hypotheses):
        raise ValueError(f"{spec.name}: {len(sources)} sources but {len(hypotheses)} hypotheses")
    bad = next((i for i, h in enumerate(hypotheses) if not isinstance(h, str)), None)
    if bad is not None:
        raise ValueError(f"{spec.name}: hypothesis {bad} is {type(hypotheses[bad]).__name__}, not str")
    for i, ref in enumerate(references):
        if isinstance(ref, str):
            continue
        if spec.family not in ("qg", "coqa"):
            raise ValueError(f"{spec.name}: reference {i} is a list; only coqa and QG tasks take several references")
        if not ref or not all(isinstance(r, str) for r in ref):
            raise ValueError(f"{spec.name}: reference {i} must be a string or a non-empty list of strings")


def _summary(spec: TaskSpec, hyps: list[str], refs: list[str]) -> dict[str, float]:
    prepared_hyps, prepared_refs = [], []
    for hyp, ref in zip(hyps, refs):
        if spec.digits_to_hash:
            hyp = digits_to_hash(hyp)
        sentences = split_sentences(hyp)
        if spec.cnndm_postprocess:
            sentences = cnndm_filter_sentences(sentences)
        prepared_hyps.append("\n".join(sentences))
        prepared_refs.append("\n".join(split_sentences(ref)))
    return scores.rouge_f1(prepared_hyps, prepared_refs)


def _question_generation(spec: TaskSpec, hyps, refs, sources, notes) -> dict[str, float | None]:
    def prepare(text: str, is_hypothesis: bool) -> str:
        text = ptb_fix(text) if (is_hypothesis and spec.ptb_fix) else normalize_space(text)
        return text.lower() if spec.lowercase else text

    hyps = [prepare(h, True) for h in hyps]
    refs = [[prepare(r, False) for r in group] for group in refs]
    if sources is not None:  # one scored item per distinct source, as the official QG scripts key their dicts
        grouped: dict[str, tuple[str, list[str]]] = {}
        for source, hyp, group in zip(sources, hyps, refs):
            key = source.strip().lower() if spec.lowercase else source.strip()
            previous_refs = grouped[key][1] if key in grouped else []
            grouped[key] = (hyp, previous_refs + group)
        hyps = [hyp for hyp, _ in grouped.values()]
        refs = [group for _, group in grouped.values()]
    reason = meteor.unavailable_reason()
    notes["meteor"] = reason or "METEOR 1.5 (coco-caption's jar: -l en -norm, corpus score)"
    return {
        "rougeL": scores.coco_rouge_l(hyps, refs),
        "bleu4": scores.corpus_bleu4(hyps, refs),
        "meteor": None if reason else meteor.corpus_meteor(hyps, refs),
    }
