"""Bad shards and manifests, one test per case. Policy: a shard that fails the manifest check at loader start stops
with a DataError naming it (on_corrupt_shard="error", the default) or is left out and counted ("skip"); a shard
that turns out unreadable while streaming always stops with a DataError naming it (a rank that silently yields
fewer batches would hang the others). Bad UTF-8, empty and overlong documents are covered in test_data_extract.py,
bad task files in test_data_tasks.py."""
import json
import shutil
import tarfile

import numpy as np
import pytest

from data_pipeline.config import REPO_ROOT, LoaderConfig, load_config
from data_pipeline.errors import DataError
from data_pipeline.shards import load_manifest
from data_pipeline.stream import build_pretrain_loader
from data_pipeline.tokenizer import train_tokenizer

TINY = REPO_ROOT / "configs" / "data" / "tiny.yaml"


@pytest.fixture
def shards(small, tmp_path):
    """A private copy of the small shard folder to damage."""
    return shutil.copytree(small.in_work("small_shards"), tmp_path / "shards")


def loader(shard_dir, workers=0, rank=0, world=1, **fields):
    return build_pretrain_loader(LoaderConfig(shard_dir=str(shard_dir), **fields), dp_rank=rank,
                                 dp_world_size=world, seed=1, objective_weights="bang", num_workers=workers)


def all_ids(shard_dir, **kw):
    return sorted(i for r in (0, 1) for b in loader(shard_dir, rank=r, world=2, **kw) for i in b["sample_ids"].tolist())


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


def test_corrupt_bytes_in_a_same_size_shard(shards):
    """Damage that keeps the size: verify="sha256" catches it at start; verify="size" stops at read time."""
    path = shards / "shard-000002.tar"
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[100].offset  # a member header in the middle
    data = bytearray(path.read_bytes())
    data[offset: offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000002.tar: sha256 differs"):
        loader(shards, verify="sha256")
    l = loader(shards, workers=2)  # the size check passes
    with pytest.raises(DataError, match="shard-000002.tar"):
        for _ in l:  # raised inside a DataLoader worker, re-raised here with the shard's name
            pass


def test_shard_that_does_not_match_the_manifest(shards):
    a, b = shards / "shard-000000.tar", shards / "shard-000001.tar"
    assert a.stat().st_size == b.stat().st_size
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())  # same size, other samples: e.g. a half-finished re-run
    b.write_bytes(a_bytes)
    with pytest.raises(DataError, match=r"shard-00000[01].tar: sample 0 has key .* does not match manifest.json"):
        for _ in loader(shards):
            pass


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
