"""A fake-CUDA dry run: the training step, evaluation and decoding run over tensors whose device is "cuda" on a
machine without a GPU, under torch's FakeTensorMode (shapes, dtypes and devices, no data) and torch's fake process
group (collectives at any world size, no communication), with megatron-core's groups built over it.

What it checks, on every CPU CI run (tests/test_fake_cuda.py):
- every tensor a step touches lives on the model's device: FakeTensorMode raises when an op mixes a cpu and a cuda
  tensor, and `DeviceDiscipline` raises on a copy between host and device inside the step (only the batch enters
  the device, through `FakeDevice.batch`) and on a host tensor handed to a collective (nccl takes CUDA tensors only);
- no host syncs: reading a device value on the host (.item(), bool(t), int(t), float(t), .tolist(), a copy to the
  host, an op whose output shape depends on the data such as nonzero or boolean-mask indexing) raises under
  `strict()`; `counting()` answers such reads with a fixed value and counts them instead (decoding may read one stop
  flag per decoded token).
The same machinery can run a real configuration (a memory plan): nothing is allocated.

What torch 2.13's CPU build needs for "cuda" fake tensors (measured):
1. A CUDA device guard. Python indexing, int(t), `.to(device)` and other bindings take a device guard for the
   tensor's device before dispatch; a CPU build registers none for CUDA ("PyTorch is not linked with support for
   cuda devices"). FakeTensorMode installs a no-op one only on CUDA builds without a GPU. `_cuda_guard` registers
   torch's own no-op Python device guard (torch._C._acc.DeviceGuard, the PrivateUse1 test hook) in the CUDA slot of
   c10's guard registry while a dry run is active, and removes it afterwards.
2. Backward over cuda tensors needs a CUDA *accelerator*: the autograd engine takes each node's stream from
   at::getAccelerator(), which a CPU build cannot provide (it asserts "opt_ready_stream && opt_parent_stream").
   So on a CPU build the forward runs on "cuda" and forward + backward run again on "meta", which, like cuda, must
   not mix with cpu tensors, and on which every host read raises the same way. With a GPU both are "cuda"; a CUDA
   build without one (torch's default wheel on a CPU machine) cannot run that backward either and runs as a CPU
   build does (measured with torch 2.11.0+cu130, bench/gpu_rehearsal.sh).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


class DeviceDisciplineError(RuntimeError):
    """A host sync, a host<->device copy or a host tensor in a collective where the step allows none."""


# --- 1. a CUDA device guard on CPU builds ---------------------------------------------------------------------

_CUDA_SLOT = 1  # c10::DeviceType::CUDA, its index in c10::impl::device_guard_impl_registry
_PRIVATEUSE1_SLOT = 20
_guard_pointer: int | None = None


def cuda_is_built() -> bool:
    return torch.backends.cuda.is_built()


def cuda_can_backward() -> bool:
    """Whether autograd can run backward over (fake) cuda tensors here: it needs a CUDA build *and* a GPU (a CUDA
    build without one fails in the engine with "hasPrimaryContext expects a valid device index")."""
    return cuda_is_built() and torch.cuda.is_available()


def _registry():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return (ctypes.c_void_p * (_PRIVATEUSE1_SLOT + 1)).in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")


@contextlib.contextmanager
def _cuda_guard() -> Iterator[None]:
    """A no-op CUDA device guard for the duration of the block (CPU builds only; see the module docstring)."""
    global _guard_pointer
    if cuda_is_built():
        yield
        return
    registry = _registry()
    if registry[_CUDA_SLOT]:
        yield  # already installed by an enclosing dry run
        return
    if _guard_pointer is None:
        from torch._C._autograd import DeviceType

        class CudaNoOpGuard(torch._C._acc.DeviceGuard):
            def type_(self):
                return DeviceType.CUDA

        # The only way torch offers to register a Python guard is for PrivateUse1: register it there, move the
        # pointer to the CUDA slot and leave PrivateUse1 as it was (empty). torch keeps a reference to the guard.
        if registry[_PRIVATEUSE1_SLOT] or not torch._C._acc.register_python_privateuseone_device_guard(CudaNoOpGuard()):
            raise RuntimeError("dry run: the PrivateUse1 device guard slot is taken; cannot install a CUDA guard")
        _guard_pointer = registry[_PRIVATEUSE1_SLOT]
        registry[_PRIVATEUSE1_SLOT] = None
    registry[_CUDA_SLOT] = _guard_pointer
    try:
        yield
    finally:
        registry[_CUDA_SLOT] = None


# --- the checks -----------------------------------------------------------------------------------------------

def _caller_frame():
    """The innermost frame outside torch and this module: the code that asked for a sync or a copy."""
    frame = sys._getframe(1)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and (frame.f_code.co_filename.startswith(torch_dir)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame


def _site(frame) -> str:
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


@dataclasses.dataclass
class Events:
    """Host syncs and host->device copies seen in a `counting()` block, each counted once per call site run
    (a .tolist() of n values is one sync, not n)."""
    syncs: Counter = dataclasses.field(default_factory=Counter)  # call site -> reads
    copies: Counter = dataclasses.field(default_factory=Counter)  # call site -> host->device copies
    _last: tuple | None = None

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def n_copies(self) -> int:
        return sum(self.copies.values())


class DeviceDiscipline(TorchDispatchMode):
    """Sees every op before FakeTensorMode does. strict: a host sync or a host<->device copy raises. Otherwise
    (`answer` set) a host read returns `answer` and is counted, as is a host->device copy."""

    supports_higher_order_operators = True  # FlexAttention is one: passed through to FakeTensorMode's rule

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.answer: float | None = None
        self.events: Events | None = None

    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device.type

    def _sync(self, what: str, func, args):
        frame = _caller_frame()
        if self.events is None:
            raise DeviceDisciplineError(f"host sync in the step: {what} ({func}) at {_site(frame)}")
        # One Python-level read (a .tolist() reads every element, with only views and device queries between the
        # reads) counts once: the same frame and instruction, and no other op since (see __torch_dispatch__).
        key = (id(frame), None if frame is None else frame.f_lasti)
        if key != self.events._last:
            self.events.syncs[_site(frame)] += 1
        self.events._last = key

    def _copy(self, what: str):
        frame = _caller_frame()
        if self.events is None:
            raise DeviceDisciplineError(f"host-to-device copy in the step ({what}) at {_site(frame)}: create the "
                                        "tensor on the device instead")
        self.events.copies[_site(frame)] += 1
        self.events._last = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.events is not None and func is not aten._local_scalar_dense.default \
                and not getattr(func, "is_view", False) and func is not torch.ops.prim.device.default:
            self.events._last = None  # real work since the last read: a new read is a new sync
        if func is aten._local_scalar_dense.default:
            if self.events is None or self._on_device(args[0]):  # a host value read after a copy is no new sync
                self._sync("a read of a device value", func, args)
            value = self.answer
            dtype = args[0].dtype
            return bool(value) if dtype == torch.bool else (float(value) if dtype.is_floating_point else int(value))
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst_device = torch.device(args[0].device if func is aten.copy_.default
                                      else kwargs.get("device") or src.device)
            if src.device.type == "cpu" and dst_device.type == self.device.type:
                self._copy(f"{tuple(src.shape)} {src.dtype}")
            elif self._on_device(src) and dst_device.type == "cpu":
                self._sync("a copy to the host", func, args)
        if getattr(func, "namespace", None) in ("c10d", "_c10d_functional"):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            host = [tuple(t.shape) for t in tensors if not self._on_device(t)]
            if host:
                raise DeviceDisciplineError(f"host tensor(s) {host} handed to the collective {func} at "
                                            f"{_site(_caller_frame())}: nccl takes {self.device.type} tensors only")
        try:
            return func(*args, **kwargs)
        except DynamicOutputShapeException as err:  # nonzero, boolean-mask indexing, unique, ...
            raise DeviceDisciplineError(f"host sync in the step: {func} has an output shape that depends on the "
                                        f"data (the host waits for the device) at {_site(_caller_frame())}") from err


# --- the fake device ------------------------------------------------------------------------------------------

class FakeDevice:
    """FakeTensorMode on one device plus the discipline checks. Use as a context manager; inside, `strict()` and
    `counting()` choose how host syncs are treated (strict is the default)."""

    def __init__(self, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.mode = FakeTensorMode(allow_non_fake_inputs=False)
        self.discipline = DeviceDiscipline(self.device)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "FakeDevice":
        self._stack = contextlib.ExitStack()
        if self.device.type == "cuda":
            self._stack.enter_context(_cuda_guard())
        self._stack.enter_context(self.mode)
        self._stack.enter_context(self.discipline)
        self._stack.enter_context(_flex_without_compile())
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        stack.__exit__(*exc)

    def fake(self, t: torch.Tensor) -> torch.Tensor:
        """A fake tensor on the device with t's shape, dtype and requires_grad (its values are not kept)."""
        with _disable_current_modes():
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        out = self.mode.fake_tensor_converter.from_meta_and_device(self.mode, meta, self.device)
        return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out

    def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The host batch on the device: the one host-to-device copy a step makes."""
        return {k: self.fake(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @property
    def can_backward(self) -> bool:
        """Whether autograd can run backward over this device's tensors here (module docstring, point 2)."""
        return self.device.type != "cuda" or cuda_can_backward()

    def build(self, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """A module built inside the fake mode with the device as default: its parameters are fake device
        tensors, nothing is allocated."""
        with self.mode, torch.device(self.device):
            return factory()

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        previous = self.discipline.answer, self.discipline.events
        self.discipline.answer, self.discipline.events = None, None
        try:
            yield
        finally:
            self.discipline.answer, self.discipline.events = previous

    @contextlib.contextmanager
    def counting(self, answer: float = 0) -> Iterator[Events]:
        """Host reads return `answer` (bool(answer) for bool tensors) and are counted, as are host->device copies."""
        previous = self.discipline.answer, self.discipline.events
        events = Events()
        self.discipline.answer, self.discipline.events = answer, events
        try:
            yield events
        finally:
            self.discipline.answer, self.discipline.events = previous


@contextlib.contextmanager
def _flex_without_compile() -> Iterator[None]:
    """FlexAttention's eager entry wraps its kernel in torch.compile(fullgraph=True), which refuses to trace while
    a dispatch mode of ours (DeviceDiscipline) is active. torch's debug switch calls the kernel's operator
    directly instead; FakeTensorMode's rule for it gives the output. Forward only: the switch has no backward, so
    the dry run checks FlexAttention in forward passes (backward passes use SDPA)."""
    import torch.nn.attention.flex_attention as flex

    previous = flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = previous


def pass_devices() -> tuple[str, str]:
    """(forward device, backward device): ("cuda", "cuda") where a GPU is; ("cuda", "meta") elsewhere, whose
    autograd engine cannot run backward over cuda tensors (module docstring, point 2)."""
    return ("cuda", "cuda") if cuda_can_backward() else ("cuda", "meta")


# --- the fake world -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fake_world(world_size: int = 1, tensor_parallel: int = 1, seed: int = 0) -> Iterator[None]:
    """torch.distributed over the fake process group (this process plays rank 0 of `world_size`), megatron-core's
    tensor/data-parallel groups over it, and the RNGs seeded as model.parallel seeds them. A world this process
    had before is shut down first (a test process reuses one); the next `model.parallel.ensure_initialized()`
    starts a fresh one."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model import parallel

    _shutdown()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        # No gloo groups: megatron builds them for CPU-side collectives we never use, and gloo needs a real store.
        parallel.initialize(tensor_parallel, seed, gloo_groups=False)
        yield
    finally:
        _shutdown()


def _shutdown() -> None:
    from model import parallel

    parallel.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the step -------------------------------------------------------------------------------------------------

def train_step(device: FakeDevice, model: torch.nn.Module, objective, host_batches: list[dict[str, Any]]):
    """pretrain.core.step.train_step on the fake device: the batches prepared on the host (the objective's draws, the
    counts), then every micro-step under `strict()` with the objective as forward (what DeepSpeed wraps,
    pretrain.core.engine.ObjectiveModule) and autograd's backward where the device allows one. DeepSpeed's optimizer
    step is not part of the dry run (DeepSpeed does not run under FakeTensorMode). Call it inside the device's
    block; returns the step's MetricSums (on the device, not yet reduced)."""
    from model import parallel
    from pretrain.core import step
    from pretrain.core.engine import ObjectiveModule
    from pretrain.core.metrics import MetricSums

    with _disable_current_modes():  # host work on real host tensors, as in the engine
        objective.start_step(1)
        micro = [step.MicroBatch.prepare(b, objective, model.cfg) for b in host_batches]
    module = ObjectiveModule(model, objective)
    stats = MetricSums(["loss"] + objective.metric_names(), extra=("tokens", "samples"), device=device.device)
    backward = (lambda loss: loss.backward()) if device.can_backward else (lambda loss: None)
    with device.strict():
        step.train_step(micro, forward=module, backward=backward, optimizer_step=lambda: None,
                        to_device=device.batch, device=device.device, stats=stats, dp_size=parallel.dp_size(),
                        dp_group=parallel.dp_group())
    return stats
