"""ELMER off-ramps / LPLM (methods.md §2.3, §7.5): a per-token exit layer, exited states copied upward detached,
computation stopping once every token has exited."""
import pytest
import torch

from model.config import ModelConfig
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams

L = 4  # decoder layers
B, S, T = 2, 5, 6


def make_model(norm: str) -> Seq2SeqModel:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=128, d_model=32, n_heads=4, d_ffn=64, n_decoder_layers=L, norm=norm)
    return Seq2SeqModel(cfg).eval()  # dropout is 0 in tiny; eval() makes that explicit


def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(6, 128, (B, S), generator=g)
    src[1, 3:] = 0
    streams = build_streams("nar_bidir", length=T, batch_size=B,
                            tgt_mask=torch.tensor([[1] * T, [1] * (T - 1) + [0]], dtype=torch.bool))
    return src, streams


def reference_lplm(model, enc, streams, exit_layers, detach_copies: bool):
    """LPLM written out from methods.md §2.3, with the copy made a constant (detach) or not."""
    x0 = model.embed_decoder(streams.ids, streams.is_slot, streams.positions)
    x0.retain_grad()
    cross_mask = enc.pad_mask[:, None, :].expand(x0.shape[0], x0.shape[1], -1)
    x, out = x0, torch.zeros_like(x0)
    frozen = torch.zeros_like(x0)
    exited = torch.zeros(x0.shape[:2], dtype=torch.bool)
    for number, layer in enumerate(model.decoder_layers, start=1):
        x, _ = layer(x, streams.attn_mask, enc.states, cross_mask)
        now = ~exited & (exit_layers == number)
        out = torch.where(now[..., None], model.decoder_final_norm(x), out)
        frozen = torch.where(now[..., None], x.detach() if detach_copies else x, frozen)
        exited = exited | now
        x = torch.where(exited[..., None], frozen, x)
    return out, x0


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_exited_state_is_identical_in_all_later_layers(norm):
    model = make_model(norm)
    src, streams = batch()
    exit_layers = torch.randint(1, L + 1, (B, T), generator=torch.Generator().manual_seed(2))
    exit_layers[0, 0], exit_layers[1, 0] = 1, L  # at least one early and one last-layer exit
    with torch.no_grad():
        out = model(src, streams, exit_layers=exit_layers, keep_layer_states=True)
    assert torch.equal(out.exit_layer, exit_layers)
    states = out.layer_states
    assert len(states) == int(exit_layers.max())
    for b in range(B):
        for t in range(T):
            e = int(exit_layers[b, t])
            for later in range(e, len(states)):
                assert torch.equal(states[later][b, t], states[e - 1][b, t]), (b, t, e, later)
            # The output is the state at the exit layer (through the final norm on pre-LN).
            want = model.decoder_final_norm(states[e - 1][b, t])
            torch.testing.assert_close(out.hidden[b, t], want, rtol=0, atol=1e-6)
    # Rows that have not exited do change from layer to layer.
    live = exit_layers[0] == L
    assert float((states[1][0, live] - states[0][0, live]).abs().max()) > 1e-3


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_copies_carry_no_gradient(norm):
    model = make_model(norm)
    src, streams = batch()
    exit_layers = torch.tensor([[1, 3, 4, 2, 4, 3], [2, 4, 1, 3, 4, 4]])
    enc = model.encode(src)
    # A loss that depends only on tokens exiting at layer 3 or 4, i.e. on other tokens' later-layer outputs.
    later = (exit_layers >= 3)[..., None].float()
    weights = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(3)) * later

    captured = {}  # forward hooks must return None, or they replace the module's output
    hooks = [model.decoder_embed_norm.register_forward_hook(lambda m, i, o: captured.update(x0=o)),
             model.decoder_layers[0].register_forward_hook(lambda m, i, o: captured.update(layer1=o[0]))]
    out = model.decode(enc, streams, exit_layers=exit_layers)
    for h in hooks:
        h.remove()
    captured["x0"].retain_grad()
    captured["layer1"].retain_grad()
    (out.hidden * weights).sum().backward(retain_graph=True)
    got_x0 = captured["x0"].grad.clone()
    # Directly: the layer-1 state of a token that exits at layer 1 gets exactly zero gradient from later layers.
    g1 = captured["layer1"].grad
    assert float(g1[0, 0].abs().max()) == 0.0 and float(g1[1, 2].abs().max()) == 0.0
    assert float(g1[0, 1].abs().max()) > 1e-6  # a token still in flight does get gradient there

    # The same forward written out with the copies as constants gives the same outputs and input gradient.
    ref_out, ref_x0 = reference_lplm(model, model.encode(src), streams, exit_layers, detach_copies=True)
    torch.testing.assert_close(out.hidden, ref_out, rtol=0, atol=1e-6)
    (ref_out * weights).sum().backward()
    torch.testing.assert_close(got_x0, ref_x0.grad, rtol=0, atol=1e-6)
    # Copies that did carry gradient would change the gradient of the exited tokens' inputs: the check has teeth.
    att_out, att_x0 = reference_lplm(model, model.encode(src), streams, exit_layers, detach_copies=False)
    torch.testing.assert_close(att_out, out.hidden, rtol=0, atol=1e-6)  # same values, different graph
    (att_out * weights).sum().backward()
    for b, t in [(0, 0), (1, 2)]:
        assert float((att_x0.grad[b, t] - got_x0[b, t]).abs().max()) > 1e-5, (b, t)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_all_exits_at_last_layer_equal_the_plain_nar_forward(norm):
    model = make_model(norm)
    src, streams = batch()
    targets = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(4))

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(src, streams, **kw)
        model.token_loss(out.hidden, targets).sum().backward()
        return out.hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    last, last_grads = run(exit_layers=torch.full((B, T), L))
    assert torch.equal(plain, last)
    assert plain_grads.keys() == last_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(last_grads[name], plain_grads[name], rtol=0, atol=1e-7, msg=name)


