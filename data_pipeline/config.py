"""Typed data-pipeline config: dataclasses, loaded from YAML with omegaconf, `key=value` overrides, validation.

Path rules (so one YAML works from any working directory):
  * `data_root` and `work_dir` are relative to the repository root (the folder holding `configs/`);
  * `sources.*` globs and `tasks.root` / `tasks.iwslt_root` are relative to `data_root`;
  * `extract.out_dir`, `tokenizer.out_dir`, `shard.out_dir`, `tasks.out_dir`, `loader.shard_dir`,
    `loader.tokenizer` and `heldout.extract_dir` / `heldout.shard_dir` are relative to `work_dir`;
  * `heldout.sources.*` globs, like `sources.*`, are relative to `data_root`;
  * `tokenizer.path` (a Hugging Face tokenizer folder, tokenizer.type=hf) is relative to the repository root.
`DataConfig.path(...)` helpers return the resolved absolute paths.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from configs import REPO_ROOT, load_typed, merge_typed  # REPO_ROOT: the base of data_root and work_dir
from data_pipeline.errors import ConfigError

SOURCE_KINDS = ("wikipedia", "books", "wikitext")


@dataclass
class SourcesConfig:
    wikipedia: list[str] = field(default_factory=list)  # pages-articles XML dumps (.bz2 or plain), globs
    books: list[str] = field(default_factory=list)  # plain-text books (Gutenberg), globs
    wikitext: list[str] = field(default_factory=list)  # WikiText files (` = Title = ` headings), globs


@dataclass
class ExtractConfig:
    out_dir: str = "docs"
    docs_per_file: int = 2000  # documents per compressed JSONL output file
    max_doc_chars: int = 20000  # longer documents are split at paragraph (or line) boundaries, never dropped
    min_doc_chars: int = 20  # shorter documents count as empty and are skipped
    num_workers: int = 2  # processes that clean Wikipedia pages
    pages_per_task: int = 64  # Wikipedia pages sent to a worker at a time (bounds memory while streaming)
    # A book or WikiText file with a NUL byte, or with more than these shares of its characters being control
    # characters / undecodable UTF-8, is not text: "error" stops naming it, "skip" leaves it out and counts it.
    non_text_files: str = "error"
    max_control_char_ratio: float = 0.01
    max_bad_utf8_ratio: float = 0.05  # Latin-1 prose is ~1-4% non-ASCII; executables and archives are 20%+


TOKENIZER_TYPES = ("sentencepiece", "hf")


@dataclass
class TokenizerConfig:
    # sentencepiece: the `tokenizer` step trains one into out_dir. hf: a Hugging Face tokenizer folder (`path`, e.g.
    # a BART checkpoint's, with its config.json) is used as it is, its ids mapped onto the project's special ids
    # (data_pipeline/hf_tokenizer.py); the settings below out_dir do not apply to it.
    type: str = "sentencepiece"
    path: str = ""
    out_dir: str = "tokenizer"
    model_type: str = "unigram"  # or "bpe"
    vocab_size: int = 4000  # real pieces, including the 6 special ones
    pad_to_multiple: int = 128  # the model's vocab is padded to this (tensor parallelism)
    sample_chars: int = 3_000_000  # characters of extracted text sampled to train on
    character_coverage: float = 0.9995
    byte_fallback: bool = True  # unknown characters become byte pieces, so decode(encode(x)) keeps them
    num_threads: int = 2
    seed: int = 0


@dataclass
class ShardConfig:
    out_dir: str = "shards"
    seq_len: int = 128  # tokens per pretraining sample (longer documents are split into several samples)
    min_sample_tokens: int = 8  # documents shorter than this are counted and skipped
    samples_per_shard: int = 2000  # ShardWriter maxcount
    max_shard_bytes: int = 256 * 1024 * 1024  # ShardWriter maxsize
    num_workers: int = 2  # tokenizer processes
    docs_per_task: int = 256
    # Mixing (shards.py): documents are split into consecutive samples, so without it a shard holds a few books and
    # every batch one book. Input files are visited in a seeded random order and the samples pass through a seeded
    # shuffle buffer of this many samples before writing (0 = document order). Memory: shuffle_buffer x (seq_len
    # tokens x 2 bytes, 4 when the vocab exceeds 65536, + ~300 bytes per sample object), measured 133 MB for
    # 100000 x 511 tokens; the tiny data (~23k samples) fits whole, so it is fully permuted.
    shuffle_buffer: int = 100_000
    seed: int = 0  # seeds the file order and the shuffle buffer (same seed + inputs = identical shards)


@dataclass
class CorruptionConfig:
    # BANG (methods.md 1.4): one contiguous span per block of `bang_block` tokens.
    bang_block: int = 64
    bang_span_ratio: float = 0.15  # span = floor(ratio * block) tokens, at least 1
    bang_mask_prob: float = 0.8  # span token -> <mask>
    bang_random_prob: float = 0.1  # span token -> random token (the rest stay unchanged)
    # ELMER / BART (methods.md 2.2).
    elmer_permute_sentences: bool = True
    elmer_mask_ratio: float = 0.3  # fraction of words (word starts) covered by spans
    elmer_poisson_lambda: float = 3.5
    elmer_random_ratio: float = 0.1  # fraction of spans replaced by a random token instead of <mask>


@dataclass
class LoaderConfig:
    shard_dir: str = "shards"
    tokenizer: str = ""  # empty: the tokenizer recorded in the manifest
    batch_size: int = 16  # max samples per batch
    max_tokens: int = 0  # max padded tokens per batch (batch * longest sample); 0 = no token budget
    shuffle: bool = True
    shuffle_buffer: int = 512  # seeded shuffle buffer (samples), reset at every shard piece
    bucket_window: int = 64  # samples sorted by length together before cutting batches (1 = no sorting)
    # "sha256": each shard hashed the first time it is opened in a run (all at start with on_corrupt_shard=skip);
    # "size": sizes only. Every sample is checked either way (lengths, token ids; see data_pipeline/stream.py).
    verify: str = "sha256"
    on_corrupt_shard: str = "error"  # "error" stops naming shard/sample; "skip" leaves bad ones out and counts them
    prefetch_factor: int = 2
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)


@dataclass
class TasksConfig:
    root: str = "glge"  # GLGE tasks: official layout or the sample layout
    level: str = ""  # easy / medium / hard for the official layout ("" = no level folder)
    tasks: list[str] = field(default_factory=list)
    iwslt_root: str = ""  # IWSLT14 folder with {train,valid,test}.{de,en} ("" = skip)
    out_dir: str = "tasks"
    max_source_len: int = 512
    max_target_len: int = 512
    holdout_fraction: float = 0.1  # a task with one split gives this last fraction as the held-out split
    samples_per_shard: int = 5000
    # A text line longer than this is refused (file and line named): no example is that long, a missing line
    # break or a binary file is. Tokens past max_source_len / max_target_len are truncated and counted instead.
    max_line_chars: int = 1_000_000


@dataclass
class HeldoutConfig:
    """Held-out text for evaluation, built by `python -m data_pipeline prepare --heldout`: extracted and sharded
    like the training text (the same extract and shard settings, the training tokenizer) into folders of its own."""

    sources: SourcesConfig = field(default_factory=SourcesConfig)  # text kept out of training; empty: none
    extract_dir: str = "heldout/docs"
    shard_dir: str = "heldout/shards"  # what pretraining's data.eval_overrides point loader.shard_dir at


@dataclass
class DataConfig:
    name: str = "data"
    data_root: str = "../shared/data"
    work_dir: str = "runs/data"
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    config_file: str = ""  # filled by load_config, used in error messages

    # ---- resolved paths -------------------------------------------------------------------------------
    def root(self) -> Path:
        return resolve(self.data_root, REPO_ROOT)

    def work(self) -> Path:
        return resolve(self.work_dir, REPO_ROOT)

    def in_work(self, rel: str) -> Path:
        return resolve(rel, self.work())

    def heldout_config(self) -> "DataConfig":
        """This config turned to the held-out text: heldout.sources extracted into heldout.extract_dir and sharded
        into heldout.shard_dir (which its loader reads), with this config's tokenizer and settings."""
        if not any(getattr(self.heldout.sources, kind) for kind in SOURCE_KINDS):
            raise ConfigError(f"{self._where()}heldout.sources: empty; list the held-out text (globs under data_root "
                              f"in heldout.sources.{{{','.join(SOURCE_KINDS)}}}) to build held-out shards")
        for name, training in (("extract_dir", self.extract.out_dir), ("shard_dir", self.shard.out_dir)):
            # checked here, not in validate: the older recipe (extract and shard with out_dir=heldout/...) is valid
            _check(self.in_work(getattr(self.heldout, name)) != self.in_work(training), self._where(),
                   f"heldout.{name}", f"is the training folder {training!r}: the held-out build would replace the "
                   f"training data")
        held = copy.deepcopy(self)
        held.sources = copy.deepcopy(self.heldout.sources)
        held.extract.out_dir = self.heldout.extract_dir
        held.shard.out_dir = held.loader.shard_dir = self.heldout.shard_dir
        return held

    def tokenizer_dir(self) -> Path:
        """The tokenizer's folder: the trained sentencepiece model's, or the Hugging Face folder it names."""
        if self.tokenizer.type == "hf":
            return resolve(self.tokenizer.path, REPO_ROOT)
        return self.in_work(self.tokenizer.out_dir)

    def source_files(self, kind: str) -> list[Path]:
        """Expand the globs of one source kind; a glob that matches nothing is an error naming it."""
        files: list[Path] = []
        for pattern in getattr(self.sources, kind):
            p = Path(pattern)
            base = p if p.is_absolute() else self.root() / p
            matches = sorted(base.parent.glob(base.name)) if any(c in base.name for c in "*?[") else [base]
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise ConfigError(f"{self._where()}sources.{kind}: {pattern!r} matches no file under {self.root()}")
            files.extend(matches)
        return files

    def _where(self) -> str:
        return f"{self.config_file}: " if self.config_file else ""

    def validate(self) -> "DataConfig":
        validate_fields(self, self._where())
        return self


