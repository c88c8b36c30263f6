"""`shard`: webdataset shards and manifest.json built from the tiny corpus; re-running; inspect; the task shards."""
import hashlib
import json

import numpy as np

from data_pipeline.__main__ import main
from data_pipeline.config import REPO_ROOT, load_config
from data_pipeline.extract import doc_files, iter_all_docs
from data_pipeline.shards import LENGTHS, MANIFEST, read_piece, run_shard, split_into_samples
from data_pipeline.tokenizer import Tokenizer

TINY = REPO_ROOT / "configs" / "data" / "tiny.yaml"


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


def test_samples_cover_each_document_in_order(tiny):
    """Overlong documents are split into near-equal samples of <= seq_len tokens, nothing dropped."""
    tok = Tokenizer.load(tiny.in_work("tokenizer"))
    doc = next(d for d in iter_all_docs(doc_files(tiny.in_work("docs"))) if d["source"] == "wikitext")
    ids = np.asarray(tok.encode(doc["text"]))
    pieces = split_into_samples(ids, 128)
    assert len(pieces) == -(-len(ids) // 128) and max(map(len, pieces)) - min(map(len, pieces)) <= 1
    assert np.array_equal(np.concatenate(pieces), ids)
    # and those are exactly the samples in the shards (wikitext docs come last in the file order)
    m = json.loads((tiny.in_work("shards") / MANIFEST).read_text())
    needle = pieces[0].tolist()
    found = []
    for s in m["shards"]:
        for sid, x in read_piece(tiny.in_work("shards") / s["name"], s["first_id"], 0, s["samples"], ["tok"], "uint16"):
            if found or x["tok"].tolist() == needle:
                found.append(x["tok"])
            if len(found) == len(pieces):
                break
        if len(found) == len(pieces):
            break
    assert np.array_equal(np.concatenate(found), ids)


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


def test_inspect_command_prints_stats_and_detokenized_samples(tiny, capsys):
    rc = main(["inspect", "--config", str(TINY), f"data_root={tiny.data_root}", f"work_dir={tiny.work_dir}",
               "-n", "2", "--verify", "sha256"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "pretrain shards" in out and "checksum matches" in out and "[ok]" in out
    assert "VOLUME I CHAPTER I Emma Woodhouse" in out  # the first sample, detokenized


def test_cli_reports_errors_without_a_traceback(tiny, capsys, tmp_path):
    rc = main(["inspect", "--config", str(TINY), f"work_dir={tmp_path}"])
    assert rc == 2 and "manifest not found" in capsys.readouterr().err
