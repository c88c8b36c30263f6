"""Bad shards and manifests: the data half of the fault table in docs/reliability.md, one test per case.

Policy (data_pipeline/stream.py): a shard that fails the manifest check at loader start, at its first opening in
a run (sha256) or a sample that fails its check as it is read stops with a DataError naming the shard (and the
sample id) with on_corrupt_shard="error", the default; with "skip" the shard is left out of the plan, or the sample
is dropped from its batch, and counted (`counters()`), keeping every data-parallel rank's batch count. Nothing
corrupt reaches a batch. Each fault is made in real webdataset shards written by the pipeline (the `small`
fixture), by the test. Bad UTF-8, binary input files, empty and overlong documents are covered in
test_data_extract.py, bad task files in test_data_tasks.py."""
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from conftest import free_port

from data_pipeline.config import REPO_ROOT, LoaderConfig, load_config
from data_pipeline.errors import DataError
from data_pipeline.shards import load_manifest
from data_pipeline.stream import build_pretrain_loader
from data_pipeline.tokenizer import train_tokenizer

TINY = REPO_ROOT / "configs" / "data" / "tiny.yaml"
VOCAB = 4000  # configs/data/tiny.yaml tokenizer.vocab_size


@pytest.fixture
def shards(small, tmp_path):
    """A private copy of the small shard folder to damage."""
    return shutil.copytree(small.in_work("small_shards"), tmp_path / "shards")


def loader(shard_dir, workers=0, rank=0, world=1, **fields):
    return build_pretrain_loader(LoaderConfig(shard_dir=str(shard_dir), **fields), dp_rank=rank,
                                 dp_world_size=world, seed=1, objective_weights="bang", num_workers=workers)


def all_ids(shard_dir, **kw):
    return sorted(i for r in (0, 1) for b in loader(shard_dir, rank=r, world=2, **kw) for i in b["sample_ids"].tolist())


def shard_ids(shard_dir, name):
    entry = next(s for s in load_manifest(shard_dir)["shards"] if s["name"] == name)
    return set(range(entry["first_id"], entry["first_id"] + entry["samples"]))


# ---- the faults, made in real shards ---------------------------------------------------------------------------
def damage_payloads(shard_dir, name, members, seed=0):
    """Random bytes over the start of the token data of the given tar members (one member = one sample): the file
    size, the tar headers and the manifest stay as they were. Returns the damaged sample ids."""
    path = shard_dir / name
    with tarfile.open(path) as tf:
        infos = tf.getmembers()
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for i in members:
        n = min(infos[i].size, 64)
        data[infos[i].offset_data: infos[i].offset_data + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    first = min(shard_ids(shard_dir, name))
    return [first + i for i in members]


def damage_header(shard_dir, name, member):
    """Garbage over one member's tar header (size unchanged)."""
    path = shard_dir / name
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member].offset
    data = bytearray(path.read_bytes())
    data[offset: offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))


def rewrite_manifest(shard_dir, change):
    path = shard_dir / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def empty_member(shard_dir, name, member):
    """Rewrite a shard with one member's data emptied and the manifest's size and sha256 updated to match, as a
    faulty writer would leave it: only the per-sample length check can see it. Returns the sample id."""
    path = shard_dir / name
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for i, info in enumerate(src.getmembers()):
            data = b"" if i == member else src.extractfile(info).read()
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())

    def match(m):
        entry = next(s for s in m["shards"] if s["name"] == name)
        entry["bytes"], entry["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()

    rewrite_manifest(shard_dir, match)
    return min(shard_ids(shard_dir, name)) + member


def batches_until_error(it):
    """The batches yielded before the DataError the iteration must end with, and that error."""
    got = []
    with pytest.raises(DataError) as err:
        for batch in it:
            got.append(batch)
    return got, str(err.value)


def assert_in_vocabulary(batches):
    for b in batches:
        for k in ("src_tokens", "tgt_tokens", "prev_tokens"):
            assert int(b[k].max()) < VOCAB


def test_truncated_shard_stops_with_an_error_naming_it(shards):
    path = shards / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"shard-000001.tar: size .*truncated"):
        loader(shards)


