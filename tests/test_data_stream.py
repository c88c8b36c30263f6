"""The training-side reader: dp/worker splitting, equal batch counts, exact mid-epoch resume, epochs, token budgets,
the task loader, and tensor-parallel peers in real processes (torchrun, gloo)."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import free_port

import data_pipeline.stream as stream_mod
from data_pipeline.batching import BatchingSpec, plan_epoch
from data_pipeline.config import REPO_ROOT
from data_pipeline.errors import ConfigError
from data_pipeline.shards import load_manifest
from data_pipeline.stream import build_pretrain_loader, build_task_loader
from data_pipeline.tasks import build_task_shards, read_task_split
from data_pipeline.tokenizer import BOS_ID, EOS_ID, Tokenizer

TINY = REPO_ROOT / "configs" / "data" / "tiny.yaml"
MIX = {"bang": 0.5, "elmer": 0.5}


def make_loader(cfg, rank=0, world=1, workers=2, seed=7, weights=MIX, **loader_fields):
    cfg = copy.deepcopy(cfg)
    for k, v in loader_fields.items():
        setattr(cfg.loader, k, v)
    return build_pretrain_loader(cfg, dp_rank=rank, dp_world_size=world, seed=seed, objective_weights=weights,
                                 num_workers=workers)


def take(it, n):
    out = []
    for batch in it:
        out.append(batch)
        if len(out) == n:
            break
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), f"batch {i}: {k} differs"
            else:
                assert x[k] == y[k], f"batch {i}: {k} differs"


def test_every_sample_exactly_once_across_2_dp_ranks_x_2_workers(small):
    n = load_manifest(small.in_work("small_shards"))["num_samples"]
    seen, counts, objectives = [], [], []
    for rank in (0, 1):
        loader = make_loader(small, rank=rank, world=2, workers=2)
        batches = list(loader)
        counts.append(len(batches))
        objectives.append([b["objective"] for b in batches])
        assert len(batches) == len(loader)
        # DataLoader round robin over workers: global batch b is local batch b // 2 of stream b % 2
        streams = loader.plan(0)
        planned = [[ids for p in s.pieces for ids in p.batches] for s in streams]
        for b, batch in enumerate(batches):
            assert batch["sample_ids"].tolist() == planned[b % 2][b // 2].tolist()
        seen += [i for batch in batches for i in batch["sample_ids"].tolist()]
    assert counts[0] == counts[1]
    assert len(seen) == n and sorted(seen) == list(range(n))  # every sample exactly once, none skipped
    # ZeRO-3 needs every DP rank to run the same objective at each step.
    assert objectives[0] == objectives[1] and len(set(objectives[0])) == 2


def test_uneven_shards_give_equal_batch_counts_per_rank(small):
    manifest = load_manifest(small.in_work("small_shards"))
    sizes = [s["samples"] for s in manifest["shards"]]
    assert len(set(sizes)) > 1  # really uneven
    cost = np.load(small.in_work("small_shards") / "lengths.npy")[:, 0] + 1
    for world, workers, max_tokens in [(2, 2, 0), (3, 2, 1500), (4, 3, 0), (2, 0, 700), (5, 1, 2048), (8, 2, 0)]:
        spec = BatchingSpec(batch_size=16, max_tokens=max_tokens, shuffle=True, shuffle_buffer=256, bucket_window=64)
        plans = plan_epoch(manifest["shards"], cost, spec=spec, seed=3, epoch=1, dp_world_size=world,
                           num_workers=workers)
        counts = {s.num_batches for rank in plans for s in rank}
        assert len(counts) == 1, (world, workers, counts)
        ids = np.concatenate([b for rank in plans for s in rank for p in s.pieces for b in p.batches])
        assert len(ids) == manifest["num_samples"] and len(np.unique(ids)) == len(ids)
    # and the real streams of 3 ranks with a token budget
    lens = [len(list(make_loader(small, rank=r, world=3, workers=2, max_tokens=1500, batch_size=64))) for r in range(3)]
    assert lens[0] == lens[1] == lens[2]


@pytest.mark.parametrize("workers,k", [(2, 7), (2, 16), (0, 5)])
def test_resume_after_k_batches_equals_the_uninterrupted_stream(small, workers, k):
    full_loader = make_loader(small, rank=1, world=2, workers=workers)
    total = len(full_loader) + 4  # runs into the next epoch too
    uninterrupted = take(full_loader.infinite(), total)
    first = make_loader(small, rank=1, world=2, workers=workers)
    head = take(first, k)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_in_epoch"] == k
    resumed = make_loader(small, rank=1, world=2, workers=workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states survive a JSON round trip (checkpoints)
    tail = take(resumed.infinite(), total - k)
    assert_same_batches(head + tail, uninterrupted)  # sample ids, corruption, objective: all identical
    assert {b["objective"] for b in uninterrupted} == {"bang", "elmer"}


def test_resume_opens_only_the_current_piece(small, monkeypatch):
    loader = make_loader(small, rank=0, world=1, workers=0)
    pieces = loader.plan(0)[0].pieces
    assert len(pieces) >= 3
    k = len(pieces[0].batches) + len(pieces[1].batches) + 2  # two batches into the third piece
    opened = []
    real = stream_mod.read_piece

    def spy(path, first_id, start, count, fields, dtype):
        opened.append((path.name, start, count))
        return real(path, first_id, start, count, fields, dtype)

    monkeypatch.setattr(stream_mod, "read_piece", spy)
    loader.load_state_dict({"epoch": 0, "batches_in_epoch": k})
    batch = next(iter(loader))
    third = pieces[2]
    assert opened == [(loader.shards[third.shard]["name"], third.start, third.count)]
    assert batch["sample_ids"].tolist() == third.batches[2].tolist()


def test_epochs_advance_reshuffle_and_state_mismatches_are_errors(small):
    loader = make_loader(small, workers=0, weights="bang")
    e0 = [b["sample_ids"] for b in loader]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_in_epoch"] == 0
    e1 = [b["sample_ids"] for b in loader]
    assert loader.epoch == 2
    assert sorted(torch.cat(e0).tolist()) == sorted(torch.cat(e1).tolist())
    assert torch.cat(e0).tolist() != torch.cat(e1).tolist()  # a new order every epoch
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))["sample_ids"], e0[0])
    other = make_loader(small, workers=2, weights="bang")
    with pytest.raises(ConfigError, match="num_workers"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(ConfigError, match=r"batching.batch_size: \d+ -> 8"):  # named, not a plan hash
        make_loader(small, workers=0, weights="bang", batch_size=8).load_state_dict(loader.state_dict())
    with pytest.raises(ConfigError, match=r"weights: \{'bang': 1.0\} -> \{'bang': 1.0, 'elmer': 1.0\}"):
        make_loader(small, workers=0, weights={"bang": 1, "elmer": 1}).load_state_dict(loader.state_dict())
    # every dp rank holds the same state at the same step, so any rank's state resumes every rank
    r0, r1 = make_loader(small, rank=0, world=2, workers=0), make_loader(small, rank=1, world=2, workers=0)
    take(r0, 3), take(r1, 3)
    s0, s1 = r0.state_dict(), r1.state_dict()
    assert {k: v for k, v in s0.items() if k != "dp_rank"} == {k: v for k, v in s1.items() if k != "dp_rank"}


def test_token_budget_and_length_bucketing(small):
    # cost = length + 1 (EOS). Most samples are 120-128 tokens: 8 of them fit 1016 only when none is longer than 126,
    # so without sorting most batches hold 7, with bucketing the long ones share batches (~393 vs ~420 batches).
    budget = 1016
    loader = make_loader(small, workers=0, max_tokens=budget, batch_size=64, weights="bang")
    lengths = np.load(small.in_work("small_shards") / "lengths.npy")[:, 0]
    for batch in take(loader, 40):
        ids = batch["sample_ids"].numpy()
        assert len(ids) == 1 or len(ids) * (lengths[ids].max() + 1) <= budget
        assert batch["src_tokens"].shape == (len(ids), lengths[ids].max())

    def padding(bucket_window):
        plan = make_loader(small, workers=0, max_tokens=budget, batch_size=64, bucket_window=bucket_window).plan(0)
        batches = [b for s in plan for p in s.pieces for b in p.batches]
        padded = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - lengths.sum() / padded, len(batches)

    (bucketed, n_bucketed), (plain, n_plain) = padding(64), padding(1)
    assert bucketed < plain / 2 and n_bucketed < n_plain  # bucketing halves the padding and needs fewer batches


def test_task_loader_batches(tiny, shared_data, tmp_path):
    tok = Tokenizer.load(tiny.in_work("tokenizer"))
    out = tmp_path / "gigaword-valid"
    manifest = build_task_shards(shared_data / "glge", "gigaword", "valid", out, tok, max_source_len=64,
                                 max_target_len=32, samples_per_shard=300)
    sources, targets = read_task_split(shared_data / "glge", "gigaword", "valid")
    assert manifest["num_samples"] == len(sources) == 1000 and len(manifest["shards"]) == 4
    seen = []
    for rank in (0, 1):
        loader = build_task_loader(out, dp_rank=rank, dp_world_size=2, seed=1, num_workers=2, max_tokens=800,
                                   max_source_len=24)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            B, T = b["tgt_tokens"].shape
            assert b["src_tokens"].shape[1] <= 24
            assert torch.equal(b["prev_tokens"][:, 0], torch.full((B,), BOS_ID))
            lens = (b["tgt_tokens"] != 0).sum(1)
            for i in range(B):
                n = int(lens[i])
                assert b["tgt_tokens"][i, n - 1] == EOS_ID
                assert torch.equal(b["prev_tokens"][i, 1:n], b["tgt_tokens"][i, : n - 1])
                assert b["tgt_positions"][i, :n].tolist() == list(range(1, n + 1)) and b["tgt_positions"][i, n:].sum() == 0
                sid = int(b["sample_ids"][i])
                assert b["tgt_tokens"][i, : n - 1].tolist() == tok.encode(targets[sid])[:32]
                assert b["src_tokens"][i][b["src_tokens"][i] != 0].tolist() == tok.encode(sources[sid])[:24]
            assert b["n_tokens"] == int(lens.sum())
            seen += b["sample_ids"].tolist()
    assert sorted(seen) == list(range(1000))


TP_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch, torch.distributed as dist
    from data_pipeline.config import load_config
    from data_pipeline.stream import build_pretrain_loader

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(sys.argv[2], sys.argv[3:])
    # (a) both processes are tensor-parallel peers inside data-parallel rank 1 of 2
    loader = build_pretrain_loader(cfg, dp_rank=1, dp_world_size=2, seed=11,
                                   objective_weights={"bang": 0.5, "elmer": 0.5}, num_workers=2)
    digests = []
    for batch in loader:
        h = hashlib.sha256()
        for k in sorted(batch):
            v = batch[k]
            h.update(k.encode() + (v.numpy().tobytes() if torch.is_tensor(v) else str(v).encode()))
        digests.append(h.hexdigest())
    tp = [None, None]
    dist.all_gather_object(tp, digests)
    # (b) each process is its own data-parallel rank
    loader = build_pretrain_loader(cfg, dp_rank=rank, dp_world_size=2, seed=11, objective_weights="elmer",
                                   num_workers=1)
    batches = list(loader)
    ids = [i for batch in batches for i in batch["sample_ids"].tolist()]
    dp = [None, None]
    dist.all_gather_object(dp, {"batches": len(batches), "planned": len(loader), "ids": ids})
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump({"tp": tp, "dp": dp, "env_rank": os.environ["RANK"]}, fh)
    dist.destroy_process_group()
''')


def test_tp_peers_get_identical_batches_in_real_processes(small, tmp_path):
    script = tmp_path / "tp_peers.py"
    script.write_text(TP_SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(out), str(TINY), f"data_root={small.data_root}", f"work_dir={small.work_dir}",
           "loader.shard_dir=small_shards"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["tp"][0]) > 50 and result["tp"][0] == result["tp"][1]  # global RANK 0 and 1: same data
    d0, d1 = result["dp"]
    assert d0["batches"] == d1["batches"] == d0["planned"] == d1["planned"]
    n = load_manifest(small.in_work("small_shards"))["num_samples"]
    assert not set(d0["ids"]) & set(d1["ids"]) and len(d0["ids"]) + len(d1["ids"]) == n
