"""The fake-CUDA dry run (pretrain/core/dry_run.py): the model, every objective, the training step, evaluation,
checkpoint RNG state and every decoding mode run over tensors on cuda:0 without a GPU, at TP=1 and TP=2 (data
parallel 2 both times) over torch's fake process group, and must neither mix host and device tensors, nor copy
between them inside a step, nor hand a host tensor to a collective, nor read a device value on the host inside a
training micro-step. On this CPU build backward runs on a second pass over the "meta" device (the autograd
engine cannot run backward over cuda tensors without a CUDA build; see the module docstring).
"""
import pytest
import torch
import torch.distributed as dist

import finetune.objectives  # noqa: F401  (registers ar, nar, bang_mixed, janus)
from model.config import SPECIAL, ModelConfig
from model.generation import DecodeOptions, decode
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams
from pretrain.core import checkpoint, dry_run, step
from pretrain.core.dry_run import DeviceDisciplineError, FakeDevice, fake_world
from pretrain.objectives import build

FORWARD, BACKWARD = dry_run.pass_devices()
WORLDS = {"tp1": (2, 1), "tp2": (4, 2)}  # (world size, tensor parallel): data parallel 2 both times
B, S, T = 3, 10, 8


def model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=256, d_model=32, n_heads=4, d_ffn=64, n_encoder_layers=1, n_decoder_layers=2,
                max_source_positions=32, max_target_positions=32, n_length_classes=32, dropout=0.1,
                attention_dropout=0.1, attention_backend="auto")
    return ModelConfig.preset("tiny", **{**base, **overrides})


@pytest.fixture(params=sorted(WORLDS))
def world(request):
    with fake_world(*WORLDS[request.param], seed=0):
        yield request.param


def host_batch(objective: str = "", seed: int = 0) -> dict:
    """A pretraining/finetuning batch on the host: row 1 padded after 5 targets, BANG spans, sample ids."""
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randint(6, 250, (B, T), generator=g)
    tgt[:, -1] = SPECIAL.eos
    tgt[1, 5:] = SPECIAL.pad
    tgt[1, 4] = SPECIAL.eos
    real = tgt != SPECIAL.pad
    prev = torch.cat([torch.full((B, 1), SPECIAL.bos), tgt[:, :-1]], 1).masked_fill(~real, SPECIAL.pad)
    src = torch.randint(6, 250, (B, S), generator=g)
    src[2, 7:] = SPECIAL.pad
    return {"objective": objective, "src_tokens": src, "tgt_tokens": tgt, "prev_tokens": prev,
            "tgt_positions": torch.arange(1, T + 1).repeat(B, 1).masked_fill(~real, 0),
            "span_index": (torch.arange(T).repeat(B, 1) % 4).masked_fill(~real, -1), "sample_ids": torch.arange(B)}


def objectives() -> dict:
    """Every pretraining and finetuning objective (the configurations a run can build)."""
    bang, elmer = build("bang", n_streams=2), build("elmer", n_layers=2, seed=3)
    return {
        "bang": bang, "elmer": elmer,
        "mix": build("mix", parts={"bang": build("bang", n_streams=2), "elmer": build("elmer", n_layers=2)},
                     weights={"bang": 0.5, "elmer": 0.5}),
        "ar": build("ar", stream="ar"), "ar_bang": build("ar", stream="bang_ar"),
        "nar_all": build("nar", masking="all"), "nar_uniform": build("nar", masking="uniform", seed=2),
        "nar_exits_all": build("nar", exits="all"), "nar_exits_random": build("nar", masking="uniform", exits="random"),
        "bang_mixed_ar": build("bang_mixed", nar_ratio=0.0), "bang_mixed_nar": build("bang_mixed", nar_ratio=1.0),
        "janus": build("janus", seed=4),
    }


def batch_objective(name: str, seed: int = 0) -> str:
    """What batch["objective"] says (the mix alternates between its parts)."""
    return ("bang", "elmer")[seed % 2] if name == "mix" else name


