"""Text preparation for scoring, per official GLGE script (methods.md §4.2).

Inputs are plain detokenised strings (sentencepiece pieces are joined upstream). These helpers only do what the
official scorers do to their inputs: whitespace tokenisation, lower-casing, PTB token fixes, sentence splitting.
"""

from __future__ import annotations

import re
import string
from collections import Counter

SENTENCE_MARKERS = ("<S_SEP>", "[X_SEP]")  # GLGE CNN/DM targets / ProphetNet outputs between summary sentences
_SENTENCE_END = {".", "!", "?"}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = {"s", "d", "ll", "m", "re", "ve"}
_DIGITS = re.compile(r"[0-9]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def tokens(text: str) -> list[str]:
    """Whitespace tokenisation (what coco-caption, PersonaChat's eval.py and Distinct use)."""
    return text.split()


def normalize_space(text: str) -> str:
    return " ".join(text.split())


def digits_to_hash(text: str) -> str:
    """Gigaword (Rush et al.) references write every digit as '#'; map hypotheses the same way."""
    return _DIGITS.sub("#", text)


def ptb_fix(text: str) -> str:
    """Re-attach tokens the way the QG references are tokenised (PTB): brackets as -lrb-, straight double quotes as
    `` / '', "don ' t" -> "do n't", "' s" -> "'s", ". . ." -> "...". The official script also re-joins "3 , 000",
    which undoes BERT word pieces but breaks real commas ("october 9 , 2004"); sentencepiece output keeps "3,000"
    whole, so that rule is left out."""
    toks = tokens(text)
    out: list[str] = []
    open_quote = False
    i = 0
    while i < len(toks):
        tok = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if tok in _PTB_BRACKETS:
            out.append(_PTB_BRACKETS[tok])
        elif tok == '"':
            out.append("''" if open_quote else "``")
            open_quote = not open_quote
        elif tok == "'" and nxt == "t" and out and out[-1].endswith("n"):
            out[-1] = out[-1][:-1]
            out.append("n't")
            i += 1
        elif tok == "'" and nxt in _CLITICS:
            out.append("'" + nxt)
            i += 1
        elif tok == "." and nxt == "." and i + 2 < len(toks) and toks[i + 2] == ".":
            out.append("...")
            i += 2
        else:
            out.append(tok)
        i += 1
    return " ".join(out)


def split_sentences(text: str) -> list[str]:
    """Summary sentences: split on GLGE's sentence markers when present, otherwise after standalone '.', '!', '?'
    tokens (tokenised CNN/DM style). Empty pieces are dropped."""
    for marker in SENTENCE_MARKERS:
        text = text.replace(marker, "\n")
    if "\n" in text:
        pieces = text.split("\n")
    else:
        pieces, current = [], []
        for tok in tokens(text):
            current.append(tok)
            if tok in _SENTENCE_END:
                pieces.append(" ".join(current))
                current = []
        pieces.append(" ".join(current))
    return [normalize_space(p) for p in pieces if p.strip()]


def cnndm_filter_sentences(sentences: list[str], min_tokens: int = 5, max_overlap: float = 0.7) -> list[str]:
    """postprocess_cnn_dm.py's cleaning of generated summaries: drop sentences of fewer than 5 tokens, then drop a
    sentence when more than 70% of its (lower-cased) word types already appeared in earlier sentences."""
    kept = [s for s in sentences if len(tokens(s)) >= min_tokens]
    result, seen = [], set()
    for sentence in kept:
        words = set(sentence.lower().split())
        if len(words & seen) / len(words) <= max_overlap:
            result.append(sentence)
        seen |= words
    return result


def coqa_normalize(text: str) -> str:
    """CoQA/SQuAD answer normalisation: lower-case, remove punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return normalize_space(_ARTICLES.sub(" ", text))


def ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
