"""`shard`: webdataset shards and manifest.json built from the tiny corpus; mixing; re-running; inspect."""
import collections
import hashlib
import json

import numpy as np
import pytest

from data_pipeline.__main__ import main
from data_pipeline.config import REPO_ROOT, load_config
from data_pipeline.errors import ConfigError
from data_pipeline.documents import doc_files, iter_all_docs
from data_pipeline.shards import LENGTHS, MANIFEST, read_piece, run_shard, shuffled, split_into_samples
from data_pipeline.stream import build_pretrain_loader
from data_pipeline.tokenizer import Tokenizer

TINY = REPO_ROOT / "configs" / "data" / "tiny.yaml"


def variant(tiny, *overrides):
    return load_config(TINY, [f"data_root={tiny.data_root}", f"work_dir={tiny.work_dir}", *overrides])


def all_samples(shard_dir):
    """{sample id: token bytes} of every sample in a shard folder, read back from the tars."""
    m = json.loads((shard_dir / MANIFEST).read_text())
    return {sid: x["tok"].astype(np.uint16).tobytes() for s in m["shards"]
            for sid, x in read_piece(shard_dir / s["name"], s["first_id"], 0, s["samples"], ["tok"], "uint16")}


@pytest.fixture(scope="module")
def expected_samples(tiny):
    """Every sample the tiny documents should give ({token bytes: source document}), recomputed independently of
    run_shard. A source document is a book or article before extract split it (ids `book:x#3` -> `book:x`)."""
    tok = Tokenizer.load(tiny.in_work("tokenizer"))
    owner, count = {}, collections.Counter()
    for d in iter_all_docs(doc_files(tiny.in_work("docs"))):
        for piece in split_into_samples(np.asarray(tok.encode(d["text"])), tiny.shard.seq_len):
            key = piece.astype(np.uint16).tobytes()
            owner.setdefault(key, d["id"].split("#")[0])
            count[key] += 1
    return owner, count


def docs_per_batch(tiny, shard_out, owner):
    """Distinct source documents in each full batch (16 samples) of the tiny loader's epoch-0 plan."""
    cfg = variant(tiny, f"loader.shard_dir={shard_out}")
    loader = build_pretrain_loader(cfg, dp_rank=0, dp_world_size=1, seed=0, objective_weights="bang", num_workers=0)
    doc_of = {sid: owner[b] for sid, b in all_samples(tiny.in_work(shard_out)).items()}
    return np.asarray([len({doc_of[int(i)] for i in b}) for p in loader.plan(0)[0].pieces for b in p.batches
                       if len(b) == cfg.loader.batch_size])