# --- where backward runs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("built, gpu, devices", [(False, False, ("cuda", "meta")), (True, False, ("cuda", "meta")),
                                                 (True, True, ("cuda", "cuda"))])
def test_backward_runs_on_cuda_only_where_a_gpu_is(monkeypatch, built, gpu, devices):
    # A CUDA build without a GPU (torch's default wheel on a CPU machine, as bench/gpu_rehearsal.sh runs it) fails
    # backward over fake cuda tensors in the autograd engine ("hasPrimaryContext expects a valid device index").
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert dry_run.pass_devices() == devices
    assert FakeDevice("cuda").can_backward is (devices[1] == "cuda")


# --- the checks themselves fail where they must ------------------------------------------------------------

def test_the_checks_catch_what_they_guard(world):
    """Each kind of fault the dry run exists to find raises: host reads of device values, a host->device copy, a
    host tensor in a collective, a host tensor mixed with a device one, an output shape that needs the data."""
    with FakeDevice(FORWARD) as fd, fd.strict():
        x = torch.ones(4, 3, device=fd.device)
        for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(x.sum()), lambda: float(x[0, 0]),
                     lambda: x.tolist(), lambda: x.cpu()):
            with pytest.raises(DeviceDisciplineError, match="host sync"):
                read()
        for copy in (lambda: torch.arange(3).to(fd.device), lambda: x[:, [0, 2]],  # a list index is copied
                     lambda: torch.tensor([1.0, 2.0], device=fd.device)):
            with pytest.raises(DeviceDisciplineError, match="host-to-device copy"):
                copy()
        with pytest.raises(DeviceDisciplineError, match="host tensor"):
            dist.all_reduce(torch.zeros(2))
        with pytest.raises(DeviceDisciplineError, match="output shape that depends on the data"):
            x[x > 0]
        with pytest.raises(RuntimeError, match="devices"):
            x + torch.ones(4, 3)
        dist.all_reduce(x)  # a device tensor is fine
    with FakeDevice(FORWARD) as fd, fd.counting(answer=1) as events:
        x = torch.ones(4, 3, device=fd.device)
        assert x.tolist() == [[1.0] * 3] * 4 and bool(x.sum()) is True
        torch.arange(3).to(fd.device)
    assert events.n_syncs == 2 and events.n_copies == 1  # a .tolist() of 12 values is one read


# --- the model: every decoder mode, ELMER exits, both kernels ---------------------------------------------

MODES = [("ar", {}), ("bang_ar", {}), ("bang", {"n_predict": 2}), ("nar_bidir", {}), ("nar_causal", {}),
         ("semi_nar", {"block_size": 3}), ("janus", {}), ("nar_bidir+elmer_exits", {})]


def decoder_pass(fd: FakeDevice, model, mode: str, kw: dict, backward: bool):
    b = fd.batch({**host_batch(), "masked": torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.6})
    real = b["tgt_tokens"] != SPECIAL.pad
    exits = None
    if mode.endswith("+elmer_exits"):
        mode = mode.split("+")[0]
        exits = torch.where(real, (b["tgt_positions"] % 2) + 1, 2)  # built on the device from batch tensors
    extra = {"masked": b["masked"]} if mode == "janus" else {}
    with fd.strict():
        streams = build_streams(mode, prev_tokens=b["prev_tokens"], tgt_tokens=b["tgt_tokens"],
                                tgt_positions=b["tgt_positions"], tgt_mask=real, **kw, **extra)
        out = model(b["src_tokens"], streams, exit_layers=exits, stop_when_all_exited=False)  # as training runs
        loss = model.token_loss(out.hidden[:, :T], b["tgt_tokens"], 0.1).sum()
        if backward:
            loss.backward()
    assert out.hidden.device == fd.device and out.hidden.shape[:2] == streams.ids.shape
    if exits is not None:
        assert out.exit_layer.shape == streams.ids.shape


