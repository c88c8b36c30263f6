"""GLGE metrics: each agrees with an independent computation (sacrebleu, rouge-score, NLTK, hand arithmetic), the
task registry, the GLGE score arithmetic, and scoring of the real samples in ../shared/data/glge (read-only)."""

from pathlib import Path

import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

from finetune.glge_tasks import GLGE_TASKS, TASKS, get_task, submission_filename
from finetune.metrics import evaluate_task, evaluate_task_detailed, glge_score, meteor, task_score
from finetune.metrics.scores import coco_rouge_l, corpus_bleu4, distinct
from finetune.metrics.text import cnndm_filter_sentences, ptb_fix, split_sentences


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[:limit] if limit else lines


def drop_every(text: str, k: int) -> str:
    """A deterministic 'model output': the reference with every k-th word removed."""
    return " ".join(w for i, w in enumerate(text.split()) if i % k != k - 1)


# ---------------------------------------------------------------- registry


def test_registry_tasks_metrics_and_decoding():
    assert GLGE_TASKS == ("cnndm", "gigaword", "xsum", "msnews", "squadqg", "msqg", "coqa", "personachat")
    assert get_task("cnndm").metrics == ("rouge1", "rouge2", "rougeL")
    assert get_task("squadqg").metrics == ("rougeL", "bleu4", "meteor")
    assert get_task("msqg").metrics == ("rougeL", "bleu4", "meteor")
    assert get_task("coqa").metrics == ("f1",)
    assert get_task("personachat").metrics == ("bleu1", "bleu2", "distinct1", "distinct2")
    assert get_task("iwslt14").metrics == ("bleu",) and not get_task("iwslt14").glge
    cnndm = get_task("cnndm").decoding
    assert (cnndm.beam, cnndm.lenpen, cnndm.min_len, cnndm.max_len, cnndm.no_repeat_ngram_size) == (5, 1.2, 45, 110, 3)
    for name in GLGE_TASKS[1:]:
        d = get_task(name).decoding
        assert (d.beam, d.lenpen, d.no_repeat_ngram_size, d.max_len) == (4, 1.0, 3, 140), name
    assert submission_filename("xsum", "hard") == "xsum.hard.test"


def test_unknown_task_and_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'cnn'.*known tasks: cnndm, gigaword, .*iwslt14"):
        evaluate_task("cnn", ["a"], ["a"])
    with pytest.raises(ValueError, match="gigaword: 2 hypotheses but 1 references"):
        evaluate_task("gigaword", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="0 hypotheses"):
        evaluate_task("xsum", [], [])
    with pytest.raises(ValueError, match="only coqa and QG tasks take several references"):
        evaluate_task("gigaword", ["a"], [["a", "b"]])
    with pytest.raises(ValueError, match="not a GLGE task"):
        glge_score({"iwslt14": 30.0})
    with pytest.raises(ValueError, match="unknown GLGE version"):
        submission_filename("xsum", "extreme")
    assert set(TASKS) == set(GLGE_TASKS) | {"iwslt14"}


# ---------------------------------------------------------------- metrics against independent computations


def test_rouge_matches_rouge_score_directly(shared_data):
    refs = read_lines(shared_data / "glge/gigaword/valid.tgt", 300)
    hyps = [drop_every(r, 3) for r in refs]
    ours = evaluate_task("gigaword", hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(s[name].fmeasure for s in direct) / len(direct)
        assert ours[name] == pytest.approx(expected, abs=1e-9), name
    assert 30 < ours["rouge2"] < ours["rouge1"] < 100  # a plausible range for a 2/3-word copy
    assert ours["task_score"] == pytest.approx((ours["rouge1"] + ours["rouge2"] + ours["rougeL"]) / 3, abs=1e-12)


def test_bleu4_matches_sacrebleu_tok_none(shared_data):
    refs = [r.lower() for r in read_lines(shared_data / "glge/squadqg/valid.tgt", 1000)]
    hyps = [" ".join(r.split()[:2] + r.split()[3:]) for r in refs]  # drop the third word
    assert all(ptb_fix(h) == h for h in hyps)  # already PTB-tokenised, so squadqg's preparation is only lower()
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="none", force=True).score
    assert evaluate_task("squadqg", hyps, refs)["bleu4"] == pytest.approx(expected, abs=1e-6)
    assert 20 < expected < 90

    # Grouped by source (official QG scripts): lines 2i and 2i+1 share a source, the group keeps the last
    # hypothesis and both references; sacrebleu gets the same as two reference streams.
    sources = [f"source {i // 2}" for i in range(len(refs))]
    grouped_hyps = hyps[1::2]
    expected_grouped = sacrebleu.corpus_bleu(
        grouped_hyps, [refs[0::2], refs[1::2]], tokenize="none", smooth_method="none", force=True
    ).score
    assert evaluate_task("squadqg", hyps, refs, sources=sources)["bleu4"] == pytest.approx(expected_grouped, abs=1e-6)
    assert corpus_bleu4(["x y z w"], [["a b c d"]]) == 0.0  # no 1-gram match: 0, as sacrebleu without smoothing


