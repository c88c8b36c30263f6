"""What every training job (pretraining, finetuning) does around the engine, in one place.

    cli_main()         the command line: config -> prepare() -> `config ok:` (--validate-only) or train();
                       exit 0, 2 on a ConfigError (`error: ...`; also one raised by train(), such as a checkpoint
                       the job cannot continue), 128 + signal number when stopped by a signal;
                       --validate-only --json prints the stage's facts for the launcher (pretrain.core.facts)
    started(cfg)       process groups up and every generator seeded; torn down however the block ends
    config_artifacts   the job's input files (config, DeepSpeed JSON, data config) for the MLflow run
    stop signals       inside cli_main(), SIGTERM / SIGINT raise `Stopped` in the main thread, so the engine's
                       `finally` runs: rank 0 closes its MLflow run as KILLED instead of leaving it RUNNING

A signal is raised once; a repeat (torchrun and DeepSpeed's launcher forward the signal, a user presses Ctrl-C
twice) is only recorded, and so is one that arrives while the engine cleans up (`signals_deferred`), so the
cleanup itself is never cut short.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from configs import ConfigError
from pretrain.core import facts
from pretrain.core.config import launch_world_size

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """The job received SIGTERM or SIGINT. A BaseException (like KeyboardInterrupt) so that `except Exception`
    in library code does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


class _SignalState:
    def __init__(self):
        self.received: int | None = None  # the first stop signal since the handlers were installed
        self.raised = False
        self.defer = 0  # > 0: inside signals_deferred()


_state = _SignalState()


def _on_signal(signum, frame) -> None:
    if _state.received is None:
        _state.received = signum
    if not _state.raised and _state.defer == 0:
        _state.raised = True
        raise Stopped(signum)


def stop_signal() -> int | None:
    """The stop signal received while the handlers were installed, if any (also when it was not raised)."""
    return _state.received


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Stopped (main thread only; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _state.__init__()
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state.__init__()  # nothing recorded here leaks into later jobs of this process


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A stop signal inside the block is recorded, not raised; it is raised at the end of the block unless an
    exception is already on its way out."""
    _state.defer += 1
    try:
        yield
    finally:
        _state.defer -= 1
    if _state.defer == 0 and _state.received is not None and not _state.raised:
        _state.raised = True
        raise Stopped(_state.received)


# --- the job ------------------------------------------------------------------------------------------------

def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def started(cfg) -> Iterator[Any]:
    """Start torch.distributed and megatron's groups for cfg.parallel.tensor_parallel, seed python, numpy and
    torch with cfg.train.seed; yields DeepSpeed's mpu. The groups are shut down however the block ends."""
    from pretrain.core import distributed

    mpu = distributed.init(cfg.parallel.tensor_parallel, cfg.train.seed)
    try:
        seed_all(cfg.train.seed)
        yield mpu
    finally:
        distributed.shutdown()


def config_artifacts(cfg) -> list[tuple[Path, str]]:
    """The files the job was configured with, as (file, folder in the run's artifacts); those that exist."""
    files = [(cfg.config_file, "config"), (cfg.deepspeed.config, "deepspeed"), (cfg.data.config, "data")]
    return [(Path(f), folder) for f, folder in files if f and Path(f).is_file()]


def cli_main(kind: str, args, load_config: Callable[[Any], Any], prepare: Callable[[Any, int], Any],
         train: Callable[[Any], Any], describe: Callable[[Any], str],
         stage_facts: Callable[[Any], dict[str, list]]) -> int:
    """The body of `python -m <kind>`. args: from pretrain.core.config.cli_parser (config, overrides, resume,
    validate_only, json, world_size, ...); load_config(args) -> config; prepare(config, world size) -> plan (raises
    ConfigError); train(plan); describe(plan) -> the text after `config ok: `; stage_facts(config) -> the recipe's
    part of the --json report (its input files and shard folders, pretrain.core.facts)."""
    world_size = args.world_size or launch_world_size()
    cfg = plan = error = None
    try:
        cfg = load_config(args)
        plan = prepare(cfg, world_size)
    except ConfigError as err:
        error = str(err)
    if args.json:  # even for a refused config: the launcher reports the refusal with its other findings
        report = facts.report(kind, world_size, cfg, error, describe(plan) if plan is not None else None,
                              stage_facts)
        print(json.dumps(report), flush=True)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.validate_only:
        if not args.json:
            print(f"config ok: {describe(plan)}", flush=True)
        return 0
    with stop_on_signals():
        try:
            train(plan)
        except Stopped as stop:
            print(f"[{kind}] {stop}; exiting with code {128 + stop.signum}", file=sys.stderr, flush=True)
            return 128 + stop.signum
        except ConfigError as err:  # found once the job started, e.g. a checkpoint it cannot continue: as above
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
    return 0