def test_manifest_matches_the_shards(tiny):
    shard_dir = tiny.in_work("shards")
    m = json.loads((shard_dir / MANIFEST).read_text())
    tok = Tokenizer.load(tiny.in_work("tokenizer"))
    assert m["kind"] == "pretrain" and m["fields"] == ["tok"] and m["token_dtype"] == "uint16"
    assert 3 <= len(m["shards"]) <= 10  # "a few shards"
    assert m["tokenizer"]["checksum"] == tok.checksum and m["tokenizer"]["padded_vocab_size"] == 4096
    assert Tokenizer.load(shard_dir / m["tokenizer"]["path"]).checksum == tok.checksum  # a copy beside the shards
    assert m["config"]["shard"]["seq_len"] == 128 and m["config"]["config_file"].endswith("tiny.yaml")
    for key in ("bad_utf8_sequences", "docs", "overlong_docs_split", "wiki_redirects_skipped", "markup_lines_dropped"):
        assert key in m["stats"]["extract"]
    assert m["stats"]["shard"]["docs_in"] == m["stats"]["extract"]["docs"]
    lengths = np.load(shard_dir / LENGTHS)
    assert len(lengths) == m["num_samples"] == sum(s["samples"] for s in m["shards"])
    assert int(lengths.sum()) == m["num_tokens"] == sum(s["tokens"] for s in m["shards"])
    assert lengths.max() <= 128 and lengths.min() >= tiny.shard.min_sample_tokens
    next_id = 0
    for s in m["shards"]:
        path = shard_dir / s["name"]
        assert path.stat().st_size == s["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        assert s["first_id"] == next_id
        next_id += s["samples"]
    # the last shard read in full: ids, lengths and token counts agree with the manifest
    last = m["shards"][-1]
    got = list(read_piece(shard_dir / last["name"], last["first_id"], 0, last["samples"], ["tok"], "uint16"))
    assert [i for i, _ in got] == list(range(last["first_id"], last["first_id"] + last["samples"]))
    assert [len(x["tok"]) for _, x in got] == lengths[last["first_id"]:, 0].tolist()
    assert sum(len(x["tok"]) for _, x in got) == last["tokens"]


def test_samples_cover_each_document_exactly_once(tiny, expected_samples):
    """Overlong documents are split into near-equal samples of <= seq_len tokens; the shards hold every sample of
    every document exactly once (shuffled), nothing dropped or repeated."""
    tok = Tokenizer.load(tiny.in_work("tokenizer"))
    doc = next(d for d in iter_all_docs(doc_files(tiny.in_work("docs"))) if d["source"] == "wikitext")
    ids = np.asarray(tok.encode(doc["text"]))
    pieces = split_into_samples(ids, 128)
    assert len(pieces) == -(-len(ids) // 128) and max(map(len, pieces)) - min(map(len, pieces)) <= 1
    assert np.array_equal(np.concatenate(pieces), ids)
    _, expected = expected_samples
    assert collections.Counter(all_samples(tiny.in_work("shards")).values()) == expected


def test_shards_and_batches_mix_many_documents(tiny, expected_samples):
    """The tiny corpus is 177 source documents (11 books hold most samples; the biggest 13%). Written in document
    order, each shard held 3-70 of them and a batch of 16 ~4.6 (16% of batches one book). Shuffled at write time,
    every shard holds nearly all of them and a batch ~12, what 16 uniform draws give (12.1)."""
    owner, _ = expected_samples
    m = json.loads((tiny.in_work("shards") / MANIFEST).read_text())
    assert m["sample_order"].startswith("shuffled") and m["config"]["shard"]["shuffle_buffer"] >= m["num_samples"]
    doc_of = {sid: owner[b] for sid, b in all_samples(tiny.in_work("shards")).items()}
    per_shard = [len({doc_of[i] for i in range(s["first_id"], s["first_id"] + s["samples"])}) for s in m["shards"]]
    assert min(per_shard) >= 150, per_shard
    mixed = docs_per_batch(tiny, "shards", owner)
    assert len(mixed) > 1000 and mixed.mean() >= 11.0 and np.mean(mixed >= 8) >= 0.97 and mixed.min() >= 4
    # the same data in document order (shard.shuffle_buffer=0) fails every one of those bounds
    run_shard(variant(tiny, "shard.shuffle_buffer=0", "shard.out_dir=doc_order_shards"))
    unmixed = docs_per_batch(tiny, "doc_order_shards", owner)
    assert unmixed.mean() < 6.0 and np.mean(unmixed >= 8) < 0.4 and np.mean(unmixed == 1) > 0.1


def test_shuffle_buffer_is_a_deterministic_permutation():
    def rng():
        return np.random.default_rng([3, 0x5B])

    out = list(shuffled(range(1000), 50, rng()))
    assert sorted(out) == list(range(1000)) and out == list(shuffled(range(1000), 50, rng()))
    assert out != list(range(1000)) and max(out[:100]) < 150  # a small buffer moves items only so far ahead
    whole = list(shuffled(range(1000), 5000, rng()))  # buffer larger than the input: one full permutation
    assert sorted(whole) == list(range(1000)) and max(whole[:100]) > 500


def test_rerun_does_not_duplicate_and_force_rebuilds_identically(tiny):
    shard_dir = tiny.in_work("shards")
    before = json.loads((shard_dir / MANIFEST).read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    run_shard(tiny)  # same inputs and config: nothing written
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == mtimes
    other = load_config(TINY, [f"data_root={tiny.data_root}", f"work_dir={tiny.work_dir}", "shard.out_dir=rebuilt"])
    (other.in_work("rebuilt")).mkdir()
    (other.in_work("rebuilt") / "shard-000099.tar").write_bytes(b"stale")  # left over from an older run
    run_shard(other, force=True)
    again = json.loads((other.in_work("rebuilt") / MANIFEST).read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in before["shards"]]  # deterministic bytes
    assert sorted(p.name for p in other.in_work("rebuilt").glob("*.tar")) == [s["name"] for s in before["shards"]]
    # a changed shuffle setting rebuilds (other order, same samples); rerunning it then is a no-op again
    reseeded = variant(tiny, "shard.out_dir=rebuilt", "shard.seed=1")
    run_shard(reseeded)
    third = json.loads((other.in_work("rebuilt") / MANIFEST).read_text())
    assert third["fingerprint"] != again["fingerprint"] and third["config"]["shard"]["seed"] == 1
    assert third["shards"][0]["sha256"] != again["shards"][0]["sha256"]
    assert sorted(all_samples(other.in_work("rebuilt")).values()) == sorted(all_samples(shard_dir).values())
    mtimes = {p.name: p.stat().st_mtime_ns for p in other.in_work("rebuilt").iterdir()}
    run_shard(reseeded)
    assert {p.name: p.stat().st_mtime_ns for p in other.in_work("rebuilt").iterdir()} == mtimes


def test_shuffle_settings_are_validated():
    with pytest.raises(ConfigError, match="shard.shuffle_buffer"):
        load_config(TINY, ["shard.shuffle_buffer=-1"])
    with pytest.raises(ConfigError, match="shard.seed"):
        load_config(TINY, ["shard.seed=-2"])


def test_inspect_command_prints_stats_and_detokenized_samples(tiny, capsys):
    rc = main(["inspect", "--config", str(TINY), f"data_root={tiny.data_root}", f"work_dir={tiny.work_dir}",
               "-n", "2", "--verify", "sha256"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "pretrain shards" in out and "checksum matches" in out and "[ok]" in out
    first = next(read_piece(tiny.in_work("shards") / "shard-000000.tar", 0, 0, 1, ["tok"], "uint16"))[1]["tok"]
    text = Tokenizer.load(tiny.in_work("tokenizer")).decode(first.tolist())
    assert f"[0] tok ({len(first)} tokens): {text}" in out  # the first sample, detokenized


def test_cli_reports_errors_without_a_traceback(tiny, capsys, tmp_path):
    rc = main(["inspect", "--config", str(TINY), f"work_dir={tmp_path}"])
    assert rc == 2 and "manifest not found" in capsys.readouterr().err
