"""Finetuning with real processes: `python -m finetune` under torchrun (2 processes, gloo, DeepSpeed, megatron-core)
on the Gigaword test shards (tests/finetune_helpers.py), tiny model, a few steps, fp32, dropout 0.

  (a) JANUS at TP=2 x DP=1 gives the per-step losses (and every JANUS term) of TP=1 in one process; the TP=2 run's
      final_model.pt (TP shards merged) decodes in `generate`, which runs in one process at TP=1, and gives the
      TP=1 run's predictions; the beam search of the end-of-training evaluation (valid_generation) scores the
      same at TP=2 as at TP=1. Label smoothing is on (0.1, the configs' value): it is reduced over the full
      vocabulary, not per TP shard.
  (b, c) `bang_mixed` (nar_ratio 0.5) at DP=2 with ZeRO-3 finishes (both ranks take the same AR / NAR path in
      every step, else ZeRO-3's module-by-module gathers would hang), takes both paths, and gives the per-step
      losses of one process training the same global batch as two accumulation micro-batches: its AR steps are
      the `ar` objective's equivalence and its NAR steps the `nar` objective's (one pair of runs instead of two
      keeps the file near two minutes); both micro-batches of a step take the step's one path (bang_mixed draws
      once per optimizer step). The end-of-training beam search under ZeRO-3 (valid_generation decodes a plain
      copy of the gathered weights) scores the same at DP=2 as in the one process.

Per-step losses are read from <output_dir>/metrics.jsonl, which the engine writes on rank 0 whatever MLflow does.

The single-process reference for (b) and (c) is this file run as a script (see `single_process_main`): it is
`python -m finetune` with train.grad_accum=2 and one change, the training loader, which yields data-parallel
rank 0's and rank 1's batches of the same step in turn, so one process sees exactly the global batch the two ranks
see, as two micro-batches. The model weights start from one saved random initialisation (the init_weights
fixture), identical for every run.

Tolerances: measured on the shared 2-core CPU machine, the largest difference over all steps and loss terms was
1.9e-6 (TP, losses ~15) and 0 (DP, losses ~7: here the same sums in the same order). The 1e-4 bounds leave room
for float summation order on other hardware: row-parallel partial sums (TP), ZeRO-3's reduce-scatter against
local accumulation (DP). A real fault shows far above them: before the length loss was weighted per target token,
DP=2 and one process differed by up to 8e-4 in nar/loss; megatron-core's own label smoothing (per TP vocabulary
shard) moved the very first JANUS loss by 1e-3 between TP=2 and TP=1.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # finetune_helpers, conftest when run as a script
from finetune_helpers import (ENV, GIGAWORD, REPO_ROOT, as_list_override, build_test_data,  # noqa: E402
                              train_losses)

STEPS = 6
LOSS_TOL_TP = 1e-4  # absolute, on JANUS losses of ~14 (relative 1e-5)
LOSS_TOL_DP = 1e-4  # absolute, on losses of ~7
DECODE_EXAMPLES = 24
VALID_GENERATION = 8  # validation examples decoded by the engine's final evaluation (TP=2 / ZeRO-3 in training)


@pytest.fixture(scope="module")
def data(shared_data) -> list[str]:
    return build_test_data(shared_data)


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory) -> Path:
    """One random initialisation of the tiny preset (vocab 1024, the test tokenizer's padded size), saved the way
    the engine exports weights; every run here starts from it."""
    import dataclasses

    import torch

    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel

    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    path = tmp_path_factory.mktemp("finetune-dist") / "init.pt"
    torch.save({"model": Seq2SeqModel(cfg).state_dict(), "config": dataclasses.asdict(cfg), "step": 0}, path)
    return path


def finetune_overrides(data: list[str], out: Path, objective: str, extra: list[str]) -> list[str]:
    return [as_list_override("data.overrides", data), f"objective.name={objective}", "task.epochs=0",
            f"train.steps={STEPS}", "train.log_every=1", "train.progress_bar=false", "optim.lr=1e-3",
            "schedule.decay=constant", "schedule.warmup_steps=2", "data.batch_size=8", "data.max_source_len=32",
            "eval.every_steps=0", "eval.batches=0", f"valid_generation.samples={VALID_GENERATION}",
            "decode.max_len=24", "checkpoint.save_at_end=false",
            "deepspeed.precision=fp32", "tracking.mlflow=false", f"output_dir={out}", *extra]


def torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    from conftest import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def run_together(commands: dict[str, list[str]], logs: Path, timeout: int = 400) -> None:
    """Start the commands at once (a torchrun job beside a one-process run: their start-up overlaps) and wait."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {name: subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=open(logs / f"{name}.log", "w"),
                                    stderr=subprocess.STDOUT) for name, cmd in commands.items()}
    for name, proc in procs.items():
        code = proc.wait(timeout=timeout)
        assert code == 0, f"{name}: {' '.join(map(str, proc.args[:6]))} ... failed ({code}):\n" \
                          f"{(logs / f'{name}.log').read_text()[-6000:]}"


