"""The individual metrics, on already-prepared text (see text.py). Scores are on a 0-100 scale except Distinct,
which is a raw fraction as GLGE's PersonaChat script prints it (the GLGE score scales it by 100)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from configs import progress
from finetune.metrics.text import coqa_normalize, ngrams, tokens


class _WhitespaceTokenizer:
    """rouge-score tokenizer for coco-caption's ROUGE_L, which splits on spaces and does nothing else."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


def rouge_f1(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-example ROUGE-1/2/L F1 x100, ROUGE-1.5.5 style (rouge-score's tokeniser lower-cases and keeps
    alphanumerics; Porter stemming as `-m`). ROUGE-L is summary-level (rougeLsum): sentences are separated by
    newlines in the inputs, as pyrouge / files2rouge see them one sentence per line."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = Counter()
    pairs = zip(hypotheses, references, strict=True)
    for hyp, ref in progress.iterate(pairs, desc="rouge", unit="ex", total=len(hypotheses)):
        scores = scorer.score(ref, hyp)
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rouge2"] += scores["rouge2"].fmeasure
        totals["rougeL"] += scores["rougeLsum"].fmeasure
    return {name: 100.0 * totals[name] / len(hypotheses) for name in ("rouge1", "rouge2", "rougeL")}


def coco_rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """coco-caption ROUGE_L x100 (the QG scripts): LCS on whitespace tokens, best precision and best recall over
    the references, combined as F-beta with beta 1.2, averaged over examples."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    total = 0.0
    pairs = zip(hypotheses, references, strict=True)
    for hyp, refs in progress.iterate(pairs, desc="rouge-l", unit="ex", total=len(hypotheses)):
        lcs = [scorer.score(ref, hyp)["rougeL"] for ref in refs]
        p, r = max(s.precision for s in lcs), max(s.recall for s in lcs)
        if p > 0 and r > 0:
            total += (1 + beta**2) * p * r / (r + beta**2 * p)
    return 100.0 * total / len(hypotheses)


def corpus_bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 x100 on whitespace tokens, as coco-caption's Bleu(4) (QG): clipped n-gram counts summed over
    the corpus, brevity penalty from the closest reference length (ties: the shorter), no smoothing.
    Written here rather than through sacrebleu because QG examples can have different numbers of references
    (the official script groups references by source sentence); tests check it equals sacrebleu tok:none."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp_toks = tokens(hyp)
        refs_toks = [tokens(r) for r in refs]
        hyp_len += len(hyp_toks)
        ref_len += min((abs(len(r) - len(hyp_toks)), len(r)) for r in refs_toks)[1]
        for n in range(1, 5):
            max_ref = Counter()
            for r in refs_toks:
                max_ref |= ngrams(r, n)
            hyp_ngrams = ngrams(hyp_toks, n)
            matches[n - 1] += sum(min(count, max_ref[g]) for g, count in hyp_ngrams.items())
            totals[n - 1] += max(len(hyp_toks) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def sentence_bleu_avg(hypotheses: Sequence[str], references: Sequence[str], max_n: int) -> float:
    """PersonaChat's BLEU-1 / BLEU-2 x100: NLTK sentence_bleu with uniform weights over 1..max_n and
    SmoothingFunction().method7, averaged over sentences; a sentence NLTK cannot score counts 0 (as eval.py)."""
    weights = tuple([1.0 / max_n] * max_n + [0.0] * (4 - max_n))
    smooth = SmoothingFunction().method7
    total = 0.0
    pairs = zip(hypotheses, references, strict=True)
    for hyp, ref in progress.iterate(pairs, desc=f"bleu-{max_n}", unit="ex", total=len(hypotheses)):
        try:
            total += sentence_bleu([tokens(ref)], tokens(hyp), weights=weights, smoothing_function=smooth)
        except (ZeroDivisionError, ValueError):
            pass
    return 100.0 * total / len(hypotheses)


def distinct(hypotheses: Sequence[str], n: int) -> float:
    """Corpus-level Distinct-n: unique n-grams / all n-grams over all hypotheses (raw fraction; 0 when none)."""
    all_ngrams = Counter()
    for hyp in hypotheses:
        all_ngrams.update(ngrams(tokens(hyp), n))
    total = sum(all_ngrams.values())
    return len(all_ngrams) / total if total else 0.0


def coqa_f1(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """CoQA F1 x100: token-overlap F1 of normalised answers, max over an example's references, mean over examples.
    An empty normalised answer scores 1 against an empty reference and 0 otherwise."""
    total = 0.0
    for hyp, refs in zip(hypotheses, references, strict=True):
        refs = [refs] if isinstance(refs, str) else refs
        total += max(_answer_f1(hyp, ref) for ref in refs)
    return 100.0 * total / len(hypotheses)


def _answer_f1(prediction: str, gold: str) -> float:
    pred_toks, gold_toks = coqa_normalize(prediction).split(), coqa_normalize(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def sacrebleu_corpus(hypotheses: Sequence[str], references: Sequence[str], tokenize: str) -> tuple[float, str]:
    """sacrebleu corpus BLEU (one reference per example) and its signature string."""
    bleu = BLEU(tokenize=tokenize, force=True)  # force: tokenised input is intended with tok:none
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(bleu.get_signature())
