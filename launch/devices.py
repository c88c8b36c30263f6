"""What torch sees on this node, asked of a Python subprocess: launch/ imports no torch, so it stays light beside
the job it supervises, and the answer is the one of the interpreter and environment the ranks run with.

Used for the layout (how many ranks a node with unset procs_per_node gets: its CUDA devices) and by preflight's
accelerator check (CUDA devices and NCCL for a GPU job, gloo for a CPU one).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

from configs import ConfigError

PROBE = """
import json
import torch
import torch.distributed as dist

cuda = torch.cuda.is_available()
nccl = None
if cuda and dist.is_nccl_available():
    version = torch.cuda.nccl.version()
    nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
print(json.dumps({"torch": torch.__version__, "cuda_build": torch.version.cuda,
                  "cuda_devices": torch.cuda.device_count() if cuda else 0, "nccl_backend": dist.is_nccl_available(),
                  "nccl": nccl, "gloo": dist.is_gloo_available()}))
"""
PROBE_TIMEOUT_S = 300.0  # importing torch: seconds normally, longer on a busy node


@dataclass(frozen=True)
class Devices:
    torch: str  # torch's version
    cuda_build: str | None  # the CUDA version torch was built with (None: a CPU build)
    cuda_devices: int  # visible CUDA devices (0 without CUDA)
    nccl_backend: bool  # torch.distributed has NCCL
    nccl: str | None  # NCCL's version, when CUDA and NCCL are there
    gloo: bool  # torch.distributed has gloo


def probe(env: Mapping[str, str] | None = None, python: str = sys.executable) -> Devices:
    """Ask `python` (with environment `env`; None: this process's) what torch sees; ConfigError when it cannot
    answer (no torch in that interpreter, a crash, no answer in time). Asked once per interpreter and environment."""
    return _probe(python, tuple(sorted((os.environ if env is None else env).items())))


@functools.lru_cache(maxsize=8)
def _probe(python: str, env: tuple[tuple[str, str], ...], timeout_s: float = PROBE_TIMEOUT_S) -> Devices:
    try:
        proc = subprocess.run([python, "-c", PROBE], env=dict(env), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{python}: torch did not say which devices it sees within {timeout_s:g}s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-5:])
        raise ConfigError(f"{python}: cannot ask torch which devices it sees (exit code {proc.returncode}):\n{tail}")
    return Devices(**json.loads(proc.stdout.strip().splitlines()[-1]))