def test_truncated_shard_is_skipped_and_counted_when_configured(shards):
    path = shards / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:12345])
    l = loader(shards, on_corrupt_shard="skip")
    assert l.skipped_shards == ["shard-000001.tar"]
    m = load_manifest(shards)
    kept = [s for s in m["shards"] if s["name"] != "shard-000001.tar"]
    expected = sorted(i for s in kept for i in range(s["first_id"], s["first_id"] + s["samples"]))
    assert all_ids(shards, on_corrupt_shard="skip") == expected  # the rest exactly once, equal batches per rank


def test_payload_garbage_stops_when_the_shard_is_first_opened(shards):
    """Default (verify=sha256, on_corrupt_shard=error): hashed the first time the shard is opened, before any of
    its samples is yielded; the shards opened before it train normally."""
    damaged = damage_payloads(shards, "shard-000001.tar", [3, 400])
    l = loader(shards)  # construction checks sizes only: hashing waits for the first opening
    got, err = batches_until_error(l)
    assert "shard-000001.tar: sha256 differs from manifest.json" in err and "first opened in this run" in err
    bad_shard = shard_ids(shards, "shard-000001.tar")
    assert not {i for b in got for i in b["sample_ids"].tolist()} & bad_shard
    assert set(damaged) <= bad_shard


def test_payload_garbage_with_the_size_check_stops_naming_shard_and_sample(shards):
    """verify=size: the per-sample check stops at the damaged sample, naming shard and sample id."""
    (sid,) = damage_payloads(shards, "shard-000002.tar", [50])
    got, err = batches_until_error(loader(shards, workers=2, verify="size"))  # raised in a worker, re-raised here
    assert f"shard-000002.tar: sample {sid}: tok has token ids" in err and "outside [1, 4000)" in err
    assert sid not in {i for b in got for i in b["sample_ids"].tolist()}
    assert_in_vocabulary(got)


