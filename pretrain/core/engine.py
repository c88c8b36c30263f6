"""The one training engine: DeepSpeed (ZeRO 0-3, offload, bf16) over a megatron-core tensor-parallel model.

Finetuning reuses it unchanged: hand it a model, an objective (pretrain.core.objectives interface), a training
loader (iterable of batch dicts with state_dict/load_state_dict; where it has them, counters() reaches the log and
MLflow as data/samples_skipped and data/shards_skipped, and resume_mismatch(state) explains a checkpoint it cannot
continue), factories of held-out loaders (called afresh at every evaluation, so each evaluation reads the same
batches) and, optionally, an extra evaluation function (generation metrics), the job's kind ("pretrain" |
"finetune": log prefix and a tag), its extra MLflow tags, and the facts its weights must carry (`meta`, e.g. the
tokenizer checksum): checkpoints and the exported weights record them with the MLflow run id, the step and the
model config, so a later job can name where its weights came from and refuse a tokenizer they were not trained
with.

Evaluation can rank checkpoints (checkpoint.keep_best: the best are saved and never pruned, pretrain.core.best), stop
training early (train.early_stop_patience) and choose what the final export holds: the last weights, the best
checkpoint's, or a mean of checkpoints (checkpoint.export_from / average, pretrain.core.averaging).

On SIGTERM / SIGINT (pretrain.core.job arms the handlers) training stops where it is and rank 0 closes its MLflow run
as KILLED; any other failure closes it as FAILED.

A step reads `grad_accum` micro-batches on every data-parallel rank. Each micro-batch loss is a mean over its
own targets; it is rescaled by (its targets / the step's targets over all ranks) x dp x accum before
DeepSpeed's backward (which divides by accum and averages over dp), so the gradient is the mean over every
target of the global batch however that batch is split. That is why ZeRO stages, DP sizes and a single
process agree on the same global batch. The step's logic lives in pretrain/core/step.py (host preparation, device
micro-steps without a host sync); this class gives it DeepSpeed's forward, backward and optimizer step.

ZeRO-3 gathers parameters module by module with collectives, so in every micro-step all data-parallel ranks
must run the same modules in the same order: the same objective (checked, from batch["objective"]) and no
data-dependent early stop (ELMER's exits always include the last layer). ZeRO-1/2 have no such constraint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from configs import progress
from model import parallel
from pretrain.core import activation_checkpointing, averaging, best, checkpoint, distributed, job, step
from pretrain.core.config import (EngineConfig, deepspeed_dict, read_deepspeed_json,
                                  resolve_precision, to_dict, to_yaml)
from pretrain.core.export import FINAL_WEIGHTS, export_payload, model_config_dict
from pretrain.core.metrics import MetricSums
from pretrain.core.objectives import Objective
from pretrain.core.schedule import WarmupDecay, build_scheduler
from pretrain.core.tracking import Tracker, launch_tags, source_tags

KINDS = ("pretrain", "finetune")


class ObjectiveModule(nn.Module):
    """What DeepSpeed wraps: the model, with the objective as its forward, so the whole loss runs inside
    DeepSpeed's module hooks (ZeRO-3 gathers parameters there, including the tied head's embedding)."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: it owns no parameters

    def forward(self, batch: dict[str, Any], evaluate: bool = False):
        if evaluate:
            return self.objective.eval_metrics(self.model, batch)
        return self.objective.loss(self.model, batch)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave biases, norms and the mask vector (1-d parameters) alone."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict[str, Any]], cfg: EngineConfig) -> torch.optim.AdamW:
    """torch's fused AdamW: one kernel over all parameters, wherever the optimizer states live (torch ships it for
    CUDA and for CPU: a GPU job, ZeRO-Offload's CPU states and a CPU job alike). On this 2-core VM it steps 58.6M
    parameters in 21 ms against 160 ms for the per-tensor loop that is the CPU default (BENCHMARKS.md, MFU)."""
    o = cfg.optim
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