def finetune_cmd(init: Path, overrides: list[str]) -> list[str]:
    return ["--config", GIGAWORD, "--init", str(init), *overrides]


def final_generation_scores(output_dir: Path) -> dict[str, float]:
    """The ROUGE figures of the run's end-of-training validation decoding (metrics.jsonl, kind eval)."""
    evals = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evals if e.get("kind") == "eval"][-1]
    scores = {k: v for k, v in last.items() if k.startswith("gen/rouge") or k == "gen/task_score"}
    assert len(scores) == 4, last
    return scores


def assert_same_losses(a: dict[int, dict], b: dict[int, dict], keys: set[str], tol: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    for step in a:
        assert {k for k in a[step] if k in keys} == {k for k in b[step] if k in keys}, (step, a[step], b[step])
        for key in keys & set(a[step]):
            assert abs(a[step][key] - b[step][key]) <= tol, (step, key, a[step][key], b[step][key])


# --- (a) JANUS: TP=2 x DP=1 against TP=1 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def janus_runs(data, init_weights, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("janus-tp")
    outs = {"tp1": root / "tp1", "tp2": root / "tp2"}
    tp1 = finetune_cmd(init_weights, finetune_overrides(data, outs["tp1"], "janus", []))
    tp2 = finetune_cmd(init_weights, finetune_overrides(data, outs["tp2"], "janus", ["parallel.tensor_parallel=2"]))
    run_together({"tp1": [sys.executable, "-m", "finetune", *tp1], "tp2": torchrun_cmd(["-m", "finetune", *tp2])},
                 root / "logs")
    return outs


def test_janus_tp2_matches_tp1(janus_runs):
    tp1, tp2 = train_losses(janus_runs["tp1"]), train_losses(janus_runs["tp2"])
    keys = {"loss", "janus/loss", "janus/ar", "janus/nar_content", "janus/nar_query", "janus/length",
            "janus/kl_ar_content", "janus/kl_ar_query", "janus/kl_content_query"}
    assert keys <= set(tp1[1]), tp1[1]
    assert_same_losses(tp1, tp2, keys, LOSS_TOL_TP)
    assert tp1[STEPS]["loss"] < tp1[1]["loss"] - 0.1  # it trains (a test of equal numbers that also moves)
    assert tp2[STEPS]["samples_seen"] == STEPS * 8  # DP=1: TP peers read the same batch, counted once
    # Beam search inside training (the engine's evaluation hook) at TP=2 scores as at TP=1.
    assert final_generation_scores(janus_runs["tp2"]) == pytest.approx(final_generation_scores(janus_runs["tp1"]),
                                                                        abs=1e-6)


def test_tp2_final_model_decodes_like_tp1(janus_runs, data, tmp_path):
    """final_model.pt of the TP=2 run is one full state dict (vocab-parallel embedding and column/row-parallel
    shards merged) that `generate` loads at TP=1; its weights are the TP=1 run's (to float tolerance) and it
    decodes the same predictions, deterministically."""
    import torch

    from finetune.generate import run_generate

    full = {name: torch.load(janus_runs[name] / "final_model.pt", weights_only=True) for name in ("tp1", "tp2")}
    assert full["tp2"]["model"].keys() == full["tp1"]["model"].keys()
    assert full["tp2"]["model"]["embed_tokens.weight"].shape == (1024, 64)  # whole vocabulary, not a shard
    tensors = {k: v for k, v in full["tp1"]["model"].items() if isinstance(v, torch.Tensor)}  # not _extra_state
    assert len(tensors) > 20
    for key, value in tensors.items():
        other = full["tp2"]["model"][key]
        assert other.shape == value.shape, key
        assert torch.allclose(other, value, rtol=0, atol=1e-5), (key, (other - value).abs().max().item())

    def predictions(name: str, mode: str, label: str) -> list[str]:
        folder = run_generate(str(janus_runs[name]), overrides=[as_list_override("data.overrides", data),
                                                                "decode.max_len=24"],
                              mode=mode, split="valid", out_dir=str(tmp_path / f"{name}-{mode}-{label}"),
                              limit=DECODE_EXAMPLES)
        info = json.loads((folder / "generation.json").read_text())
        assert info["examples"] == DECODE_EXAMPLES and info["figures"]["ms_per_sample"] > 0
        return (folder / "gigaword.easy.valid").read_text().splitlines()

    for mode in ("ar_greedy", "nar"):
        from_tp2 = predictions("tp2", mode, "first")
        assert len(from_tp2) == DECODE_EXAMPLES and any(line.strip() for line in from_tp2)
        assert predictions("tp2", mode, "again") == from_tp2, f"{mode}: decoding is not deterministic"
        assert predictions("tp1", mode, "first") == from_tp2, f"{mode}: TP=2 weights decode differently from TP=1"


# --- (b), (c) ZeRO-3 at DP=2 against one process on the same global batch --------------------------------------

def dp2_and_single(data, init: Path, root: Path, objective: str, extra: list[str]) -> tuple[Path, Path]:
    zero3 = "deepspeed.config=configs/deepspeed/zero3.json"
    dp2 = finetune_cmd(init, finetune_overrides(data, root / "dp2", objective, [zero3, *extra]))
    single = finetune_cmd(init, finetune_overrides(data, root / "single", objective,
                                                   [zero3, *extra, "train.grad_accum=2"]))
    run_together({"dp2": torchrun_cmd(["-m", "finetune", *dp2]), "single": [sys.executable, __file__, *single]},
                 root / "logs")
    return root / "dp2", root / "single"


def test_zero3_dp2_matches_single_process_bang_mixed(data, init_weights, tmp_path):
    """(b) and (c) in one pair of runs: bang_mixed trains AR steps and NAR steps, so the AR steps are the `ar`
    objective's ZeRO-3 equivalence and the NAR steps the `nar` objective's (length loss included). The one
    process accumulates two micro-batches per step: both take the step's path, as the two ranks do."""
    dp2_dir, single_dir = dp2_and_single(data, init_weights, tmp_path, "bang_mixed",
                                         ["objective.bang_mixed.nar_ratio=0.5"])
    dp2, single = train_losses(dp2_dir), train_losses(single_dir)
    paths = ["nar" if "nar/loss" in dp2[s] else "ar" for s in sorted(dp2)]
    assert set(paths) == {"ar", "nar"}, paths  # both paths trained within the run (seeded draw)
    for record in (*dp2.values(), *single.values()):
        # One path per step: the other path's metrics were reported by no rank and by no micro-batch.
        assert ("ar/loss" in record) != ("nar/loss" in record), record
    assert paths == ["nar" if "nar/loss" in single[s] else "ar" for s in sorted(single)]
    assert_same_losses(dp2, single, {"loss", "ar/loss", "nar/loss", "nar/token_loss", "nar/length_loss"},
                       LOSS_TOL_DP)
    assert dp2[STEPS]["samples_seen"] == single[STEPS]["samples_seen"] == STEPS * 2 * 8
    ar_losses = [dp2[s]["ar/loss"] for s in sorted(dp2) if "ar/loss" in dp2[s]]
    assert ar_losses[-1] < ar_losses[0] - 0.05, ar_losses  # it trains
    # Beam search at the end of training under ZeRO-3, in two processes and in one, on the same weights.
    dp2_scores = final_generation_scores(dp2_dir)
    assert dp2_scores == pytest.approx(final_generation_scores(single_dir), abs=1e-6)
    assert dp2_scores["gen/rouge1"] > 0  # it decoded words that overlap the references


def bang_mixed_paths(objective, model, steps: int, grad_accum: int) -> list[list[str]]:
    """The engine's protocol, in process: start_step, then grad_accum losses; the path each micro-batch took."""
    import torch
    from test_finetune_objectives import tiny_batch

    paths = []
    for step in range(1, steps + 1):
        objective.start_step(step)
        with torch.no_grad():
            metrics = [objective.loss(model, tiny_batch(seed=step * 10 + i))[1] for i in range(grad_accum)]
        paths.append(["nar" if "nar/loss" in m else "ar" for m in metrics])
    return paths


def test_bang_mixed_draws_once_per_step_and_resumes_exactly():
    """(c) in one process, fast: with grad_accum=2 both micro-batches of every step take the same path; the
    generator advances one draw per step, so the paths are those of DP ranks taking one micro-batch per step;
    an objective loaded from the state_dict saved after step 3 continues the sequence exactly."""
    import torch

    import finetune.objectives  # noqa: F401  (registers bang_mixed)
    from model import parallel
    from model.config import ModelConfig
    from model.seq2seq import Seq2SeqModel
    from pretrain.core import build

    parallel.ensure_initialized()
    torch.manual_seed(0)
    model = Seq2SeqModel(ModelConfig.preset("tiny"))
    new = lambda: build("bang_mixed", nar_ratio=0.5, seed=3)  # noqa: E731
    accumulated = bang_mixed_paths(new(), model, 8, grad_accum=2)
    assert all(first == second for first, second in accumulated), accumulated
    assert {first for first, _ in accumulated} == {"ar", "nar"}, accumulated
    one_per_step = bang_mixed_paths(new(), model, 8, grad_accum=1)
    assert [p[0] for p in one_per_step] == [p[0] for p in accumulated]
    interrupted = new()
    bang_mixed_paths(interrupted, model, 3, grad_accum=2)
    resumed = new()
    resumed.load_state_dict({k: v.clone() for k, v in interrupted.state_dict().items()})
    assert bang_mixed_paths(resumed, model, 5, grad_accum=2) == accumulated[3:]


# --- the single-process reference (run as a script) --------------------------------------------------------------

class InterleavedRanks:
    """The training loaders of data-parallel ranks 0 and 1 read in step, each step's two batches yielded in turn:
    with grad_accum=2 one process sees the global batch of two ranks (same examples, same order)."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders) * min(len(loader) for loader in self.loaders)

    def __iter__(self):
        for parts in zip(*self.loaders):
            yield from parts

    def state_dict(self):
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, state):
        for loader, s in zip(self.loaders, state):
            loader.load_state_dict(s)


def single_process_main(argv: list[str]) -> int:
    """`python -m finetune argv` in one process whose training loader yields DP=2's global batches, rank 0's
    batch then rank 1's (run with train.grad_accum=2)."""
    import finetune.data
    from finetune.__main__ import main

    task_loader = finetune.data.task_loader

    def global_batches(shard_dir, section, *, dp_rank, dp_size, seed, max_source_len, shuffle=True):
        if not shuffle:  # held-out loaders: as they are
            return task_loader(shard_dir, section, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                               max_source_len=max_source_len, shuffle=shuffle)
        assert dp_size == 1, "the reference runs in one process"
        return InterleavedRanks([task_loader(shard_dir, section, dp_rank=r, dp_size=2, seed=seed,
                                              max_source_len=max_source_len) for r in (0, 1)])

    finetune.data.task_loader = global_batches  # finetune.run reads it at call time
    return main(argv)


if __name__ == "__main__":
    sys.exit(single_process_main(sys.argv[1:]))