def test_payload_garbage_is_skipped_and_counted(shards):
    """verify=size + skip: exactly the damaged samples are dropped from their batches and counted; both data-parallel
    ranks still yield the same number of batches; every token in every batch is inside the vocabulary."""
    damaged = damage_payloads(shards, "shard-000000.tar", [7, 600]) + damage_payloads(shards, "shard-000002.tar", [10])
    n = load_manifest(shards)["num_samples"]
    kw = dict(verify="size", on_corrupt_shard="skip")
    loaders = [loader(shards, workers=2, rank=r, world=2, **kw) for r in (0, 1)]
    batches = [list(l) for l in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == len(loaders[1])
    seen = sorted(i for bs in batches for b in bs for i in b["sample_ids"].tolist())
    assert seen == sorted(set(range(n)) - set(damaged))
    assert sum(l.counters()["samples_skipped"] for l in loaders) == len(damaged)
    assert all(l.counters()["shards_skipped"] == 0 for l in loaders)
    assert_in_vocabulary(batches[0] + batches[1])


def test_a_corrupt_shard_is_left_out_at_start_when_skipping(shards):
    """Default verify=sha256 + skip: every shard is hashed at start so all ranks plan without the same shards."""
    damage_payloads(shards, "shard-000001.tar", [3])
    l = loader(shards, on_corrupt_shard="skip")
    assert l.skipped_shards == ["shard-000001.tar"]
    assert l.counters() == {"samples_skipped": 0, "shards_skipped": 1}
    expected = set(range(load_manifest(shards)["num_samples"])) - shard_ids(shards, "shard-000001.tar")
    assert all_ids(shards, on_corrupt_shard="skip") == sorted(expected)


def test_header_garbage(shards):
    """Damage to a tar header (size unchanged): the sha256 check stops at the shard's first opening; with
    verify=size reading stops naming the shard; with verify=size + skip the rest of the piece is unreadable, and a
    planned batch with no readable sample left stops with an error rather than leave a rank one batch short."""
    damage_header(shards, "shard-000002.tar", 100)
    _, err = batches_until_error(loader(shards))
    assert "shard-000002.tar: sha256 differs" in err
    _, err = batches_until_error(loader(shards, workers=2, verify="size"))
    assert "shard-000002.tar" in err
    got, err = batches_until_error(loader(shards, verify="size", on_corrupt_shard="skip"))
    assert "shard-000002.tar: all" in err and "samples of a planned batch are corrupt" in err
    assert_in_vocabulary(got)


def test_manifest_sha256_mismatch(shards):
    """An intact shard whose manifest entry no longer matches: refused at its first opening, or left out (skip)."""

    def wrong_sha(m):
        m["shards"][0]["sha256"] = "0" * 64

    rewrite_manifest(shards, wrong_sha)
    _, err = batches_until_error(loader(shards))
    assert "shard-000000.tar: sha256 differs from manifest.json" in err
    assert loader(shards, on_corrupt_shard="skip").skipped_shards == ["shard-000000.tar"]


def test_zero_length_member(shards):
    """A member emptied by a faulty writer, manifest size and checksum consistent with it: the length check
    against lengths.npy stops naming shard and sample, or (skip) drops and counts that one sample."""
    sid = empty_member(shards, "shard-000001.tar", 250)
    expected_len = int(np.load(shards / "lengths.npy")[sid, 0])
    _, err = batches_until_error(loader(shards))
    assert f"shard-000001.tar: sample {sid}: tok has 0 tokens, lengths.npy says {expected_len}" in err
    l = loader(shards, on_corrupt_shard="skip")
    seen = [i for b in l for i in b["sample_ids"].tolist()]
    assert sorted(seen) == sorted(set(range(load_manifest(shards)["num_samples"])) - {sid})
    assert l.counters()["samples_skipped"] == 1


@pytest.mark.parametrize("workers,k", [(2, 9), (0, 40)])
def test_skipping_keeps_exact_resume(shards, workers, k):
    """With skip, a resumed loader yields the same batches as an uninterrupted one, and the same count at the end:
    the replayed part of a piece is read again but neither yielded nor counted twice."""
    damaged = damage_payloads(shards, "shard-000000.tar", [1, 2, 3, 500]) + \
        damage_payloads(shards, "shard-000001.tar", [900])
    kw = dict(workers=workers, rank=1, world=2, verify="size", on_corrupt_shard="skip")
    full = loader(shards, **kw)
    uninterrupted = list(full)
    first = loader(shards, **kw)
    head = [b for _, b in zip(range(k), first)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(shards, **kw)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(uninterrupted) == len(full)
    for a, b in zip(head + tail, uninterrupted):
        assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)
    planned = {int(i) for stream in full.plan(0) for p in stream.pieces for b in p.batches for i in b}
    skipped_here = planned & set(damaged)
    assert resumed.counters()["samples_skipped"] == full.counters()["samples_skipped"] == len(skipped_here) > 0


def test_shard_that_does_not_match_the_manifest(shards):
    a, b = shards / "shard-000000.tar", shards / "shard-000001.tar"
    assert a.stat().st_size == b.stat().st_size
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())  # same size, other samples: e.g. a half-finished re-run
    b.write_bytes(a_bytes)
    _, err = batches_until_error(loader(shards))
    assert re.search(r"shard-00000[01].tar: sha256 differs from manifest.json", err)
    _, err = batches_until_error(loader(shards, verify="size"))  # the member keys give it away too
    assert re.search(r"shard-00000[01].tar: sample 0 has key .* does not match manifest.json", err)