def test_coco_rouge_l_hand_computed():
    # hyp "a b c d" vs ref "a c d e f": LCS "a c d" = 3, P = 3/4, R = 3/5,
    # F(beta=1.2) = (1 + 1.44) * 0.75 * 0.6 / (0.6 + 1.44 * 0.75) = 1.098 / 1.68 = 0.6535714...
    assert coco_rouge_l(["a b c d"], [["a c d e f"]]) == pytest.approx(65.35714285714286, abs=1e-9)
    # two references, best P and best R taken separately (coco-caption):
    # ref1 "a b" -> LCS 2, P = 2/4, R = 2/2 = 1; ref2 "a b c d e f g h" -> LCS 4, P = 4/4 = 1, R = 4/8.
    # P_max = 1, R_max = 1 -> F = 1, although neither reference alone gives more than F = 0.6-0.7.
    assert coco_rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(100.0, abs=1e-9)


def test_personachat_bleu_matches_nltk(shared_data):
    refs = read_lines(shared_data / "glge/personachat/valid.tgt", 400)
    hyps = [drop_every(r, 3) for r in refs]
    hyps[0] = ""  # an empty response: NLTK gives 0, as GLGE's eval.py would count it
    ours = evaluate_task("personachat", hyps, refs)
    smooth = SmoothingFunction().method7
    for name, weights in (("bleu1", (1, 0, 0, 0)), ("bleu2", (0.5, 0.5, 0, 0))):
        direct = [
            sentence_bleu([r.split()], h.split(), weights=weights, smoothing_function=smooth)
            for h, r in zip(hyps, refs)
        ]
        assert ours[name] == pytest.approx(100 * sum(direct) / len(direct), abs=1e-9), name


def test_distinct_hand_computed():
    hyps = ["a b a b", "a b"]
    # unigrams: a b a b a b -> 6 in all, 2 unique -> 2/6 = 0.3333...
    # bigrams: (a b) (b a) (a b) from line 1 and (a b) from line 2 -> 4 in all, 2 unique -> 0.5
    assert distinct(hyps, 1) == pytest.approx(1 / 3, abs=1e-12)
    assert distinct(hyps, 2) == pytest.approx(0.5, abs=1e-12)
    assert distinct([""], 1) == 0.0


def test_personachat_task_score_scales_distinct():
    refs = ["a b c", "a b"]
    result = evaluate_task("personachat", ["a b a b", "a b"], refs)
    assert result["distinct1"] == pytest.approx(1 / 3) and result["distinct2"] == pytest.approx(0.5)
    expected = (result["bleu1"] + result["bleu2"] + 100 / 3 + 50) / 4
    assert result["task_score"] == pytest.approx(expected, abs=1e-9)


def test_coqa_f1_hand_computed():
    hyps = ["The cat sat.", "in a barn", "no", "the"]
    refs = ["a cat sat down", "barn", ["yes", "No."], "A"]
    # 1: "cat sat" vs "cat sat down": 2 common, P = 1, R = 2/3, F1 = 2 * (2/3) / (5/3) = 0.8
    # 2: "in barn" vs "barn": P = 1/2, R = 1, F1 = 2/3
    # 3: max("no" vs "yes" = 0, "no" vs "no" = 1) = 1
    # 4: both normalise to "" -> 1
    # mean = (0.8 + 0.6667 + 1 + 1) / 4 = 0.866667 -> 86.6667
    assert evaluate_task("coqa", hyps, refs)["f1"] == pytest.approx(100 * (0.8 + 2 / 3 + 2) / 4, abs=1e-9)