@pytest.mark.parametrize("mode,kw", MODES, ids=[m for m, _ in MODES])
def test_decoder_modes_forward_on_cuda_and_backward(world, mode, kw):
    """Training forward (dropout on: SDPA with the dense mask built on the device), evaluation forward with
    FlexAttention (BlockMask built on the device), and forward + backward on the backward device."""
    with FakeDevice(FORWARD) as fd:
        model = fd.build(lambda: Seq2SeqModel(model_config()))
        decoder_pass(fd, model.train(), mode, kw, backward=fd.can_backward)
        with torch.no_grad():
            decoder_pass(fd, model.eval(), mode, kw, backward=False)
    with FakeDevice(BACKWARD) as fd:
        model = fd.build(lambda: Seq2SeqModel(model_config(attention_backend="sdpa"))).train()
        decoder_pass(fd, model, mode, kw, backward=True)
        assert model.slot_embed.grad is not None and model.embed_tokens.weight.grad.device == fd.device


# --- every objective --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(objectives()))
def test_objective_losses(world, name):
    """Loss (training) and held-out figures of every objective, the batch prepared on the host as the engine
    prepares it; backward on the backward device. Metric entries stay on the device (or are host numbers)."""
    for device in dict.fromkeys((FORWARD, BACKWARD)):
        objective = objectives()[name]
        objective.start_step(1)
        host = host_batch(batch_objective(name, seed=1))
        prepared = step.MicroBatch.prepare(host, objective).batch
        evaluated = objective.prepare(host, evaluate=True)
        with FakeDevice(device) as fd:
            model = fd.build(lambda: Seq2SeqModel(model_config(attention_backend="sdpa"))).train()
            with fd.strict():
                loss, metrics = objective.loss(model, fd.batch(prepared))
                if fd.can_backward:
                    loss.backward()
                with torch.no_grad():
                    held_out = objective.eval_metrics(model.eval(), fd.batch(evaluated))
            assert loss.device == fd.device and loss.dim() == 0
            for total, count in list(metrics.values()) + list(held_out.values()):
                assert total.device == fd.device
                assert not isinstance(count, torch.Tensor) or count.device == fd.device
            assert set(metrics) <= set(objective.metric_names())
            assert set(held_out) <= set(objective.eval_metric_names())


# --- the engine's step logic --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mix", "janus", "nar_uniform"])
def test_training_step_reads_nothing_on_the_host_and_reduces_once(world, name):
    """pretrain.core.step.train_step (what the Engine runs with DeepSpeed) over two micro-batches: the step's target
    count all-reduced as a device tensor, losses scaled by it on the device, metrics summed on the device; not one
    host read or copy in the micro-steps (strict). The log window's reduction reads once and copies the host
    sums once. Forward on cuda, the full step with backward on the backward device."""
    for device in dict.fromkeys((FORWARD, BACKWARD)):
        objective = objectives()[name]
        batches = [host_batch(batch_objective(name, s), seed=s) for s in (0, 1)]
        with FakeDevice(device) as fd:
            model = fd.build(lambda: Seq2SeqModel(model_config()))
            stats = dry_run.train_step(fd, model.train(), objective, batches)
            assert stats.on_device.device == fd.device
            with fd.counting(answer=1) as events:
                means, extra = stats.reduce()
            assert events.n_syncs == 1 and events.n_copies == 1, events
            assert "loss" in means and set(means) <= {"loss", *objective.metric_names()}  # values: the answers
            assert set(extra) == {"tokens", "samples"}
            if fd.can_backward:
                assert model.embed_tokens.weight.grad is not None