def test_missing_shard_and_bad_manifest_files(shards):
    (shards / "shard-000002.tar").unlink()
    with pytest.raises(DataError, match=r"shard-000002.tar: missing"):
        loader(shards)
    lengths = np.load(shards / "lengths.npy")
    lengths[5] += 1
    np.save(shards / "lengths.npy", lengths)
    with pytest.raises(DataError, match=r"lengths.npy: sha256 differs"):
        loader(shards, on_corrupt_shard="skip")
    (shards / "manifest.json").write_text('{"format": "tandem-shards-v1", "shards": [')
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON"):
        loader(shards)
    (shards / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest.json: manifest not found"):
        loader(shards)


def test_tokenizer_checksum_mismatch(tiny, shards, tmp_path):
    other = load_config(TINY, [f"data_root={tiny.data_root}", f"work_dir={tmp_path}",
                               f"extract.out_dir={tiny.in_work('docs')}", "tokenizer.out_dir=other",
                               "tokenizer.model_type=bpe", "tokenizer.vocab_size=600",
                               "tokenizer.sample_chars=200000"])
    other_dir = train_tokenizer(other)
    with pytest.raises(DataError, match=r"tokenizer checksum mismatch: .*other/tokenizer.model .*manifest.json"):
        loader(shards, tokenizer=str(other_dir / "tokenizer.model"))
    shutil.copyfile(other_dir / "tokenizer.model", shards / "tokenizer.model")  # the copy beside the shards replaced
    with pytest.raises(DataError, match="tokenizer checksum mismatch"):
        loader(shards)


def test_manifest_of_the_wrong_kind(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["kind"] = "task"
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="holds 'task' shards, expected 'pretrain'"):
        loader(shards)


FAULT_SCRIPT = textwrap.dedent('''
    import datetime, hashlib, json, sys
    import torch, torch.distributed as dist
    from data_pipeline.config import LoaderConfig
    from data_pipeline.errors import DataError
    from data_pipeline.stream import build_pretrain_loader

    out, shard_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()

    def loader(dp_rank, world, **kw):
        return build_pretrain_loader(LoaderConfig(shard_dir=shard_dir, verify="size", **kw), dp_rank=dp_rank,
                                     dp_world_size=world, seed=5, objective_weights={"bang": 0.5, "elmer": 0.5},
                                     num_workers=2)

    def digest(batch):
        h = hashlib.sha256()
        for k in sorted(batch):
            v = batch[k]
            h.update(k.encode() + (v.numpy().tobytes() if torch.is_tensor(v) else str(v).encode()))
        return h.hexdigest()

    def gather(x):
        xs = [None, None]
        dist.all_gather_object(xs, x)
        return xs

    result = {}
    # (a) tensor-parallel peers: both processes read data-parallel rank 0 of 1
    l = loader(0, 1, on_corrupt_shard="skip")
    result["tp_skip"] = gather({"digests": [digest(b) for b in l], "counters": l.counters()})
    try:
        for _ in loader(0, 1):
            pass
        result["tp_error"] = gather(None)
    except DataError as err:
        result["tp_error"] = gather(str(err))
    # (b) each process is its own data-parallel rank
    l = loader(rank, 2, on_corrupt_shard="skip")
    batches = list(l)
    result["dp_skip"] = gather({"batches": len(batches), "planned": len(l), "counters": l.counters(),
                                "ids": [i for b in batches for i in b["sample_ids"].tolist()]})
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.barrier()
    # (c) data-parallel ranks stepping together as in training (a collective per batch), error policy
    steps = 0
    for batch in loader(rank, 2):
        dist.all_reduce(torch.ones(1))
        steps += 1
    print(f"rank {rank} finished {steps} steps", flush=True)
''')


def test_no_corruption_trains_at_tp2_or_dp2_in_real_processes(shards, tmp_path):
    """torchrun, 2 processes, gloo. Tensor-parallel peers (same dp rank) drop the same samples and yield identical
    batches, or both stop with the same error naming shard and sample; two data-parallel ranks with skip yield the
    same number of batches and their counts add up to the damage; with the error policy the job stops, naming the
    shard and sample, and no rank finishes its epoch."""
    damaged = damage_payloads(shards, "shard-000000.tar", [20, 700]) + damage_payloads(shards, "shard-000002.tar", [5])
    n = load_manifest(shards)["num_samples"]
    script = tmp_path / "faults.py"
    script.write_text(FAULT_SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), str(out), str(shards)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())

    tp0, tp1 = result["tp_skip"]
    assert len(tp0["digests"]) > 50 and tp0 == tp1
    assert tp0["counters"] == {"samples_skipped": len(damaged), "shards_skipped": 0}
    e0, e1 = result["tp_error"]
    assert e0 == e1 and re.search(rf"shard-00000[02].tar: sample ({'|'.join(map(str, damaged))}): tok has token", e0)

    d0, d1 = result["dp_skip"]
    assert d0["batches"] == d1["batches"] == d0["planned"] == d1["planned"]
    assert sorted(d0["ids"] + d1["ids"]) == sorted(set(range(n)) - set(damaged))
    assert d0["counters"]["samples_skipped"] + d1["counters"]["samples_skipped"] == len(damaged)
    assert min(d0["counters"]["samples_skipped"], d1["counters"]["samples_skipped"]) > 0  # damage on both ranks

    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "finished" not in proc.stdout
    assert re.search(rf"DataError: \S*shard-00000[02].tar: sample ({'|'.join(map(str, damaged))}): tok has token",
                     proc.stderr), proc.stderr[-3000:]
