"""python -m finetune distill --teacher <AR finetune output dir> [--split train] [--out DIR] [--chunk-size N]
                              [--batch-size N] [--limit N] [--force] [key=value ...]

Sequence-level knowledge distillation (Kim & Rush, 2016), which BANG's and ELMER's authors recommend before NAR
finetuning: an AR teacher decodes the training split with its beam search, and its outputs replace the gold
targets of a NAR (or JANUS) finetune (`data.distilled=<out>`; validation stays gold).

Every process of the job decodes a share. Start it like training: plainly for one process, with torchrun or the
deepspeed launcher for several, or `python -m launch --config configs/launch/<cluster>.yaml -- finetune distill
--teacher ...`. The split is cut into chunks of --chunk-size examples; the chunks not done yet are dealt round
robin over the ranks, and each is decoded in batches (longest sources first, as `generate` does) on the rank's
device and written to <out>/chunks/ atomically once done. A job killed mid-way loses only the chunks in progress:
the same command again skips the finished ones. Each chunk records the job's fingerprint (the teacher's weights,
the decoding mode and options, the split's sources, the chunking), so chunks of another job are never mixed in:
such a folder is refused, and --force starts over. When every chunk is there, rank 0 writes the task shard set
into <out> with data_pipeline.tasks.write_task_shards (shards, lengths, a manifest with every shard's sha256, the
tokenizer and its checksum; sample id = line index in the split) and the manifest's `distilled` record: the
teacher (folder, MLflow run id, store, experiment, objective, step, weights sha256), the decoding mode and
options, the task, difficulty, split and number of examples; hypotheses.txt beside it holds the teacher's outputs,
one per line. Rank 0 shows the progress of all ranks (chunks on disk) with an ETA.

key=value overrides apply to the teacher's saved finetune config: decode.beam_size=5, decode.max_len=30,
data.overrides=[...] (data moved elsewhere), decode.mode=ar_greedy. The teacher decodes with AR search (ar_beam,
its default, or ar_greedy). `--validate-only [--world-size N] [--json]` checks the job without starting it, and
states its facts for the launcher; `--resume` (added by the launcher's restarts) changes nothing, since a rerun
always resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from configs import ConfigError, progress
from data_pipeline.artifacts import MANIFEST, fingerprint, read_record, sha256_file
from data_pipeline.errors import DataError
from data_pipeline.tasks import write_task_shards
from data_pipeline.tokenizer import load_tokenizer
from finetune.config import FinetuneConfig, fail, from_dict
from finetune.data import DISTILLED, TaskData, read_split
from finetune.init_checkpoint import FINETUNE_META, FINETUNED, check_tokenizer, read_init
from finetune.resolve import decoding_options, load_data_config, resolve_task_data, validate_task
from pretrain import core

if TYPE_CHECKING:
    from model.generation import DecodeOptions

AR_SEARCH = ("ar_beam", "ar_greedy")
CHUNKS = "chunks"  # <out>/chunks/chunk_000012.json while the job runs
HYPOTHESES = "hypotheses.txt"


@dataclass
class DistillPlan:
    cfg: FinetuneConfig  # the teacher's config with the overrides; output_dir = the distilled set
    world_size: int
    teacher: Path
    teacher_meta: dict[str, Any]
    overrides: list[str]
    task: TaskData
    split: str
    sources: list[str]
    limit: int
    mode: str
    options: DecodeOptions
    max_source_len: int
    chunk_size: int
    force: bool
    fingerprint: str
    tokenizer_checksum: str
    complete: bool  # <out> already holds this job's distilled set
    chunks_done: list[int] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def chunk_dir(self) -> Path:
        return self.out / CHUNKS

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.sources) / self.chunk_size)

    def chunk_range(self, c: int) -> range:
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, len(self.sources)))

    def record(self) -> dict[str, Any]:
        """The manifest's `distilled` entry."""
        m = self.teacher_meta
        return {"teacher": str(self.teacher), "teacher_run_id": m.get("finetune_run_id"),
                "teacher_tracking_uri": m.get("tracking_uri"), "teacher_experiment": m.get("experiment"),
                "teacher_objective": m.get("objective"), "teacher_step": m.get("step"),
                "teacher_weights_sha256": m["weights_sha256"], "task": self.cfg.task.name,
                "difficulty": self.cfg.task.difficulty, "split": self.split, "examples": len(self.sources),
                "limit": self.limit, "mode": self.mode, "decode": asdict(self.options),
                "max_source_len": self.max_source_len, "chunk_size": self.chunk_size, "fingerprint": self.fingerprint}