class Engine:
    def __init__(self, cfg: EngineConfig, model: nn.Module, objective: Objective, train_loader,
                 mpu: distributed.MegatronMpu, *, micro_batch_size: int,
                 eval_loaders: dict[str, Callable[[], Iterable]] | None = None,
                 extra_eval: Callable[[nn.Module], dict[str, float]] | None = None,
                 kind: str = "pretrain", tags: dict[str, Any] | None = None, meta: dict[str, Any] | None = None):
        """micro_batch_size: the loader's nominal batch (DeepSpeed's bookkeeping; the loss scaling uses the real
        target counts). extra_eval(model) -> {name: value} runs after the loss evaluation. kind: "pretrain" or
        "finetune" (log prefix, tag `kind`). tags: more MLflow tags for the run (they win over the engine's).
        meta: JSON-able facts saved in every checkpoint's client state and in the exported weights."""
        import deepspeed

        if kind not in KINDS:
            raise ValueError(f"Engine kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.extra_tags = dict(tags or {})
        self.meta = dict(meta or {})
        self.cfg = cfg
        self.objective = objective
        self.train_loader = train_loader
        self.eval_loaders = eval_loaders or {}
        self.extra_eval = extra_eval
        self.rank0 = distributed.is_rank0()
        self.output_dir = Path(cfg.output_dir)
        self.dp_size, self.dp_rank = parallel.dp_size(), parallel.dp_rank()
        self.precision = resolve_precision(cfg)
        self.zero_stage = int(read_deepspeed_json(cfg).get("zero_optimization", {}).get("stage", 0))

        if cfg.train.activation_checkpointing:
            activation_checkpointing.apply(model)
        self.module = ObjectiveModule(model, objective)
        self.ds_config = deepspeed_dict(cfg, self.dp_size, micro_batch_size, d_model=model.cfg.d_model)
        optimizer = scheduler = None
        factor = WarmupDecay(cfg.schedule.decay, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr_ratio)
        groups = param_groups(model, cfg.optim.weight_decay)
        if cfg.optim.impl == "torch":
            optimizer = adamw(groups, cfg)
            scheduler = build_scheduler(optimizer, factor)
        else:  # DeepSpeed builds the optimizer from ds_config; the schedule is a callable on it
            scheduler = lambda opt: build_scheduler(opt, factor)  # noqa: E731
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, model_parameters=groups if optimizer is None else None, optimizer=optimizer,
            lr_scheduler=scheduler, config=self.ds_config, mpu=mpu)
        self.device = self.ds.device

        self.step = 0  # optimizer updates taken
        self.samples_seen = 0
        self.tokens_seen = 0
        self.run_id: str | None = None
        self.tracker = Tracker(self.output_dir, active=self.rank0, use_mlflow=cfg.tracking.mlflow,
                               uri=cfg.tracking.uri or None, experiment=cfg.tracking.experiment,
                               finish_wait_s=cfg.tracking.finish_wait_s)
        self._epoch_iter: Iterator | None = None
        self._lr = math.nan
        self._sample_log = None
        self.best = best.from_config(cfg)  # checkpoint.keep_best's ranking (None: off)
        self._saved_step = -1

    # --- data -------------------------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, Any]:
        """The next training batch; a loader that ends (an epoch) is simply iterated again."""
        for _ in range(2):
            if self._epoch_iter is None:
                self._epoch_iter = iter(self.train_loader)
            try:
                return next(self._epoch_iter)
            except StopIteration:
                self._epoch_iter = None
        raise RuntimeError("the training loader yields no batches")

    # --- checkpoints ------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """What checkpoints and exports say about the run that wrote them (see `meta` in __init__)."""
        return {**self.meta, "job": self.kind, "mlflow_run_id": self.tracker.run_id or self.run_id,
                "tracking_uri": self.tracker.uri if self.tracker.use_mlflow else None,
                "experiment": self.cfg.tracking.experiment, "model_config": model_config_dict(self.module.model)}

    def save(self) -> str:
        tag = checkpoint.tag_for(self.step)
        if self._saved_step == self.step:  # keep_best saved this step already
            return tag
        client = {**self.record(), "step": self.step, "samples_seen": self.samples_seen,
                  "tokens_seen": self.tokens_seen, "best": self.best.state_dict() if self.best else None}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": checkpoint.rng_state(),
                      "objective": self.objective.state_dict(), "step": self.step}
        tag = checkpoint.save(self.ds, self.cfg.checkpoint_dir(), self.step, client, rank_state,
                              keep_last=self.cfg.checkpoint.keep_last,
                              facts={"objective": self.objective.name, "config": to_dict(self.cfg)},
                              protected=self.best.tags() if self.best else ())
        self._saved_step = self.step
        self.log_line(f"saved checkpoint {self.cfg.checkpoint_dir() / tag}")
        return tag

    def resume(self) -> bool:
        """Load the checkpoint `latest` names, or the newest intact one before it when that one is broken (see
        pretrain.core.checkpoint); False (and a fresh start) when there is none yet. ConfigError (before anything
        is loaded) when this job cannot continue it exactly."""
        ckpt_dir = self.cfg.checkpoint_dir()
        tag = checkpoint.resume_tag(ckpt_dir, say=self.log_line)
        if tag is None:
            self.log_line(f"--resume: no complete checkpoint in {ckpt_dir} ({checkpoint.POINTER} missing); "
                          "starting from step 0")
            return False
        checkpoint.check_continues(ckpt_dir, tag, self.cfg, torch.distributed.get_world_size(), self.objective.name,
                                   getattr(self.train_loader, "resume_mismatch", None))
        client, rank_state = checkpoint.load(self.ds, ckpt_dir, tag)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            # The next update's rate from the current config's schedule (equal to the saved one when unchanged).
            for group, base, factor in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs,
                                           self.scheduler.lr_lambdas):
                group["lr"] = base * factor(self.scheduler.last_epoch)
        self.step = int(client["step"])
        self.samples_seen = int(client.get("samples_seen", 0))
        self.tokens_seen = int(client.get("tokens_seen", 0))
        self.run_id = client.get("mlflow_run_id")
        if self.best is not None and client.get("best") and not self.best.load_state_dict(client["best"]):
            self.log_line(f"the checkpoint ranked {client['best']['metric']}, not {self.best.metric}: ranking afresh")
        self.train_loader.load_state_dict(rank_state["loader"])
        self._epoch_iter = None
        self.objective.load_state_dict(rank_state["objective"])
        checkpoint.set_rng_state(rank_state["rng"])
        self.log_line(f"resumed from {ckpt_dir / tag} at step {self.step}")
        return True

    def export_weights(self, path: Path) -> None:
        """Collective. Rank 0 writes export_payload: the full state dict (TP shards merged, ZeRO-3 partitions
        gathered), the model config, the step and the run record. Weights are in the training dtype of the module
        (fp32, or bf16 under bf16 training). checkpoint.export_from / average may export the best checkpoint or a
        mean of checkpoints instead (pretrain.core.averaging); the record's `export` and the MLflow params
        `export.*` name the step(s) the weights come from."""
        import deepspeed

        from model import sharding

        model = self.module.model
        gather = (deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
                  if self.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            full = sharding.full_state_dict(model)
        if self.rank0:
            source = averaging.choose(self.cfg.checkpoint, self.best, self.cfg.checkpoint_dir(), self.step)
            full = averaging.export_state(source, full, self.cfg.checkpoint_dir(), model)
            record = {k: v for k, v in self.record().items() if k != "model_config"}
            record["export"] = source.record()
            tmp = path.with_name(path.name + ".tmp")
            torch.save(export_payload(full, model_config_dict(model), source.step, record), tmp)
            os.replace(tmp, path)
            self.tracker.log_params(source.params())
            self.log_line(f"exported model weights to {path}: {source.describe()}")
        distributed.barrier()

    # --- tracking ---------------------------------------------------------------------------------------

    def log_line(self, text: str) -> None:
        if self.rank0:  # through the bar: a plain print would land on the bar's line (evaluation, checkpoints)
            progress.write(f"[{self.kind}] {text}")

    def start_tracking(self, params: dict[str, Any], artifacts: list[tuple[Path, str]], run_name: str,
                       datasets: list[tuple[Path, str]] = ()) -> None:
        """Write the resolved configs into output_dir and open the MLflow run (rank 0). artifacts: (file, folder
        inside the run's artifacts); datasets: (shard folder, "training" | "validation"), logged as MLflow
        datasets."""
        if self.rank0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            resolved_yaml = self.output_dir / "config.resolved.yaml"
            resolved_yaml.write_text(to_yaml(self.cfg))
            ds_json = self.output_dir / "deepspeed_config.json"
            ds_json.write_text(json.dumps(self.ds_config, indent=2))
            artifacts = [*artifacts, (resolved_yaml, "resolved"), (ds_json, "resolved")]
        tags = {"kind": self.kind, **source_tags(),
                "world_size": torch.distributed.get_world_size(), "tensor_parallel": parallel.tp_size(),
                "data_parallel": self.dp_size, "zero_stage": self.zero_stage, "precision": self.precision,
                "objective": getattr(self.objective, "name", "?"), **launch_tags(), **self.extra_tags}
        with job.signals_deferred():  # a run half-created would stay RUNNING
            self.tracker.start(run_name, params, tags, artifacts, resume_run_id=self.run_id, datasets=datasets,
                               step=self.step)

    # --- the loop ---------------------------------------------------------------------------------------

    def train_step(self, stats: MetricSums) -> None:
        """One optimizer update over grad_accum micro-batches; adds its figures to `stats` (on the device)."""
        accum = self.cfg.train.grad_accum
        self._lr = float(self.ds.get_lr()[0])  # the rate this update uses
        self.objective.start_step(self.step + 1)
        model_cfg = self.module.model.cfg
        micro = [step.MicroBatch.prepare(self._next_batch(), self.objective, model_cfg) for _ in range(accum)]
        if self.zero_stage == 3 and self.dp_size > 1:
            self._check_same_objective([m.batch for m in micro])
        if self._sample_log is not None:
            for m in micro:
                ids = m.batch["sample_ids"].tolist()  # a host tensor
                self._sample_log.write(json.dumps({"step": self.step + 1, "ids": ids}) + "\n")
        step.train_step(micro, forward=self.ds, backward=self.ds.backward, optimizer_step=self.ds.step,
                        to_device=self._to_device, device=self.device, stats=stats, dp_size=self.dp_size,
                        dp_group=parallel.dp_group())
        self.step += 1

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return step.to_device(batch, self.device)

    def _check_same_objective(self, batches: list[dict[str, Any]]) -> None:
        """ZeRO-3 gathers parameters module by module, collectively: every data-parallel rank must run the same
        modules in the same order, so a micro-step must train the same objective on every rank. One host read per
        step (ZeRO-3 with DP > 1 only): a mismatch must stop the step before its first gather."""
        codes = torch.tensor([zlib.crc32(str(b.get("objective", "")).encode()) for b in batches],
                             dtype=torch.int64).to(self.device)  # nccl takes device tensors
        low, high = codes.clone(), codes.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=parallel.dp_group())
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=parallel.dp_group())
        if not torch.equal(low, high):
            raise RuntimeError(
                f"ZeRO-3 needs every data-parallel rank to train the same objective in a micro-step, but at step "
                f"{self.step + 1} this rank got {[b.get('objective') for b in batches]} and another rank differs. The "
                "loader must draw each batch's objective from a seed shared by all data-parallel ranks (not the rank); "
                "or use ZeRO-1/2, which allow different objectives per rank.")

    def fit(self, params: dict[str, Any] | None = None, artifacts: list[tuple[Path, str]] = (),
            run_name: str = "run", datasets: list[tuple[Path, str]] = ()) -> dict:
        """Train to train.steps (resuming first if asked), evaluating and checkpointing on schedule; returns the
        last logged training figures and the final evaluation (eval/...). params, artifacts, run_name, datasets:
        what the MLflow run records (see start_tracking)."""
        cfg = self.cfg
        if cfg.checkpoint.resume:
            self.resume()
        window = self._new_window()
        bar = None
        status = "FAILED"
        last: dict[str, float] = {}
        try:
            # inside the try: a stop signal held back while the run is created is raised as the block ends, and
            # the finally below must still close that run
            self.start_tracking(params or to_dict(cfg), list(artifacts), run_name, list(datasets))
            if cfg.train.record_sample_ids:
                folder = self.output_dir / "samples"
                folder.mkdir(parents=True, exist_ok=True)
                rank = torch.distributed.get_rank()
                self._sample_log = open(folder / f"rank_{rank:05d}.jsonl", "a" if self.step else "w", buffering=1)
            window_start, window_steps = time.perf_counter(), 0
            bar = self._progress_bar()
            self.ds.train()
            evaluated: dict[str, float] | None = None  # the evaluation of an early stop, at this step
            while self.step < cfg.train.steps:
                self.train_step(window)
                window_steps += 1
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    last = self._log_window(window, time.perf_counter() - window_start, window_steps, bar)
                    window = self._new_window()
                    window_start, window_steps = time.perf_counter(), 0
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < cfg.train.steps:
                    means = self.evaluate()
                    if self.keep_best(means):
                        evaluated = means
                        if window_steps:  # the steps since the last log line
                            last = self._log_window(window, time.perf_counter() - window_start, window_steps, bar)
                        break
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 \
                        and self.step < cfg.train.steps:
                    self.save()
                if bar is not None:
                    bar.update(1)
            if cfg.eval.at_end:
                means = evaluated if evaluated is not None else self.evaluate()
                last.update({f"eval/{k}": v for k, v in means.items()})
                self.keep_best(means)
            if cfg.checkpoint.save_at_end:
                self.save()
            if cfg.checkpoint.export_final:
                self.export_weights(self.output_dir / FINAL_WEIGHTS)
            status = "FINISHED"
        except BaseException as err:
            if isinstance(err, (job.Stopped, KeyboardInterrupt)) or job.stop_signal() is not None:
                status = "KILLED"  # also when this rank got the signal and a peer that stopped first broke a collective
                self.log_line(f"stopped at step {self.step} ({err}); closing the MLflow run as KILLED")
            raise
        finally:
            with job.signals_deferred():  # the run must not stay RUNNING because a second signal came
                if bar is not None:
                    bar.close()
                if self._sample_log is not None:
                    self._sample_log.close()
                    self._sample_log = None
                self.tracker.finish(status)
        return last

    def keep_best(self, means: dict[str, float]) -> bool:
        """Collective, after an evaluation: rank checkpoint.keep_best's metric (rank 0's value on every rank), save
        and keep this step's checkpoint when it ranks among the best (pretrain.core.best). True: stop early
        (train.early_stop_patience evaluations without a new best)."""
        if self.best is None:
            return False
        value = torch.tensor([self.best.value(means)], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():  # the ranks must agree on saving (a collective) and on stopping
            torch.distributed.broadcast(value, src=0)
        if self.best.observe(self.step, float(value)):
            self.save()
        if self.rank0:
            self.best.write(self.cfg.checkpoint_dir())
        if not self.best.should_stop() or self.step >= self.cfg.train.steps:
            return False
        self.log_line(f"early stop at step {self.step}: {self.best.since_best} evaluations without a new best "
                      f"(train.early_stop_patience={self.best.patience}); {self.best.describe()}")
        self.tracker.log_params({"train": {"stopped_early_at": self.step}})
        return True

    def _shows_progress(self) -> bool:
        """Rank 0 shows the run's progress unless train.progress_bar=false or TANDEM_PROGRESS=off."""
        return self.rank0 and self.cfg.train.progress_bar and not progress.switched_off()

    def _progress_bar(self):
        """A bar when stderr is a terminal (loss, tokens/s, ETA); log lines otherwise (_log_window)."""
        if not (self._shows_progress() and progress.on_terminal()):
            return None
        return progress.bar(self.cfg.train.steps, initial=self.step, unit="step", desc=self.kind)

    def _new_window(self) -> MetricSums:
        """The sums of one log window: the objective's metrics on the device; tokens, samples and (when the training
        loader has counters()) its skipped samples as host sums reduced with them, in the window's one all-reduce."""
        extra = ("tokens", "samples") + (("samples_skipped",) if hasattr(self.train_loader, "counters") else ())
        return MetricSums(["loss"] + self.objective.metric_names(), extra=extra, device=self.device)

    def _log_window(self, window: MetricSums, seconds: float, steps: int, bar) -> dict[str, float]:
        counts = self.train_loader.counters() if "samples_skipped" in window.extra else None
        if counts is not None:  # the run's total on this rank, summed over data parallel by the window's reduce
            window.add_extra("samples_skipped", counts["samples_skipped"])
        means, extra = window.reduce()
        tokens, samples = extra["tokens"], extra["samples"]  # summed over data parallel only: TP peers count once
        self.tokens_seen += int(tokens)
        self.samples_seen += int(samples)
        lr = self._lr
        grad_norm = self.ds.get_global_grad_norm()
        metrics = dict(means)
        metrics.update({
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "step_time_s": seconds / max(steps, 1),
            "samples_seen": float(self.samples_seen),
            "tokens_seen": float(self.tokens_seen),
        })
        self.tracker.log_metrics(metrics, self.step, kind="train")
        skipped = ""
        if counts is not None:  # what the loader left out so far in the run: data/samples_skipped, data/shards_skipped
            data = {"samples_skipped": extra["samples_skipped"], "shards_skipped": float(counts["shards_skipped"])}
            self.tracker.log_metrics(data, self.step, kind="data")
            skipped = "".join(f" {k} {v:.0f}" for k, v in data.items() if v)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                            refresh=False)
        elif self._shows_progress():  # no terminal: plain lines with the same figures
            eta = (self.cfg.train.steps - self.step) * metrics["step_time_s"]
            self.log_line(f"step {self.step}/{self.cfg.train.steps} loss {metrics.get('loss', math.nan):.4f} "
                          f"lr {lr:.3g} grad_norm {metrics['grad_norm']:.3f} tok/s {metrics['tokens_per_s']:.0f} "
                          f"eta {eta:.0f}s{skipped}")
        return metrics

    # --- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss figures over `eval.batches` held-out batches of every eval loader (the same batches each time),
        plus `extra_eval`. Training RNG states are restored afterwards, so evaluating never changes training."""
        rng = checkpoint.rng_state()
        self.ds.eval()
        try:
            batches = step.eval_batches(self.objective, self.eval_loaders, self.cfg.eval.batches,
                                        self.module.model.cfg)
            means = step.evaluate(batches, self.objective.eval_metric_names(),
                                  forward=lambda batch: self.ds(batch, evaluate=True), to_device=self._to_device,
                                  device=self.device)
            if self.extra_eval is not None:
                means.update(self.extra_eval(self.module.model))
        finally:
            self.ds.train()
            checkpoint.set_rng_state(rng)
        self.tracker.log_metrics(means, self.step, kind="eval")
        if means:
            self.log_line(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(means.items())))
        return means
