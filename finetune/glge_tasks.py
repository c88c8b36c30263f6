"""Registry of the GLGE tasks (and IWSLT14 De-En): metrics, text preparation and decoding defaults.

Pure data, no imports from the rest of the project. Sources: methods.md §4.1 (metric lists, in the order the
official GLGE_baselines/script/eval.py prints them) and §4.2 (official scorers and ProphetNet decoding recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DIFFICULTIES = ("easy", "medium", "medium+", "hard")

# How a task's text is prepared before scoring; each mirrors one official script (methods.md §4.2).
#   summary:  ROUGE via ROUGE-1.5.5-style tokenisation (lower-cased, alphanumerics, Porter stemming)
#   qg:       coco-caption scorers on whitespace tokens (BLEU-4, ROUGE_L with beta 1.2, METEOR)
#   coqa:     CoQA/SQuAD answer normalisation, token-overlap F1
#   dialog:   PersonaChat eval.py: whitespace tokens, sentence BLEU-1/2 (smoothing 7), corpus Distinct-1/2
#   translation: sacrebleu corpus BLEU
Family = Literal["summary", "qg", "coqa", "dialog", "translation"]


@dataclass(frozen=True)
class DecodingDefaults:
    """Official decoding settings of the task (fairseq names: --beam, --lenpen, --min-len, --max-len-b)."""

    beam: int = 4
    lenpen: float = 1.0
    no_repeat_ngram_size: int = 3
    min_len: int = 1
    max_len: int = 140


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: Family
    metrics: tuple[str, ...]  # official order; the task score is the mean of the available ones
    decoding: DecodingDefaults = field(default_factory=DecodingDefaults)
    glge: bool = True  # counts towards the GLGE score
    lowercase: bool = False  # lower-case hypotheses and references (squadqg's eval_on_unilm_qg.py does)
    ptb_fix: bool = False  # re-attach PTB tokens in hypotheses ("don ' t" -> "do n't", "(" -> "-lrb-")
    digits_to_hash: bool = False  # Gigaword references write every digit as '#'
    cnndm_postprocess: bool = False  # drop short / near-duplicate summary sentences (postprocess_cnn_dm.py)
    sacrebleu_tokenize: str = "none"  # translation only


ROUGE = ("rouge1", "rouge2", "rougeL")
_QG = ("rougeL", "bleu4", "meteor")

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "cnndm",
            "summary",
            ROUGE,
            DecodingDefaults(beam=5, lenpen=1.2, min_len=45, max_len=110),
            cnndm_postprocess=True,
        ),
        TaskSpec("gigaword", "summary", ROUGE, digits_to_hash=True),
        TaskSpec("xsum", "summary", ROUGE),
        TaskSpec("msnews", "summary", ROUGE),
        TaskSpec("squadqg", "qg", _QG, lowercase=True, ptb_fix=True),
        TaskSpec("msqg", "qg", _QG),  # qg/eval.py scores the raw lines
        TaskSpec("coqa", "coqa", ("f1",)),
        TaskSpec("personachat", "dialog", ("bleu1", "bleu2", "distinct1", "distinct2")),
        # fairseq's IWSLT14 example decodes with beam 5; the text is already Moses-tokenised and lower-cased,
        # so BLEU is computed on it as is (tok:none), which is the tokenised BLEU the papers report.
        TaskSpec(
            "iwslt14",
            "translation",
            ("bleu",),
            DecodingDefaults(beam=5, lenpen=1.0, no_repeat_ngram_size=0, max_len=200),
            glge=False,
        ),
    )
}

GLGE_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.glge)


def get_task(name: str) -> TaskSpec:
    """The spec of `name`; unknown names raise a ValueError that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def submission_filename(task: str, version: str) -> str:
    """File name GLGE submissions expect for one task and difficulty: `{task}.{version}.test`."""
    if not get_task(task).glge:
        raise ValueError(f"task {task!r} is not a GLGE task; GLGE tasks: {', '.join(GLGE_TASKS)}")
    if version not in DIFFICULTIES:
        raise ValueError(f"unknown GLGE version {version!r}; known versions: {', '.join(DIFFICULTIES)}")
    return f"{task}.{version}.test"