def count_layer_calls(model, **kw) -> tuple[list[int], object]:
    calls = [0] * L
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, layer in enumerate(model.decoder_layers)]
    src, streams = batch()
    with torch.no_grad():
        out = model(src, streams, **kw)
    for h in hooks:
        h.remove()
    return calls, out


def test_computation_stops_once_all_tokens_have_exited_unless_told_or_given_a_depth():
    """By default the decoder stops once every row has exited (a flag read per layer on the host). Training
    (stop_when_all_exited=False) runs every layer and reads nothing; `depth` runs a host-known number of layers
    without reading either, rows still in at `depth` exiting there."""
    model = make_model("post")
    exits = torch.tensor([[1, 2, 1, 2, 2, 1], [2, 1, 1, 1, 2, 2]])
    calls, out = count_layer_calls(model, exit_layers=exits)
    assert calls == [1, 1, 0, 0]
    assert torch.equal(out.exit_layer, exits)
    calls, full = count_layer_calls(model, exit_layers=exits, stop_when_all_exited=False)
    assert calls == [1, 1, 1, 1] and torch.equal(full.exit_layer, exits)
    assert torch.equal(full.hidden, out.hidden)  # the same rows, the same states: later layers were idle
    calls, shallow = count_layer_calls(model, exit_layers=exits, stop_when_all_exited=False, depth=2)
    assert calls == [1, 1, 0, 0] and torch.equal(shallow.hidden, out.hidden)
    calls, out = count_layer_calls(model, exit_layers=torch.ones(B, T, dtype=torch.long))
    assert calls == [1, 0, 0, 0]
    calls, out = count_layer_calls(model, exit_layers=torch.full((B, T), 3), stop_when_all_exited=False, depth=1)
    assert calls == [1, 0, 0, 0] and bool((out.exit_layer == 1).all())  # still in at depth 1: exits there
    calls, _ = count_layer_calls(model)
    assert calls == [1, 1, 1, 1]
    # The on-the-fly rule (entropy early exit) stops the same way.
    calls, out = count_layer_calls(model, exit_rule=lambda layer, h: torch.full(h.shape[:2], layer >= 2))
    assert calls == [1, 1, 0, 0] and bool((out.exit_layer == 2).all())
    calls, out = count_layer_calls(model, exit_rule=lambda layer, h: torch.zeros(h.shape[:2], dtype=torch.bool))
    assert calls == [1, 1, 1, 1] and bool((out.exit_layer == L).all())


@pytest.mark.parametrize("mode", ["nar_bidir", "bang"])
def test_forward_one_lookup_equals_encode_then_decode(mode):
    """forward embeds source and decoder ids in one lookup (Seq2SeqModel.forward): the same states and the same
    gradient of every parameter as encode then decode, with exits (ELMER) and with real decoder tokens (BANG)."""
    model = make_model("post")
    src, streams = batch()
    kwargs = {"exit_layers": torch.tensor([[1, 3, 4, 2, 4, 3], [2, 4, 1, 3, 4, 4]]), "stop_when_all_exited": False}
    if mode == "bang":
        prev = torch.randint(6, 128, (B, T), generator=torch.Generator().manual_seed(3))
        streams, kwargs = build_streams("bang", prev_tokens=prev, n_predict=2), {}
    weights = torch.randn(B, streams.ids.shape[1], model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    runs = []
    for run in (lambda: model(src, streams, **kwargs), lambda: model.decode(model.encode(src), streams, **kwargs)):
        model.zero_grad(set_to_none=True)
        hidden = run().hidden
        (hidden * weights).sum().backward()
        runs.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (one, one_grads), (two, two_grads) = runs
    torch.testing.assert_close(one, two, rtol=0, atol=1e-6)
    assert one_grads.keys() == two_grads.keys() and "embed_tokens.weight" in one_grads
    for name, grad in one_grads.items():
        torch.testing.assert_close(grad, two_grads[name], rtol=0, atol=1e-5, msg=name)


def test_tied_head_gradient_is_summed_with_the_lookups_in_place():
    """The output head shares the [V, D] table with the token lookup (model.layers.tied_projection). Its weight
    gradient owns its storage (F.linear's is a transposed view), so autograd adds the lookup's gradient into it
    in place: no third [V, D] tensor per step. Values and gradients equal F.linear's (1e-6)."""
    from torch.nn import functional as F
    from torch.profiler import profile

    from model.layers import tied_projection

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(7, 16, generator=g), torch.randn(64, 16, generator=g)
    upstream = torch.randn(7, 64, generator=g)
    grads = []
    for head in (tied_projection, F.linear):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = head(h, w)
        (out * upstream).sum().backward()
        grads.append((out.detach(), h.grad, w.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    frozen = hidden.clone().requires_grad_()
    (tied_projection(frozen, weight) * upstream).sum().backward()  # a weight without a gradient: hidden's alone
    torch.testing.assert_close(frozen.grad, grads[1][1], rtol=0, atol=1e-6)

    model = make_model("post")
    src, streams = batch()
    V, D = model.embed_tokens.weight.shape
    hidden = model(src, streams).hidden
    loss = model.token_loss(hidden, torch.randint(6, V, hidden.shape[:2], generator=g)).sum()
    with profile(record_shapes=True) as prof:
        loss.backward()
    table_adds = {e.key for e in prof.events() if e.input_shapes[:2] == [[V, D], [V, D]] and "add" in e.key}
    assert table_adds == {"aten::add_"}, table_adds  # F.linear's head: {"aten::add"}, a new [V, D] tensor