def test_evaluation_agrees_on_a_batch_count_and_restores_rng(world):
    """pretrain.core.step.evaluate: every rank runs the smallest batch count over all ranks (a device all-reduce,
    read once per loader), metrics on the device, one read for the reduction; the checkpoint RNG state taken
    before and restored after evaluation (the fake world's TP tracker included) is restored exactly."""
    objective = objectives()["janus"]
    loaders = {"valid": lambda: [host_batch("janus", seed=s) for s in range(3)],
               "test": lambda: [host_batch("janus", seed=9)]}
    before = checkpoint.rng_state()
    batches = step.eval_batches(objective, loaders, n_batches=2)
    with FakeDevice(FORWARD) as fd:
        model = fd.build(lambda: Seq2SeqModel(model_config())).eval()
        with torch.no_grad(), fd.counting(answer=1) as events:
            means = step.evaluate(batches, objective.eval_metric_names(),
                                  forward=lambda batch: objective.eval_metrics(model, batch), to_device=fd.batch,
                                  device=fd.device)
    assert dict(events.syncs) and events.n_syncs == 2 + 1, events  # one count per loader, one reduction
    assert events.n_copies == 1 and set(means) == set(objective.eval_metric_names())
    torch.rand(5)  # evaluation draws from the default generator (dropout off here; a loader could)
    checkpoint.set_rng_state(before)
    after = checkpoint.rng_state()
    assert torch.equal(after["torch"], before["torch"]) and "cuda" not in after  # this CPU build has no CUDA RNG
    assert before["tp_tracker"].keys() == after["tp_tracker"].keys()
    assert all(torch.equal(after["tp_tracker"][k], v) for k, v in before["tp_tracker"].items())


# --- decoding ---------------------------------------------------------------------------------------------

# (mode, options, answer to host reads, reads allowed besides one per pass): AR loops run to max_len when every
# stop flag reads False (answer 0) and read the outputs once (beam: ids and scores); a NAR pass reads its slot
# count once (answer 3: three slots) and its outputs twice (ids, scores) plus its figures once.
DECODING = [("ar_greedy", {}, 0, 1), ("ar_beam", {"beam_size": 3}, 0, 2), ("semi_nar", {"block_size": 2}, 0, 1),
            ("nar", {"length_beam": 2}, 3, 4), ("mask_predict", {"iterations": 3}, 3, 4),
            ("early_exit", {"exit_entropy": 1.0}, 3, 4), ("early_exit", {"exit_layer": 1}, 3, 4)]


@pytest.mark.parametrize("mode,extra,answer,fixed", DECODING,
                         ids=[d[0] + "".join(f"-{k}{v}" for k, v in d[1].items()) for d in DECODING])
def test_decoding_reads_one_flag_per_step(world, mode, extra, answer, fixed):
    """Every decoding mode on the device: no host->device copy (the batch entered on the device), at most one
    host read per decoder pass (early exit: per layer) plus a fixed few to size NAR slots and read results."""
    options = DecodeOptions(max_len=3, no_repeat_ngram_size=2, **extra)
    with FakeDevice(FORWARD) as fd:
        model = fd.build(lambda: Seq2SeqModel(model_config()))
        src = fd.batch({"src": host_batch()["src_tokens"]})["src"]
        with fd.counting(answer=answer) as events:
            result = decode(mode, model, src, options)
    passes = result.figures["decoder_passes"] * (model.cfg.n_decoder_layers if mode == "early_exit" else 1)
    assert len(result.tokens) == B and events.n_copies == 0, events
    assert events.n_syncs <= passes + fixed, (passes, events)
    if mode in ("ar_greedy", "ar_beam"):
        assert result.figures["decoder_passes"] == options.max_len + 1  # every stop flag read False


def test_finetune_decoding_builds_each_batch_on_the_model_device(world):
    """finetune.decoding.decode_ids (validation generation, `finetune generate`): each batch is built on the
    host and copied to the model's device once; nothing else crosses."""
    from finetune.decoding import decode_ids

    ids = [[7, 8, 9, SPECIAL.eos], [10, SPECIAL.eos], [11, 12, SPECIAL.eos]]
    with FakeDevice(FORWARD) as fd:
        model = fd.build(lambda: Seq2SeqModel(model_config()))
        with fd.counting(answer=0) as events:
            outputs, figures = decode_ids(model, ids, "ar_greedy", DecodeOptions(max_len=3), batch_size=2)
    assert len(outputs) == 3 and figures["examples"] == 3.0
    assert events.n_copies == 2, events  # two batches
