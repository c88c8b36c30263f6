"""Where a finetuning task's data lives, how its shards are built, and the loaders the engine reads.

The task text is read by data_pipeline.tasks (official GLGE layout, the sample layout in ../shared/data/glge, or
IWSLT14's {train,valid,test}.{de,en}); shards are written with the *pretraining* tokenizer (the data config's
tokenizer: tokenizer.out_dir, or for tokenizer.type=hf the Hugging Face folder tokenizer.path names, e.g. the
checkpoint `--init` starts from) into <work_dir>/<tasks.out_dir>/<difficulty>/<task>/<split>/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_pipeline.stream import build_task_loader
from data_pipeline.tasks import build_task_shards, read_task_split
from data_pipeline.tokenizer import load_tokenizer
from finetune.glge_tasks import get_task
from pretrain import core

SPLIT_NAMES = {"train": "train", "valid": "valid", "dev": "valid", "validation": "valid", "test": "test"}


@dataclass(frozen=True)
class TaskData:
    """Resolved locations of one task's data (all absolute)."""

    task: str
    difficulty: str
    text_root: Path  # the folder data_pipeline.tasks.read_task_split reads
    level: str | None  # the official layout's level folder to try first (GLGE only)
    shard_root: Path  # <work>/<tasks.out_dir>/<difficulty>/<task>
    tokenizer: Path  # the pretraining tokenizer's folder (tokenizer.model, or a Hugging Face tokenizer)
    max_source_len: int  # tasks.max_source_len of the data config (what the shards hold)
    max_target_len: int
    holdout_fraction: float
    samples_per_shard: int
    max_line_chars: int  # tasks.max_line_chars: a longer text line is refused

    def shard_dir(self, split: str) -> Path:
        return self.shard_root / SPLIT_NAMES.get(split, split)


def task_data(data_cfg, task: str, difficulty: str) -> TaskData:
    """Locations for `task` under a data_pipeline DataConfig."""
    spec = get_task(task)
    k = data_cfg.tasks
    if spec.family == "translation":
        if not k.iwslt_root:
            raise ValueError(f"{data_cfg.config_file or 'data config'}: tasks.iwslt_root is empty; IWSLT14 needs the "
                             "folder with {train,valid,test}.{de,en}")
        text_root, level = data_cfg.root() / k.iwslt_root, None
    else:
        text_root, level = data_cfg.root() / k.root, (difficulty or None)
    label = difficulty or "default"
    return TaskData(task, difficulty, text_root.resolve(), level, data_cfg.in_work(k.out_dir) / label / task,
                    data_cfg.tokenizer_dir(), k.max_source_len, k.max_target_len,
                    k.holdout_fraction, k.samples_per_shard, k.max_line_chars)


def read_split(td: TaskData, split: str) -> tuple[list[str], list[str]]:
    """Source and reference lines of a split, as the files hold them (DataError on mismatched files)."""
    return read_task_split(td.text_root, td.task, SPLIT_NAMES.get(split, split), td.level, td.holdout_fraction,
                           td.max_line_chars)


def build_shards(td: TaskData, splits: list[str], force: bool = False) -> dict[str, int]:
    """Tokenize the splits into shards (skipped when up to date); returns samples per split."""
    tok = load_tokenizer(td.tokenizer)
    counts = {}
    for split in splits:
        split = SPLIT_NAMES.get(split, split)
        manifest = build_task_shards(td.text_root, td.task, split, td.shard_dir(split), tok,
                                     max_source_len=td.max_source_len, max_target_len=td.max_target_len,
                                     level=td.level, holdout_fraction=td.holdout_fraction,
                                     samples_per_shard=td.samples_per_shard, max_line_chars=td.max_line_chars,
                                     force=force)
        counts[split] = int(manifest["num_samples"])
    return counts


def task_loader(shard_dir: Path, section, *, dp_rank: int, dp_size: int, seed: int, max_source_len: int,
                shuffle: bool = True):
    """data_pipeline's task loader over one split's shards, with the finetune config's batching."""
    pin_memory = core.uses_gpu()  # pinned batches copy to the GPU asynchronously
    return build_task_loader(shard_dir, dp_rank=dp_rank, dp_world_size=dp_size, seed=seed,
                             num_workers=section.num_workers if shuffle else 0, batch_size=section.batch_size,
                             max_tokens=section.max_tokens, shuffle=shuffle, bucket_window=section.bucket_window,
                             shuffle_buffer=section.shuffle_buffer, max_source_len=max_source_len,
                             pin_memory=pin_memory)
