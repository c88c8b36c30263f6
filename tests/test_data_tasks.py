"""Task readers: the official GLGE layout (with and without a level folder), the sample layout in
../shared/data/glge, IWSLT14, deterministic splits of one-split tasks, and the errors for bad task data."""
import pytest

from data_pipeline.errors import DataError
from data_pipeline.tasks import GLGE_TASKS, read_task_split


def _lines(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_sample_layout_with_real_splits(shared_data):
    src, tgt = read_task_split(shared_data / "glge", "gigaword", "train")
    assert len(src) == len(tgt) == 10000
    assert src[0] == _lines(shared_data / "glge/gigaword/train.src")[0]
    vsrc, vtgt = read_task_split(shared_data / "glge", "gigaword", "dev")  # "dev" is GLGE's name for valid
    assert len(vsrc) == 1000 and vtgt == _lines(shared_data / "glge/gigaword/valid.tgt")
    with pytest.raises(DataError, match="no 'test' split"):
        read_task_split(shared_data / "glge", "gigaword", "test")
    # the task folder itself works too
    assert read_task_split(shared_data / "glge/msnews", "msnews", "test")[0] == _lines(shared_data / "glge/msnews/test.src")


def test_one_split_task_is_split_deterministically(shared_data):
    all_src = _lines(shared_data / "glge/squadqg/valid.src")
    train, _ = read_task_split(shared_data / "glge", "squadqg", "train")
    valid, _ = read_task_split(shared_data / "glge", "squadqg", "valid")
    test, _ = read_task_split(shared_data / "glge", "squadqg", "test")
    assert len(train) == 9513 and len(valid) == 1057 and valid == test  # last 10% held out
    assert train + valid == all_src
    assert read_task_split(shared_data / "glge", "squadqg", "train")[0] == train
    iw_train, iw_train_en = read_task_split(shared_data / "iwslt14-de-en", "iwslt14", "train")
    iw_valid, _ = read_task_split(shared_data, "iwslt14", "valid")  # found under the data root too
    assert len(iw_train) + len(iw_valid) == 7283 and iw_train[0] == "es ist diese pyramide ."
    assert iw_train_en[0] == _lines(shared_data / "iwslt14-de-en/valid.en")[0]


def test_official_glge_layout_with_levels(shared_data, tmp_path):
    src = _lines(shared_data / "glge/squadqg/valid.src")
    tgt = _lines(shared_data / "glge/squadqg/valid.tgt")
    for level, n in (("easy", 30), ("hard", 10)):
        org = tmp_path / level / "squadqg_data" / "org_data"
        org.mkdir(parents=True)
        for i, split in enumerate(("train", "dev", "test")):
            lo = i * n
            (org / f"{split}.src").write_text("\n".join(src[lo: lo + n]) + "\n", encoding="utf-8")
            (org / f"{split}.tgt").write_text("\n".join(tgt[lo: lo + n]) + "\n", encoding="utf-8")
    s, t = read_task_split(tmp_path, "squadqg", "valid", level="hard")
    assert s == src[10:20] and t == tgt[10:20]
    assert read_task_split(tmp_path / "easy", "squadqg", "test")[0] == src[60:90]
    assert read_task_split(tmp_path / "easy" / "squadqg_data", "squadqg", "train")[0] == src[:30]
    assert read_task_split(tmp_path / "easy" / "squadqg_data" / "org_data", "squadqg", "dev")[1] == tgt[30:60]
    with pytest.raises(DataError, match="level"):
        read_task_split(tmp_path, "squadqg", "train")  # two levels there: which one?


def test_mismatched_line_counts_are_an_error_naming_both_files(shared_data, tmp_path):
    task = tmp_path / "xsum"
    task.mkdir()
    (task / "test.src").write_text("\n".join(_lines(shared_data / "glge/xsum/test.src")[:20]) + "\n")
    (task / "test.tgt").write_text("\n".join(_lines(shared_data / "glge/xsum/test.tgt")[:19]) + "\n")
    with pytest.raises(DataError, match=r"test.src has 20 lines but .*test.tgt has 19"):
        read_task_split(tmp_path, "xsum", "test")
    (task / "test.tgt").unlink()
    with pytest.raises(DataError, match="test.tgt: missing"):
        read_task_split(tmp_path, "xsum", "test")


def test_unknown_task_split_and_folder_are_errors(shared_data, tmp_path):
    with pytest.raises(DataError, match="unknown task 'wmt14'"):
        read_task_split(shared_data / "glge", "wmt14", "train")
    with pytest.raises(DataError, match="unknown split"):
        read_task_split(shared_data / "glge", "xsum", "training")
    with pytest.raises(DataError, match="no data for task 'cnndm'"):
        read_task_split(tmp_path, "cnndm", "test")
    with pytest.raises(DataError, match="not found"):
        read_task_split(tmp_path / "nowhere", "cnndm", "test")
    assert len(GLGE_TASKS) == 8


def test_faulty_task_text_is_refused_or_skipped_and_counted(shared_data, tiny, tmp_path):
    """The Finetuning data rows of docs/reliability.md, on 30 real Gigaword pairs: a blank line that breaks the
    pairing stops naming both files and the blank line; blank lines at the end of one file are dropped; an over-long
    line stops naming file and line; pairs with an empty side are read as they are (generation keeps the split's
    lines) but left out of the shards and counted, and the shards hold exactly the other pairs, in order."""
    from data_pipeline.stream import build_task_loader
    from data_pipeline.tasks import build_task_shards
    from data_pipeline.tokenizer import Tokenizer

    src = _lines(shared_data / "glge/gigaword/train.src")[:30]
    tgt = _lines(shared_data / "glge/gigaword/train.tgt")[:30]
    folder = tmp_path / "gigaword"
    folder.mkdir()

    def write(sources, targets):
        for split in ("train", "valid"):  # two splits: no pooled 90/10 split of one file
            (folder / f"{split}.src").write_text("\n".join(sources) + "\n", encoding="utf-8")
            (folder / f"{split}.tgt").write_text("\n".join(targets) + "\n", encoding="utf-8")

    write(src[:10] + [""] + src[10:], tgt)
    with pytest.raises(DataError, match=r"train.src has 31 lines but .*train.tgt has 30: source and target must pair "
                                        r"line by line \(first empty line: train.src line 11\)"):
        read_task_split(tmp_path, "gigaword", "train")
    write(src, tgt + ["", "  "])  # an editor's extra newlines at the end of one file
    assert read_task_split(tmp_path, "gigaword", "train") == (src, tgt)

    long = list(src)
    long[7] = "word " * 250_000
    write(long, tgt)
    with pytest.raises(DataError, match=r"train.src: line 8 has 1,250,000 characters, more than "
                                        r"tasks.max_line_chars=1,000,000"):
        read_task_split(tmp_path, "gigaword", "train")

    sources, targets = list(src), list(tgt)
    sources[3], targets[20] = "", "   "
    write(sources, targets)
    assert read_task_split(tmp_path, "gigaword", "train") == (sources, targets)
    tok = Tokenizer.load(tiny.in_work(tiny.tokenizer.out_dir))
    manifest = build_task_shards(tmp_path, "gigaword", "train", tmp_path / "shards", tok, max_source_len=128,
                                 max_target_len=64)
    assert manifest["num_samples"] == 28
    assert (manifest["stats"]["empty_pairs_skipped"], manifest["stats"]["empty_pair_lines"]) == (2, [4, 21])
    loader = build_task_loader(tmp_path / "shards", dp_rank=0, dp_world_size=1, seed=0, num_workers=0,
                               batch_size=64, shuffle=False)
    got = {}
    for batch in loader:
        for sid, row in zip(batch["sample_ids"].tolist(), batch["tgt_tokens"].tolist()):
            got[sid] = [t for t in row if t != 0][:-1]  # pad and the collator's EOS off
    kept = [t for i, t in enumerate(tgt) if i not in (3, 20)]
    assert [got[i] for i in sorted(got)] == [tok.encode(t)[:64] for t in kept]
