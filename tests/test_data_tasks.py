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
