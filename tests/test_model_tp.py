"""Tensor parallelism: TP=2 (2 processes, gloo, real megatron-core layers) equals TP=1 to 1e-5 in fp32 for the
logits, the vocab-parallel cross entropy (with and without label smoothing), the length head and the gradient of
every parameter, in every decoder mode (methods.md §7.2). The TP=1 reference runs here, in the pytest process;
tests/tp_worker.py holds the cases."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_worker
from conftest import REPO_ROOT, free_port
from model import parallel, sharding

TOL = 1e-5  # max abs difference, fp32, dropout 0


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """(reference results, reference states, [rank 0 output, rank 1 output]) from one torchrun launch."""
    parallel.ensure_initialized()
    assert parallel.tp_size() == 1
    inputs = tp_worker.make_inputs()
    models, states = {}, {}
    for key in tp_worker.MODEL_CONFIGS:
        torch.manual_seed(tp_worker.SEED)
        models[key] = tp_worker.build_model(key)
        states[key] = sharding.full_state_dict(models[key])
    reference = tp_worker.run_all(models, inputs)

    tmp = tmp_path_factory.mktemp("tp")
    ref_path = tmp / "reference.pt"
    torch.save({"states": states, "inputs": inputs}, ref_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(Path(tp_worker.__file__)), str(ref_path), str(tmp)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    return reference, states, ranks


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", list(tp_worker.CASES))
def test_tp2_equals_tp1(tp_results, case):
    reference, _, ranks = tp_results
    ref = reference[case]
    assert float(ref["logits"].abs().max()) > 1e-2  # not a degenerate (all-zero) forward
    for out in ranks:
        got = out["results"][case]
        rank = out["rank"]
        for what in ("logits", "token_loss", "length_logits"):
            d = max_diff(got[what], ref[what])
            assert d <= TOL, f"{case} rank {rank}: {what} differs by {d:.3g}"
        assert got["grads"].keys() == ref["grads"].keys()
        n_checked = 0
        for name, g_ref in ref["grads"].items():
            g = got["grads"][name]
            assert (g is None) == (g_ref is None), f"{case} rank {rank}: {name} has a gradient on one side only"
            if g_ref is None:
                continue
            d = max_diff(g, g_ref)
            assert d <= TOL, f"{case} rank {rank}: grad of {name} differs by {d:.3g} (max |g| {g_ref.abs().max():.3g})"
            n_checked += 1
        # Every parameter but the ones a mode cannot reach gets a gradient.
        assert n_checked >= len(ref["grads"]) - 1, f"{case}: only {n_checked} gradients"


@pytest.mark.parametrize("case", list(tp_worker.OBJECTIVE_CASES))
def test_tp2_objective_losses_equal_tp1(tp_results, case):
    """BANG and JANUS losses, metrics and gradients with the vocabulary-parallel head on gathered rows (JANUS: a
    vocabulary-parallel log-softmax per view, its smoothed cross entropy and the symmetric KL terms)."""
    reference, _, ranks = tp_results
    ref = reference[case]
    assert float(ref["loss"]) > 1.0
    for out in ranks:
        got, rank = out["results"][case], out["rank"]
        assert max_diff(got["loss"], ref["loss"]) <= TOL, f"{case} rank {rank}: loss"
        assert got["metrics"].keys() == ref["metrics"].keys()
        for name, value in ref["metrics"].items():
            assert max_diff(got["metrics"][name], value) <= TOL, f"{case} rank {rank}: {name}"
        for name, g_ref in ref["grads"].items():
            g = got["grads"][name]
            assert (g is None) == (g_ref is None), f"{case} rank {rank}: {name} has a gradient on one side only"
            if g_ref is not None:
                d = max_diff(g, g_ref)
                assert d <= TOL, f"{case} rank {rank}: grad of {name} differs by {d:.3g}"
        assert sum(g is not None for g in ref["grads"].values()) >= len(ref["grads"]) - 2


def test_every_parameter_is_checked_in_some_mode(tp_results):
    reference, _, _ = tp_results
    for key in tp_worker.MODEL_CONFIGS:
        cases = [c for c, spec in tp_worker.CASES.items() if spec[0] == key]
        for name in reference[cases[0]]["grads"]:
            assert any(reference[c]["grads"][name] is not None and float(reference[c]["grads"][name].abs().max()) > 0
                       for c in cases), (key, name)


def test_sharded_state_round_trip(tp_results):
    """load_full_state_dict then full_state_dict at TP=2 gives back the TP=1 weights exactly."""
    _, states, ranks = tp_results
    for out in ranks:
        for key, full in states.items():
            assert out["states"][key].keys() == full.keys()
            for name, tensor in full.items():
                got = out["states"][key][name]
                if not isinstance(tensor, torch.Tensor):  # megatron's `_extra_state` entries (None)
                    assert got is None and tensor is None, (out["rank"], key, name)
                    continue
                assert torch.equal(got, tensor), (out["rank"], key, name)
            n_tensors = sum(isinstance(t, torch.Tensor) for t in full.values())
            assert n_tensors == len(dict(tp_worker.build_model(key).named_parameters()))


@pytest.mark.parametrize("eps", [0.0, tp_worker.LABEL_SMOOTHING, 0.3])
def test_token_loss_is_torch_cross_entropy_at_tp1(eps):
    """token_loss equals torch's cross_entropy(label_smoothing=eps) on the full logits, loss and gradients
    (of the hidden states and of the tied embedding), to 1e-5 in fp32."""
    parallel.ensure_initialized()
    torch.manual_seed(tp_worker.SEED)
    model = tp_worker.build_model("post")
    g = torch.Generator().manual_seed(11)
    hidden = (3 * torch.randn(3, 7, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 256, (3, 7), generator=g)
    weights = torch.rand(3, 7, generator=g)  # unequal per-token weights, as objectives mask and average
    got = model.token_loss(hidden, targets, eps)
    want = torch.nn.functional.cross_entropy(model.logits(hidden).transpose(1, 2), targets, reduction="none",
                                             label_smoothing=eps)
    assert max_diff(got, want) <= TOL
    assert float(want.max() - want.min()) > 0.1  # the tokens differ: not a constant loss
    params = [hidden, model.embed_tokens.weight]
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    for name, a, b in zip(("hidden", "embedding"), got_grads, want_grads):
        assert float(b.abs().max()) > 1e-2, name
        assert max_diff(a, b) <= TOL, f"eps {eps}: grad of {name} differs by {max_diff(a, b):.3g}"
