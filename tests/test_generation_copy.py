"""A tiny model trained for 400 steps on a copy task (plain AR, teacher forcing) decodes its sources back with
greedy and beam search: the cached decoding paths work on a model that has learnt something."""
import torch

from model.config import SPECIAL, ModelConfig
from model.generation import DecodeOptions, decode
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams

STEPS = 400


def copy_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 3..6 tokens from ids 6..29, then EOS, right-padded; the target is the source."""
    lengths = torch.randint(3, 7, (n,), generator=g)
    T = int(lengths.max()) + 1
    tokens = torch.randint(6, 30, (n, T), generator=g)
    seq = torch.where(torch.arange(T)[None] < lengths[:, None], tokens, SPECIAL.pad)
    seq[torch.arange(n), lengths] = SPECIAL.eos
    return seq, seq.clone()


def test_trained_copy_model_decodes_its_sources():
    torch.manual_seed(0)
    model = Seq2SeqModel(ModelConfig.preset("tiny", vocab_size=128, n_length_classes=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        src, tgt = copy_batch(g, 32)
        prev = torch.cat([torch.full((32, 1), SPECIAL.bos), tgt[:, :-1]], dim=1)
        real = tgt != SPECIAL.pad
        hidden = model(src, build_streams("ar", prev_tokens=prev, tgt_mask=real)).hidden
        loss = (model.token_loss(hidden, tgt) * real).sum() / real.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2

    src, _ = copy_batch(g, 16)
    want = [[t for t in row if t not in (SPECIAL.pad, SPECIAL.eos)] for row in src.tolist()]
    greedy = decode("ar_greedy", model, src, DecodeOptions(max_len=10))
    beam = decode("ar_beam", model, src, DecodeOptions(max_len=10, beam_size=4, length_penalty=1.0))
    assert greedy.tokens == want
    assert beam.tokens == want
    assert greedy.figures["decoder_passes"] == max(map(len, want)) + 1  # stops once every row emitted EOS