# METEOR 1.5: expected values from running the jar by hand (pycocoevalcap 1.2's meteor-1.5.jar, OpenJDK 17), in its
# folder, with coco-caption's arguments:
#   java -Dfile.encoding=UTF-8 -Xmx2G -jar meteor-1.5.jar - - -stdio -l en -norm
# fed the four lines `SCORE ||| <refs ...> ||| <hypothesis>` below (it answered one statistics line each), then, in
# a second run, `EVAL ||| <the four statistics lines>`; it answered the four segment scores and the corpus score
# 1.0, 0.4443438716486749, 0.29282706548657655, 0.0 and 0.29933304485647605.
METEOR_HYPS = ["what is the capital of france ?", "who wrote the play hamlet ?", "when did the war end ?",
               "the cat sat on the mat"]
METEOR_REFS = [["what is the capital of france ?"], ["who is the author of hamlet ?", "who wrote hamlet ?"],
               ["in which year did the second world war end ?"], ["how many moons does jupiter have ?"]]
METEOR_SEGMENTS = [100.0, 44.43438716486749, 29.282706548657655, 0.0]
METEOR_CORPUS = 29.933304485647605


def test_meteor_1_5_jar_on_known_sentences():
    """The wrapper gives the jar's own numbers (run by hand above): an identical hypothesis scores 100, an
    unrelated one 0, and the corpus score is the jar's aggregate of the statistics (not the segment mean, 43.4)."""
    assert meteor.unavailable_reason() is None, meteor.unavailable_reason()  # `make test` installs Java and the jar
    corpus, segments = meteor.meteor_1_5(METEOR_HYPS, METEOR_REFS)
    assert segments == pytest.approx(METEOR_SEGMENTS, abs=1e-9)
    assert corpus == pytest.approx(METEOR_CORPUS, abs=1e-9)
    assert abs(corpus - sum(segments) / 4) > 10


def test_meteor_in_the_qg_task_scores_and_the_glge_score():
    """msqg scores the raw lines: METEOR is the jar's corpus score, and the task score the mean of all three."""
    result = evaluate_task_detailed("msqg", METEOR_HYPS, METEOR_REFS)
    s = result.scores
    assert s["meteor"] == pytest.approx(METEOR_CORPUS, abs=1e-9)
    assert s["task_score"] == pytest.approx((s["rougeL"] + s["bleu4"] + METEOR_CORPUS) / 3, abs=1e-9)
    assert result.notes["meteor"].startswith("METEOR 1.5") and "task_score" not in result.notes
    assert glge_score({"msqg": s, "coqa": 70.0}) == pytest.approx((s["task_score"] + 70.0) / 2, abs=1e-12)


