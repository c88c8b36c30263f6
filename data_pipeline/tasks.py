"""Finetuning data: GLGE tasks and IWSLT14 De-En, as plain text (`read_task_split`) and as task shards.

Layouts understood by `read_task_split(path, task, split, level=None)`:
  * official GLGE: `{path}/[{level}/]{task}_data/org_data/{train,dev,test}.{src,tgt}` (also `path` pointing at
    `{task}_data` or `org_data` itself);
  * the sample layout in ../shared/data/glge: `{path}/{task}/{train,valid,test}.{src,tgt}`;
  * IWSLT14 (task "iwslt14"): `{path}/[iwslt14-de-en/]{train,valid,test}.{de,en}` (German source, English target).
Split names: "train", "valid" (= GLGE's "dev") and "test". When a task folder holds exactly one split, it is a
pool split deterministically: "train" is its first 90% (1 - holdout_fraction) and "valid"/"test" its last 10%.

Faulty task text, decided case by case (docs/reliability.md, Finetuning data):
  * source and target with different line counts: a DataError naming both files and counts, and the first empty
    line of either (a stray blank line is the usual cause) -- except empty lines at the very end of the longer
    file, which are dropped with a warning (an editor's extra final newline);
  * a line longer than `max_line_chars` characters: a DataError naming the file and the line (no example is that
    long; a missing line break or a binary file is);
  * an empty source or target line: the pair is read as it is (generation and evaluation keep the split's line
    order), but left out of the shards and counted (`empty_pairs_skipped`, the first line numbers in
    `empty_pair_lines`): an empty side teaches nothing but garbage;
  * a source or target longer than max_source_len / max_target_len tokens: truncated and counted.

`tasks` command: every configured task and split -> `{tasks.out_dir}/{task}/{split}/` shards (members `src.tok`,
`tgt.tok`; sample id = index of the pair among those kept, the line index when none is skipped) + manifest.json
(kind "task", truncation and skip counts). GLGE's literal "[SEP]" segment markers are encoded as the <sep> id.
Targets are stored without EOS; the collator adds it.
`write_task_shards` is that writer for any pairs of lines (finetuning's distillation writes the teacher's outputs as
targets with it).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from configs import progress
from data_pipeline.artifacts import MANIFEST, fingerprint, shards_up_to_date, staging_for, swap_in
from data_pipeline.config import DataConfig, to_plain
from data_pipeline.corruption import pad_stack
from data_pipeline.errors import DataError
from data_pipeline.documents import decode_utf8
from data_pipeline.shards import token_dtype, write_manifest, write_shards
from data_pipeline.tokenizer import BOS_ID, EOS_ID, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

GLGE_TASKS = ("cnndm", "gigaword", "xsum", "msnews", "squadqg", "msqg", "coqa", "personachat")
IWSLT_TASKS = ("iwslt14", "iwslt14-de-en", "iwslt14_de_en")
SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "valid": "valid", "dev": "valid", "validation": "valid", "test": "test"}
_OFFICIAL_NAME = {"train": "train", "valid": "dev", "test": "test"}
MAX_LINE_CHARS = 1_000_000  # data config tasks.max_line_chars
_LISTED_LINES = 20  # line numbers of skipped pairs kept in the manifest


def _read_lines(path: Path, max_line_chars: int = MAX_LINE_CHARS) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    text, bad = decode_utf8(data)
    if bad:
        log.warning("%s: %d invalid UTF-8 sequences replaced with U+FFFD", path, bad)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another example
    lines = [l.rstrip("\r") for l in lines]
    first = next((i for i, line in enumerate(lines) if len(line) > max_line_chars), None)
    if first is not None:
        raise DataError(f"{path}: line {first + 1} has {len(lines[first]):,} characters, more than "
                        f"tasks.max_line_chars={max_line_chars:,}: no example is that long (a missing line break, "
                        "or not a text file?)")
    return lines


def _pair_lines(src_path: Path, sources: list[str], tgt_path: Path, targets: list[str]) -> None:
    """Make the two sides pair line by line, or say why they cannot (module docstring)."""
    longer, path = (sources, src_path) if len(sources) > len(targets) else (targets, tgt_path)
    surplus = abs(len(sources) - len(targets))
    if surplus and all(not line.strip() for line in longer[-surplus:]):
        log.warning("%s: %d empty line(s) at the end dropped (it has that many more lines than its pair)", path,
                    surplus)
        del longer[-surplus:]
        return
    if surplus:
        blank = [f"{p.name} line {i + 1}" for p, side in ((src_path, sources), (tgt_path, targets))
                 for i in [next((i for i, l in enumerate(side) if not l.strip()), None)] if i is not None]
        hint = f" (first empty line: {', '.join(blank)})" if blank else ""
        raise DataError(f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}: source and target "
                        f"must pair line by line{hint}")


def _task_folder(root: Path, task: str, level: str | None) -> tuple[Path, dict[str, str], tuple[str, str]]:
    """(folder, {split: file stem}, (source ext, target ext)) for a task under root, whichever layout it uses."""
    if task in IWSLT_TASKS:
        exts = ("de", "en")
        for folder in (root, root / "iwslt14-de-en", root / "iwslt14.tokenized.de-en"):
            stems = {s: s for s in SPLITS if (folder / f"{s}.de").is_file() or (folder / f"{s}.en").is_file()}
            if stems:
                return folder, stems, exts
        raise DataError(f"{root}: no IWSLT14 files ({{train,valid,test}}.{{de,en}})")
    exts = ("src", "tgt")
    official = [root / f"{task}_data" / "org_data", root / "org_data", root]
    if level:
        official.insert(0, root / level / f"{task}_data" / "org_data")
    for folder in official:
        stems = {s: _OFFICIAL_NAME[s] for s in SPLITS if (folder / f"{_OFFICIAL_NAME[s]}.src").is_file()}
        if stems and (folder.name == "org_data" or "dev" in stems.values()):
            return folder, stems, exts
    for folder in (root / task, root):
        stems = {s: s for s in SPLITS if (folder / f"{s}.src").is_file() or (folder / f"{s}.tgt").is_file()}
        if stems:
            return folder, stems, exts
    levels = [d.name for d in root.glob("*") if d.name in ("easy", "medium", "hard") and (d / f"{task}_data").is_dir()]
    hint = f" (found levels {levels}: pass level=...)" if levels and not level else ""
    raise DataError(f"{root}: no data for task {task!r}: looked for {task}_data/org_data/{{train,dev,test}}.src "
                    f"and {task}/{{train,valid,test}}.src{hint}")


def read_task_split(task_dir_or_root: str | Path, task: str, split: str, level: str | None = None,
                    holdout_fraction: float = 0.1, max_line_chars: int = MAX_LINE_CHARS
                    ) -> tuple[list[str], list[str]]:
    """Source and target lines of one split of a GLGE task or IWSLT14, paired line by line (see the module
    docstring for what faulty text gives)."""
    task = task.lower()
    if task not in GLGE_TASKS and task not in IWSLT_TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(GLGE_TASKS + IWSLT_TASKS[:1])}")
    if split not in _SPLIT_ALIASES:
        raise DataError(f"unknown split {split!r} for task {task}; use train, valid (or dev) or test")
    split = _SPLIT_ALIASES[split]
    root = Path(task_dir_or_root)
    if not root.is_dir():
        raise DataError(f"{root}: task data folder not found")
    folder, stems, (src_ext, tgt_ext) = _task_folder(root, task, level)
    pooled = len(stems) == 1
    stem = next(iter(stems.values())) if pooled else stems.get(split)
    if stem is None:
        raise DataError(f"{folder}: task {task} has no {split!r} split (found: {', '.join(sorted(stems))})")
    src_path, tgt_path = folder / f"{stem}.{src_ext}", folder / f"{stem}.{tgt_ext}"
    for p in (src_path, tgt_path):
        if not p.is_file():
            raise DataError(f"{p}: missing (its pair {src_path if p == tgt_path else tgt_path} exists)")
    sources, targets = _read_lines(src_path, max_line_chars), _read_lines(tgt_path, max_line_chars)
    _pair_lines(src_path, sources, tgt_path, targets)
    if pooled:
        cut = len(sources) - max(1, round(holdout_fraction * len(sources))) if len(sources) > 1 else len(sources)
        sl = slice(0, cut) if split == "train" else slice(cut, None)
        sources, targets = sources[sl], targets[sl]
    return sources, targets


# ---- collation -----------------------------------------------------------------------------------------------
@dataclass
class TaskCollator:
    """src: source tokens (truncated to max_source_len if > 0); tgt: y + eos; prev: bos + y; positions 1..T."""

    max_source_len: int = 0

    def __call__(self, samples: Sequence[tuple[int, dict[str, np.ndarray]]], epoch: int, batch_index: int) -> dict:
        srcs = [s["src"][: self.max_source_len] if self.max_source_len > 0 else s["src"] for _, s in samples]
        tgts = [np.append(s["tgt"], EOS_ID) for _, s in samples]
        return {
            "src_tokens": pad_stack(srcs, 0),
            "tgt_tokens": pad_stack(tgts, 0),
            "prev_tokens": pad_stack([np.concatenate([[BOS_ID], t[:-1]]) for t in tgts], 0),
            "tgt_positions": pad_stack([np.arange(1, len(t) + 1) for t in tgts], 0),
            "sample_ids": np.asarray([sid for sid, _ in samples], dtype=np.int64),
            "n_tokens": int(sum(len(t) for t in tgts)),
        }


# ---- the `tasks` command -------------------------------------------------------------------------------------
def build_task_shards(root: Path, task: str, split: str, out_dir: Path, tok: Tokenizer, *, max_source_len: int,
                      max_target_len: int, level: str | None = None, holdout_fraction: float = 0.1,
                      samples_per_shard: int = 5000, max_line_chars: int = MAX_LINE_CHARS, force: bool = False) -> dict:
    """Tokenize one split into `out_dir` (idempotent: same inputs, tokenizer and settings -> nothing to do); a
    pair with an empty side is left out and counted."""
    sources, targets = read_task_split(root, task, split, level, holdout_fraction, max_line_chars)
    settings = {"task": task, "split": split, "max_source_len": max_source_len, "max_target_len": max_target_len,
                "level": level, "holdout_fraction": holdout_fraction, "samples_per_shard": samples_per_shard}
    try:
        return write_task_shards(sources, targets, out_dir, tok, settings=settings, force=force,
                                 extra={"task": task, "split": split})
    except DataError as exc:
        raise DataError(f"{root}: task {task} split {split}: {exc}") from None


def write_task_shards(sources: Sequence[str], targets: Sequence[str], out_dir: Path, tok: Tokenizer, *,
                      settings: dict, extra: dict, force: bool = False, files: dict[str, str] | None = None) -> dict:
    """Source and target lines -> task shards in `out_dir` (sample id = index of the pair among those kept;
    a pair with an empty side is left out and counted), built in a staging folder and
    swapped in whole; nothing to do when `out_dir` already holds the same lines, tokenizer and settings.
    settings: max_source_len, max_target_len and samples_per_shard, plus anything that describes the set (its
    manifest's `config`); extra: top-level manifest entries (task, split, and for a distilled set its record);
    files: more text files of the set, written beside the manifest ({name: text})."""
    max_source_len, max_target_len = settings["max_source_len"], settings["max_target_len"]
    task, split = extra.get("task"), extra.get("split")
    empty = [i + 1 for i, (src, tgt) in enumerate(zip(sources, targets)) if not src.strip() or not tgt.strip()]
    if empty:  # shards written before such pairs were left out are rebuilt
        settings = {**settings, "empty_pairs_skipped": len(empty)}
    fp = fingerprint({**settings, "tokenizer": tok.checksum, "data": fingerprint([list(sources), list(targets)])})
    if not force and shards_up_to_date(out_dir, fp):
        return json.loads((out_dir / MANIFEST).read_text())
    stats: dict = collections.Counter()
    dtype = token_dtype(tok.padded_vocab_size)
    if empty:  # line numbers inside the split
        log.warning("%s/%s: %d pair(s) with an empty source or target left out (lines %s%s)", task, split,
                    len(empty), ", ".join(map(str, empty[:_LISTED_LINES])), "..." if len(empty) > _LISTED_LINES else "")
        stats["empty_pairs_skipped"], stats["empty_pair_lines"] = len(empty), empty[:_LISTED_LINES]

    def samples():
        pairs = zip(sources, targets)
        for src, tgt in progress.iterate(pairs, desc=f"tasks {task}/{split}", unit="pair", total=len(sources)):
            if not src.strip() or not tgt.strip():
                continue
            s = np.asarray(tok.encode_with_sep(src), dtype=np.int64)
            t = np.asarray(tok.encode(tgt), dtype=np.int64)
            if len(s) > max_source_len:
                stats["sources_truncated"] += 1
            if len(t) > max_target_len:
                stats["targets_truncated"] += 1
            if len(s) == 0 or len(t) == 0:
                stats["empty_source_or_target"] += 1  # text that encodes to no token (e.g. only control chars)
            yield {"src": s[:max_source_len], "tgt": t[:max_target_len]}

    staging = staging_for(out_dir)
    written = write_shards(samples(), staging, ["src", "tgt"], dtype, settings["samples_per_shard"], 1 << 30)
    if not written.shards:
        raise DataError("no examples to write")
    for name, text in (files or {}).items():
        (staging / name).write_text(text, encoding="utf-8")
    manifest = write_manifest(staging, "task", ["src", "tgt"], dtype, written, tok, dict(stats), settings, fp, extra)
    swap_in(staging, out_dir)
    return manifest


def run_tasks(cfg: DataConfig, force: bool = False) -> dict[str, dict[str, int]]:
    """Shards for every configured GLGE task (and IWSLT14 if tasks.iwslt_root is set); returns sample counts."""
    k = cfg.tasks
    tok = load_tokenizer(cfg.tokenizer_dir())
    out = cfg.in_work(k.out_dir)
    jobs = [(cfg.root() / k.root, t) for t in k.tasks]
    if k.iwslt_root:
        jobs.append((cfg.root() / k.iwslt_root, "iwslt14"))
    counts: dict[str, dict[str, int]] = {}
    for root, task in jobs:
        if task not in GLGE_TASKS and task not in IWSLT_TASKS:
            raise DataError(f"{cfg.config_file or 'data config'}: tasks.tasks: unknown task {task!r}; "
                            f"known: {', '.join(GLGE_TASKS)} (and iwslt14 via tasks.iwslt_root)")
        for split in SPLITS:
            try:
                read_task_split(root, task, split, k.level or None, k.holdout_fraction, k.max_line_chars)
            except DataError as exc:
                if "has no" in str(exc):
                    log.info("tasks: %s", exc)
                    continue
                raise
            m = build_task_shards(root, task, split, out / task / split, tok, max_source_len=k.max_source_len,
                                  max_target_len=k.max_target_len, level=k.level or None,
                                  holdout_fraction=k.holdout_fraction, samples_per_shard=k.samples_per_shard,
                                  max_line_chars=k.max_line_chars, force=force)
            counts.setdefault(task, {})[split] = m["num_samples"]
            log.info("tasks: %s/%s: %d pairs (%s)", task, split, m["num_samples"], m["stats"])
    (out / "tasks.json").write_text(json.dumps({"counts": counts, "config": to_plain(k)}, indent=1))
    return counts


__all__ = ["read_task_split", "build_task_shards", "write_task_shards", "run_tasks", "TaskCollator", "GLGE_TASKS"]