def resolve(path: str | Path, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _check(cond: bool, where: str, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}{field_name}: {msg}")


def validate_corruption(c: CorruptionConfig, where: str = "", prefix: str = "loader.corruption") -> None:
    _check(c.bang_block >= 1, where, f"{prefix}.bang_block", f"must be >= 1, got {c.bang_block}")
    _check(0.0 < c.bang_span_ratio <= 1.0, where, f"{prefix}.bang_span_ratio", f"must be in (0, 1], got {c.bang_span_ratio}")
    for name in ("bang_mask_prob", "bang_random_prob", "elmer_mask_ratio", "elmer_random_ratio"):
        v = getattr(c, name)
        _check(0.0 <= v <= 1.0, where, f"{prefix}.{name}", f"must be in [0, 1], got {v}")
    _check(c.bang_mask_prob + c.bang_random_prob <= 1.0, where, f"{prefix}.bang_mask_prob",
           "bang_mask_prob + bang_random_prob must be <= 1")
    _check(c.elmer_poisson_lambda > 0, where, f"{prefix}.elmer_poisson_lambda", "must be > 0")


def validate_loader(lc: LoaderConfig, where: str = "", prefix: str = "loader") -> None:
    _check(lc.batch_size >= 1, where, f"{prefix}.batch_size", f"must be >= 1, got {lc.batch_size}")
    _check(lc.max_tokens >= 0, where, f"{prefix}.max_tokens", f"must be >= 0 (0 = off), got {lc.max_tokens}")
    _check(lc.shuffle_buffer >= 1, where, f"{prefix}.shuffle_buffer", f"must be >= 1, got {lc.shuffle_buffer}")
    _check(lc.bucket_window >= 1, where, f"{prefix}.bucket_window", f"must be >= 1, got {lc.bucket_window}")
    _check(lc.verify in ("size", "sha256"), where, f"{prefix}.verify", f"must be 'size' or 'sha256', got {lc.verify!r}")
    _check(lc.on_corrupt_shard in ("error", "skip"), where, f"{prefix}.on_corrupt_shard",
           f"must be 'error' or 'skip', got {lc.on_corrupt_shard!r}")
    _check(lc.prefetch_factor >= 1, where, f"{prefix}.prefetch_factor", "must be >= 1")
    validate_corruption(lc.corruption, where, f"{prefix}.corruption")


def validate_fields(cfg: DataConfig, where: str = "") -> None:
    e, t, s, k = cfg.extract, cfg.tokenizer, cfg.shard, cfg.tasks
    _check(e.docs_per_file >= 1, where, "extract.docs_per_file", "must be >= 1")
    _check(e.max_doc_chars > e.min_doc_chars >= 0, where, "extract.max_doc_chars", "must be > extract.min_doc_chars >= 0")
    _check(e.num_workers >= 0, where, "extract.num_workers", "must be >= 0")
    _check(e.non_text_files in ("error", "skip"), where, "extract.non_text_files",
           f"must be 'error' or 'skip', got {e.non_text_files!r}")
    for name in ("max_control_char_ratio", "max_bad_utf8_ratio"):
        _check(0.0 <= getattr(e, name) < 1.0, where, f"extract.{name}", f"must be in [0, 1), got {getattr(e, name)}")
    _check(t.type in TOKENIZER_TYPES, where, "tokenizer.type", f"must be one of {TOKENIZER_TYPES}, got {t.type!r}")
    _check(t.type != "hf" or bool(t.path), where, "tokenizer.path",
           "is empty; tokenizer.type=hf reads the Hugging Face tokenizer folder it names (e.g. the checkpoint's)")
    _check(t.model_type in ("unigram", "bpe"), where, "tokenizer.model_type",
           f"must be 'unigram' or 'bpe', got {t.model_type!r}")
    _check(t.vocab_size > 16, where, "tokenizer.vocab_size", f"must be > 16, got {t.vocab_size}")
    _check(t.pad_to_multiple >= 1, where, "tokenizer.pad_to_multiple", "must be >= 1")
    _check(t.sample_chars > 0, where, "tokenizer.sample_chars", "must be > 0")
    _check(0.9 <= t.character_coverage <= 1.0, where, "tokenizer.character_coverage", "must be in [0.9, 1]")
    _check(s.seq_len >= 8, where, "shard.seq_len", f"must be >= 8, got {s.seq_len}")
    _check(1 <= s.min_sample_tokens <= s.seq_len, where, "shard.min_sample_tokens", "must be in [1, shard.seq_len]")
    _check(s.samples_per_shard >= 1, where, "shard.samples_per_shard", "must be >= 1")
    _check(s.max_shard_bytes >= 1024, where, "shard.max_shard_bytes", "must be >= 1024")
    _check(s.num_workers >= 0, where, "shard.num_workers", "must be >= 0")
    _check(s.shuffle_buffer >= 0, where, "shard.shuffle_buffer",
           f"must be >= 0 (0 = document order), got {s.shuffle_buffer}")
    _check(s.seed >= 0, where, "shard.seed", f"must be >= 0, got {s.seed}")
    _check(k.level in ("", "easy", "medium", "hard"), where, "tasks.level", f"must be '', easy, medium or hard, got {k.level!r}")
    _check(0.0 < k.holdout_fraction < 1.0, where, "tasks.holdout_fraction", "must be in (0, 1)")
    _check(k.max_source_len >= 1 and k.max_target_len >= 1, where, "tasks.max_source_len", "lengths must be >= 1")
    _check(k.max_line_chars >= 1, where, "tasks.max_line_chars", f"must be >= 1, got {k.max_line_chars}")
    validate_loader(cfg.loader, where)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DataConfig:
    """Load a data config YAML (or the defaults when path is None), apply `key=value` overrides, validate."""
    cfg: DataConfig = load_typed(DataConfig, path, overrides, label="data config")
    return cfg.validate()


def loader_config_from(obj: Any) -> tuple[LoaderConfig, Path]:
    """Accept what a caller holds: a DataConfig, a LoaderConfig, a YAML path, or a mapping of either's fields.

    Returns the loader config and the folder its relative paths resolve against (the work_dir of a DataConfig,
    otherwise the repository root)."""
    if isinstance(obj, (str, Path)):
        obj = load_config(obj)
    if isinstance(obj, DataConfig):
        validate_loader(obj.loader, obj._where())
        return obj.loader, obj.work()
    if isinstance(obj, LoaderConfig):
        validate_loader(obj)
        return obj, REPO_ROOT
    if OmegaConf.is_config(obj):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        if "loader" in obj:
            cfg: DataConfig = merge_typed(DataConfig, [dict(obj)])
            return loader_config_from(cfg.validate())
        lc: LoaderConfig = merge_typed(LoaderConfig, [dict(obj)], where="loader config: ")
        validate_loader(lc)
        return lc, REPO_ROOT
    raise ConfigError(f"cannot build a loader config from {type(obj).__name__}")


def to_plain(obj: Any) -> Any:
    """Dataclass -> plain dict (for manifests and logs)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