def test_meteor_reported_unavailable_not_zero_without_java(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` here
    refs = ["what is the capital of france ?", "who wrote hamlet ?"]
    result = evaluate_task_detailed("squadqg", ["what is the capital of france ?", "who wrote it ?"], refs)
    assert result.scores["meteor"] is None
    note = result.notes["meteor"]
    assert note.startswith("METEOR unavailable: Java is not installed") and "apt-get install default-jre-headless" in note
    s = result.scores
    assert s["task_score"] == pytest.approx((s["rougeL"] + s["bleu4"]) / 2, abs=1e-12)
    assert result.notes["task_score"] == "mean of rougeL, bleu4 only; unavailable: meteor"


def test_iwslt14_sacrebleu_and_signature(shared_data):
    refs = read_lines(shared_data / "iwslt14-de-en/valid.en", 500)
    hyps = [drop_every(r, 4) for r in refs]
    result = evaluate_task_detailed("iwslt14", hyps, refs)
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none")
    assert result.scores["bleu"] == pytest.approx(expected.score, abs=1e-9)
    signature = f"nrefs:1|case:mixed|eff:no|tok:none|smooth:exp|version:{sacrebleu.__version__}"
    assert result.notes["bleu"] == f"sacrebleu {signature}"


# ---------------------------------------------------------------- text preparation


def test_text_preparation_helpers():
    assert ptb_fix('he said " i don \' t know " ( twice )') == "he said `` i do n't know '' -lrb- twice -rrb-"
    assert ptb_fix("john ' s car . . .") == "john 's car ..."
    assert split_sentences("one two . three four !") == ["one two .", "three four !"]
    assert split_sentences("first sentence here <S_SEP> second one") == ["first sentence here", "second one"]
    sentences = ["the cat sat on the mat .", "short one .", "the cat sat on a mat .", "a new fact about dogs ."]
    # "short one ." has 3 tokens (< 5); "the cat sat on a mat ." shares {the cat sat on mat .} = 6 of 7 types
    # (> 70%) with the first sentence; the last shares only {.} = 1 of 6.
    assert cnndm_filter_sentences(sentences) == ["the cat sat on the mat .", "a new fact about dogs ."]


# ---------------------------------------------------------------- GLGE score


def test_glge_score_small_case():
    persona = {"bleu1": 40.0, "bleu2": 30.0, "distinct1": 0.02, "distinct2": 0.10}
    # (40 + 30 + 0.02*100 + 0.10*100) / 4 = 82 / 4 = 20.5 ; coqa 70 ; GLGE = (20.5 + 70) / 2 = 45.25
    assert task_score("personachat", persona) == pytest.approx(20.5, abs=1e-12)
    per_task = {"personachat": {**persona, "task_score": 20.5}, "coqa": 70.0}
    assert glge_score(per_task) == pytest.approx(45.25, abs=1e-12)


def test_glge_score_reproduces_prophetnet_large_easy_leaderboard():
    # methods.md §4.3, ProphetNet-large easy; Distinct printed there x100 (1.3, 7.5), so raw 0.013 / 0.075.
    per_task_metrics = {
        "cnndm": {"rouge1": 44.2, "rouge2": 21.1, "rougeL": 41.3},
        "gigaword": {"rouge1": 39.5, "rouge2": 20.4, "rougeL": 36.6},
        "xsum": {"rouge1": 44.4, "rouge2": 21.3, "rougeL": 36.4},
        "msnews": {"rouge1": 44.1, "rouge2": 24.4, "rougeL": 40.2},
        "squadqg": {"rougeL": 51.5, "bleu4": 22.5, "meteor": 26.0},
        "msqg": {"rougeL": 38.3, "bleu4": 9.6, "meteor": 23.3},
        "coqa": {"f1": 73.0},
        "personachat": {"bleu1": 46.7, "bleu2": 39.0, "distinct1": 0.013, "distinct2": 0.075},
    }
    # per-task means: 35.533 32.167 34.033 36.233 33.333 23.733 73.0 23.625 -> sum 291.658 / 8 = 36.457
    scores = {task: task_score(task, metrics) for task, metrics in per_task_metrics.items()}
    assert glge_score(scores) == pytest.approx(36.46, abs=0.01)


# ---------------------------------------------------------------- real samples


def test_real_samples_self_and_shifted(shared_data):
    glge = shared_data / "glge"
    giga = read_lines(glge / "gigaword/valid.tgt")
    self_score = evaluate_task("gigaword", giga, giga)
    assert self_score == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "task_score": 100.0}
    shifted = evaluate_task("gigaword", giga[1:] + giga[:1], giga)
    assert shifted["rouge1"] < 10 and shifted["rouge2"] < 2 and shifted["rougeL"] < 10

    cnndm = read_lines(glge / "cnndm/test.tgt")
    # not exactly 100: like postprocess_cnn_dm.py, generated sentences under 5 tokens or near-duplicates are dropped
    assert evaluate_task("cnndm", cnndm, cnndm)["task_score"] > 99.5
    assert evaluate_task("cnndm", cnndm[1:] + cnndm[:1], cnndm)["task_score"] < 15

    coqa = read_lines(glge / "coqa/valid.tgt")
    assert evaluate_task("coqa", coqa, coqa)["f1"] == pytest.approx(100.0)
    assert evaluate_task("coqa", coqa[1:] + coqa[:1], coqa)["f1"] < 20

    squad_refs = read_lines(glge / "squadqg/valid.tgt", 2000)
    squad_src = read_lines(glge / "squadqg/valid.src", 2000)
    same = evaluate_task("squadqg", squad_refs, squad_refs, sources=squad_src)
    assert same["rougeL"] > 99 and same["bleu4"] > 99 and same["meteor"] > 99
    low = evaluate_task("squadqg", squad_refs[1:] + squad_refs[:1], squad_refs)
    assert low["bleu4"] < 15 and low["rougeL"] < 40 and low["meteor"] < 20
