"""The pretraining objectives learn, end to end: real corruption (PretrainCollator -> bang_corrupt / elmer_corrupt),
real objectives (pretrain/objectives), the tiny preset, the demo's optimiser recipe (AdamW 2e-3, 30 warmup steps,
clip 1.0).

The text is a synthetic language whose conditional entropies are known, so the per-stream losses say whether each
stream sees exactly what methods.md §1.3 says it sees: 40 symbols; each token is followed by one of two successors
of its predecessor, pi(x) or sigma(x), with probability 1/2 each. Hence
  - BANG stream 0 (sees y_<i): entropy ln 2 = 0.69 per token; a lower loss would mean it sees y_i (a leak);
  - BANG stream 1 (sees y_<i-1): y_i is one of up to 4 two-step successors of y_{i-2}: ln 4 = 1.39;
  - BANG NAR view (no gold target token): only the encoder's unmasked context: stays far above both;
  - ELMER: every target is a mask slot and must come from the corrupted source through cross-attention; the
    unigram entropy is ln 40 = 3.69.
A stream misaligned by one token (e.g. stream 0 given y_<i-1) would sit near ln 4 instead of ln 2.

Measured (2 CPU cores): BANG after 400 steps s0 1.00, s1 1.63, NAR 4.65 (~25 s); ELMER after 300 steps 2.51
(~30 s). Plain AR (mode `ar`) on the same BANG pairs reaches 0.90 after 100 steps: BANG's predicting slots carry no
token and must find their main-stream row through absolute position embeddings, which takes longer.
"""
import math

import numpy as np
import pytest
import torch

from data_pipeline.config import CorruptionConfig
from data_pipeline.corruption import CorruptionTables, PretrainCollator, to_torch
from model import parallel
from model.config import ModelConfig
from model.seq2seq import Seq2SeqModel
from pretrain.objectives import build

N_SYMBOLS = 40
FIRST_ID = 6  # symbols are ids 6..45, after the special ids
DOC_LEN = 64  # one BANG block: one 9-token span per document


def successor_tables(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pi = rng.permutation(N_SYMBOLS)
    sigma = (pi + 1 + rng.integers(0, N_SYMBOLS - 1, N_SYMBOLS)) % N_SYMBOLS  # sigma(x) != pi(x)
    return pi, sigma


def document(rng: np.random.Generator, pi: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    y = [int(rng.integers(N_SYMBOLS))]
    for _ in range(DOC_LEN - 1):
        y.append(int(pi[y[-1]] if rng.random() < 0.5 else sigma[y[-1]]))
    return np.asarray(y, dtype=np.int64) + FIRST_ID


def make_batches(objective: str, n_batches: int, batch_size: int, seed: int) -> list[dict]:
    pi, sigma = successor_tables(np.random.default_rng(0))  # one language for training and held-out data
    doc_rng = np.random.default_rng(seed)
    vocab = FIRST_ID + N_SYMBOLS
    # every token starts a word; no sentence ends, so ELMER's sentence permutation has nothing to permute
    tables = CorruptionTables(vocab, np.ones(vocab, dtype=bool), np.zeros(vocab, dtype=bool))
    collate = PretrainCollator(CorruptionConfig(), tables, {objective: 1.0}, seed)
    batches = []
    for b in range(n_batches):
        samples = [(b * batch_size + i, {"tok": document(doc_rng, pi, sigma)}) for i in range(batch_size)]
        batches.append(to_torch(collate(samples, 0, b)))
    return batches


def train_and_evaluate(objective, name: str, steps: int) -> dict[str, float]:
    """Train the tiny preset on `steps` fresh batches; held-out means of the objective's eval metrics."""
    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    model = Seq2SeqModel(ModelConfig.preset("tiny", vocab_size=64))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=2e-3, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    model.train()
    for batch in make_batches(name, steps, 16, seed=1):
        loss, _ = objective.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch in make_batches(name, 4, 32, seed=2):
            for key, (total, count) in objective.eval_metrics(model, batch).items():
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(total)
                acc[1] += float(count)
    return {key: total / max(count, 1.0) for key, (total, count) in sums.items()}


def test_synthetic_language_has_the_stated_successor_structure():
    pi, sigma = successor_tables(np.random.default_rng(0))
    assert (pi != sigma).all()
    doc = document(np.random.default_rng(3), pi, sigma) - FIRST_ID
    assert all(b in (pi[a], sigma[a]) for a, b in zip(doc[:-1], doc[1:]))


@pytest.mark.timeout(300)
def test_bang_streams_learn_what_their_view_allows():
    m = train_and_evaluate(build("bang", n_streams=2), "bang", steps=400)
    s0, s1, nar = m["bang/loss_s0"], m["bang/loss_s1"], m["bang/nar_loss"]
    assert s0 < 1.3, f"stream 0 (AR view) loss {s0:.3f} after 400 steps; measured 1.00, entropy ln2=0.69"
    assert s0 > math.log(2) - 0.1, f"stream 0 loss {s0:.3f} is below the entropy ln2: it sees its own target"
    assert s1 > s0 + 0.3, f"stream 1 ({s1:.3f}) should be clearly worse than stream 0 ({s0:.3f}): it sees one "\
        "token less (measured 1.63 vs 1.00)"
    assert s1 < 2.0, f"stream 1 loss {s1:.3f} after 400 steps; measured 1.63, entropy ln4=1.39"
    assert nar > s1 + 1.0, f"the NAR view ({nar:.3f}) sees no gold target token; measured 4.65"


@pytest.mark.timeout(300)
def test_elmer_slots_learn_the_text_from_the_corrupted_source():
    m = train_and_evaluate(build("elmer", n_layers=2), "elmer", steps=300)
    nar = m["elmer/nar_loss"]
    assert nar < 2.9, f"ELMER NAR loss {nar:.3f} after 300 steps; measured 2.51, unigram ln40=3.69"