# --- the job, checked without a process group ---------------------------------------------------------------

def config_from_args(args) -> FinetuneConfig:
    """The teacher's saved finetune config with the overrides, pointed at the distillation's folders: what the
    launcher's facts and the checks read."""
    teacher = Path(args.teacher)
    if not (teacher / FINETUNE_META).is_file():
        raise ConfigError(f"--teacher {teacher}: not a finetune output folder (no {FINETUNE_META}; `python -m finetune` "
                          "writes one beside final_model.pt)")
    meta = read_record(teacher / FINETUNE_META)
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"--teacher {teacher / FINETUNE_META}: unreadable or without the run's config")
    cfg = from_dict(meta["config"], args.overrides)
    cfg.config_file = str(teacher / "finetune.yaml") if (teacher / "finetune.yaml").is_file() else ""
    cfg.output_dir = str(Path(args.out) if args.out else teacher / "distill" / args.split)
    cfg.checkpoint.dir = cfg.output_dir  # what the launcher checks is writable (chunks go to <out>/chunks)
    cfg.parallel.tensor_parallel = 1  # every process decodes its share with the full teacher
    cfg.tracking.mlflow = False  # the set's manifest is its record; the student's run links to the teacher's
    if args.batch_size:
        cfg.decode.batch_size = args.batch_size
    return cfg


def prepare(cfg: FinetuneConfig, world_size: int, args) -> DistillPlan:
    """Check everything before any process group starts; ConfigError names the option, field or file at fault."""
    teacher = Path(args.teacher).resolve()
    try:
        weights = read_init(teacher)
    except core.InitError as err:
        raise ConfigError(f"--teacher: {err}") from None
    if weights.meta.get("format") != FINETUNED:
        raise ConfigError(f"--teacher {teacher}: not a finetuned model")
    validate_task(cfg)
    td = resolve_task_data(cfg, load_data_config(cfg))
    try:
        tokenizer = load_tokenizer(td.tokenizer)
        check_tokenizer(weights, tokenizer.checksum, str(td.tokenizer))
        sources, _ = read_split(td, args.split)
    except (DataError, core.InitError) as err:
        raise ConfigError(f"--teacher {teacher} / --split {args.split}: {err}") from None
    mode, options = decoding_options(cfg)
    if mode not in AR_SEARCH:
        fail(cfg, "decode.mode", f"{mode!r}: the teacher decodes with AR search, {' or '.join(AR_SEARCH)}")
    for name, value in (("--chunk-size", args.chunk_size), ("decode.batch_size", cfg.decode.batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    if args.limit:
        sources = sources[:args.limit]
    if not sources:
        raise ConfigError(f"--split {args.split}: no examples")
    model_cfg = weights.meta["model_config"]
    max_source_len = cfg.data.max_source_len or model_cfg["max_source_positions"]
    meta = {**weights.meta, "weights_sha256": sha256_file(teacher / core.FINAL_WEIGHTS)}
    job = fingerprint({"teacher": meta["weights_sha256"], "mode": mode, "options": asdict(options),
                       "sources": fingerprint(sources), "max_source_len": max_source_len,
                       "chunk_size": args.chunk_size, "tokenizer": tokenizer.checksum})
    plan = DistillPlan(cfg, world_size, teacher, meta, list(args.overrides), td, args.split, sources, args.limit,
                       mode, options, max_source_len, args.chunk_size, args.force, job, tokenizer.checksum,
                       complete=False)
    _check_out(plan)
    return plan


def _check_out(plan: DistillPlan) -> None:
    """What <out> holds already: this job's set (complete), its finished chunks, or another job's (refused unless
    --force)."""
    manifest = read_record(plan.out / MANIFEST)
    done_fp = (manifest.get(DISTILLED) or {}).get("fingerprint")
    if manifest and not plan.force:
        if done_fp != plan.fingerprint:
            raise ConfigError(f"--out {plan.out}: holds {'a distilled set of another job' if done_fp else 'other shards'}"
                              " (teacher, decoding settings, split or chunking differ); pass --force to replace it, "
                              "or another --out")
        plan.complete = True
        return
    chunk_plan = read_record(plan.chunk_dir / "job.json")
    if chunk_plan and chunk_plan.get("fingerprint") != plan.fingerprint and not plan.force:
        raise ConfigError(f"--out {plan.out}: {plan.chunk_dir} holds the chunks of another distillation (teacher, "
                          "decoding settings, split or chunking differ); pass --force to start over, or another --out")
    plan.chunks_done = [] if plan.force else finished_chunks(plan)


def finished_chunks(plan: DistillPlan) -> list[int]:
    """The chunks on disk that belong to this job and are whole."""
    done = []
    for c in range(plan.num_chunks):
        chunk = read_record(chunk_path(plan, c))
        if chunk.get("fingerprint") == plan.fingerprint and len(chunk.get("hypotheses", [])) == len(
                plan.chunk_range(c)):
            done.append(c)
    return done


def chunk_path(plan: DistillPlan, c: int) -> Path:
    return plan.chunk_dir / f"chunk_{c:06d}.json"


def examples_on_disk(plan: DistillPlan) -> int:
    """Examples in the chunk files present (a chunk file appears only whole: written aside, then renamed)."""
    return sum(len(plan.chunk_range(c)) for c in range(plan.num_chunks) if chunk_path(plan, c).is_file())


def describe(plan: DistillPlan) -> str:
    o, beam = plan.options, f" beam {plan.options.beam_size}" if plan.mode == "ar_beam" else ""
    state = "already complete" if plan.complete else f"{len(plan.chunks_done)} done"
    return (f"distill {plan.cfg.task.name}-{plan.cfg.task.difficulty} {plan.split}: {len(plan.sources)} examples in "
            f"{plan.num_chunks} chunks of {plan.chunk_size} ({state}), {plan.mode}{beam} max_len {o.max_len} "
            f"batch {plan.cfg.decode.batch_size} on {plan.world_size} process(es); teacher {plan.teacher} (MLflow run "
            f"{plan.teacher_meta.get('finetune_run_id')}); output {plan.out}")


def stage_facts(cfg: FinetuneConfig, args) -> dict[str, list]:
    """What --validate-only --json adds for the launcher: the teacher and the data config it reads (no shards)."""
    return {"inputs": [core.input_file("--teacher", args.teacher), core.input_file("data.config", cfg.data.config)],
            "shards": []}


# --- the run --------------------------------------------------------------------------------------------------

def run(plan: DistillPlan) -> Path:
    """Decode this rank's share of the unfinished chunks, then (rank 0) write the distilled set; returns <out>."""
    if plan.complete:
        print(f"[distill] {plan.out} already holds this distillation; nothing to do", flush=True)
        return plan.out
    import torch
    import torch.distributed as dist

    with core.started(plan.cfg):
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            _start_chunks(plan)
        dist.barrier()
        pending = [c for c in range(plan.num_chunks) if c not in finished_chunks(plan)]
        dist.barrier()  # every rank has listed the chunks before any writes one
        mine = pending[rank::world]
        done = plan.num_chunks - len(pending)
        print(f"[distill] rank {rank}: {len(mine)} of {len(pending)} chunks to decode ({done} done before)",
              flush=True)
        shown = OnDisk(plan, enabled=rank == 0)
        _decode_chunks(plan, mine, shown, torch)
        dist.barrier()
        shown.close()  # every rank is done
        if rank == 0:
            _write_set(plan)
        dist.barrier()
    return plan.out


def _start_chunks(plan: DistillPlan) -> None:
    """Rank 0, before anyone decodes: a fresh chunk folder on --force, the job's record, no torn temporary files."""
    import shutil

    if plan.force:
        shutil.rmtree(plan.chunk_dir, ignore_errors=True)
    plan.chunk_dir.mkdir(parents=True, exist_ok=True)
    for torn in plan.chunk_dir.glob(".chunk_*.tmp.*"):  # a chunk whose writer was killed
        torn.unlink(missing_ok=True)
    core.write_atomically(plan.chunk_dir / "job.json", json.dumps(
        {"fingerprint": plan.fingerprint, "chunks": plan.num_chunks, "record": plan.record()}, indent=1))


def _decode_chunks(plan: DistillPlan, chunks: list[int], shown: "OnDisk", torch) -> None:
    """Decode and write `chunks`; rank 0 (`shown`) shows every rank's progress, read from the chunk files."""
    from finetune import decoding
    from finetune.generate import load_for_decoding

    model, _, _, tokenizer, _ = load_for_decoding(str(plan.teacher), None, plan.overrides)
    if core.uses_gpu():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    rank = torch.distributed.get_rank()
    for c in chunks:
        start = time.perf_counter()
        rows = plan.chunk_range(c)
        ids = decoding.encode_sources(tokenizer, [plan.sources[i] for i in rows], plan.max_source_len)
        result = decoding.generate(model, tokenizer, ids, plan.mode, plan.options, plan.cfg.decode.batch_size)
        core.write_atomically(chunk_path(plan, c), json.dumps(
            {"fingerprint": plan.fingerprint, "chunk": c, "first": rows.start, "rank": rank,
             "seconds": time.perf_counter() - start, "hypotheses": result.hypotheses}))
        shown.refresh()


def _write_set(plan: DistillPlan) -> None:
    """Rank 0: every chunk's hypotheses, in order, as the targets of a task shard set in <out>."""
    hypotheses: list[str] = []
    for c in range(plan.num_chunks):
        chunk = read_record(chunk_path(plan, c))
        if chunk.get("fingerprint") != plan.fingerprint or len(chunk.get("hypotheses", [])) != len(plan.chunk_range(c)):
            raise RuntimeError(f"{chunk_path(plan, c)} is missing or not this job's after every rank finished")
        hypotheses += chunk["hypotheses"]
    td = plan.task
    settings = {"task": td.task, "split": plan.split, "max_source_len": td.max_source_len,
                "max_target_len": td.max_target_len, "samples_per_shard": td.samples_per_shard,
                "distilled_from": str(plan.teacher)}
    manifest = write_task_shards(plan.sources, hypotheses, plan.out, load_tokenizer(td.tokenizer), settings=settings,
                                 extra={"task": td.task, "split": plan.split, DISTILLED: plan.record()}, force=True,
                                 files={HYPOTHESES: "".join(h + "\n" for h in hypotheses)})
    print(f"[distill] wrote {manifest['num_samples']} distilled pairs in {len(manifest['shards'])} shard(s) to "
          f"{plan.out} (teacher run {plan.teacher_meta.get('finetune_run_id')}); train on them with "
          f"data.distilled={plan.out}", flush=True)


class OnDisk:
    """Rank 0's display of every rank's progress (configs.progress): the examples in the chunk files on disk."""

    def __init__(self, plan: DistillPlan, enabled: bool):
        self.plan, self.enabled = plan, enabled
        self.n = examples_on_disk(plan) if enabled else 0
        self.bar = progress.bar(len(plan.sources), desc="distill", unit="ex", initial=self.n, enabled=enabled)

    def refresh(self) -> None:
        if self.enabled:
            now = examples_on_disk(self.plan)
            self.bar.update(now - self.n)
            self.n = now

    def close(self) -> None:
        self.refresh()
        self.bar.close()


# --- the command line -------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the AR teacher: a `python -m finetune` output folder")
    parser.add_argument("--split", default="train", help="the split to distill (default: train)")
    parser.add_argument("--out", default="", help="the distilled set's folder (default: <teacher>/distill/<split>)")
    parser.add_argument("--chunk-size", type=int, default=500, help="examples per chunk: the unit of work dealt to "
                                                                    "the ranks and of resumption (default: 500)")
    parser.add_argument("--batch-size", type=int, default=0, help="examples per decoding batch (decode.batch_size)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N examples of the split (0: all)")
    parser.add_argument("--force", action="store_true", help="start over: replace the chunks or the set in --out")
    parser.add_argument("--resume", action="store_true", help="accepted for the launcher: a rerun always resumes")
    parser.add_argument("--validate-only", action="store_true", help="check the job; start nothing")
    parser.add_argument("--world-size", type=int, default=None, help="with --validate-only: the processes to check for")
    parser.add_argument("--json", action="store_true", help="with --validate-only: the job's facts for the launcher")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("overrides", nargs="*", help="key=value on the teacher's finetune config")
    args = core.parse_args(parser, argv)
    return core.cli_main("finetune", args, config_from_args, lambda cfg, world: prepare(cfg, world, args), run,
                         describe, lambda cfg: stage_facts(cfg, args))
