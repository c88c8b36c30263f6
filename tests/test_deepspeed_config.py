"""The DeepSpeed configs as DeepSpeed 0.19 reads them, and the optimizer choice (issue 10, items 4 and 8).

The JSON files in configs/deepspeed/ plus what pretrain.core.config.deepspeed_dict fills in go through DeepSpeed's own
config parser (its ZeRO section is a pydantic model that refuses unknown keys; top-level keys it does not know
are ignored silently, so those are checked against DeepSpeed's constants), and the resolved values are asserted.
A real DeepSpeed engine then takes bf16 steps with gradient accumulation at ZeRO-1, 2 and 3 on the CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import REPO_ROOT
from pretrain import pretrain_config
from pretrain.core import config

TINY = str(REPO_ROOT / "configs" / "pretrain" / "tiny.yaml")
NAMES = ("zero1", "zero2", "zero2_offload", "zero3")


def resolved(name: str, precision: str, d_model: int = 768, *extra: str) -> dict:
    cfg = pretrain_config.load(TINY, [f"deepspeed.config=configs/deepspeed/{name}.json",
                                      f"deepspeed.precision={precision}", "train.grad_accum=4", *extra])
    return config.deepspeed_dict(cfg, dp_size=1, micro_batch_size=8, d_model=d_model)


def top_level_keys_deepspeed_reads() -> set[str]:
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    return {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}


@pytest.mark.parametrize("name", NAMES)
def test_resolved_deepspeed_config_as_deepspeed_reads_it(name):
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = resolved(name, "bf16")
    unknown = set(ds) - top_level_keys_deepspeed_reads()
    assert not unknown, f"keys DeepSpeed would ignore: {unknown}"
    parsed = DeepSpeedConfig(copy.deepcopy(ds))  # the ZeRO section refuses unknown keys (pydantic extra=forbid)
    zero = parsed.zero_config
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (8 * 4, 4)
    # Communication overlapped with the backward where ZeRO reduces during it (stages 2 and 3). ZeRO-1 under bf16
    # runs DeepSpeed's BF16_Optimizer, which all-reduces after the backward and has no such option.
    assert zero.overlap_comm is (zero.stage >= 2)
    if name == "zero3":
        assert zero.param_persistence_threshold == 10 * 768  # norms and biases resident, matrices partitioned
    if name == "zero2_offload":
        assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory is True
    # fp32 training accumulates in fp32 anyway: DeepSpeed's default (the model's dtype), nothing added.
    assert "data_types" not in resolved(name, "fp32")


def test_zero3_persistence_follows_the_model_width():
    """Tiny models (d_model 64) keep being partitioned, so the CPU tests still exercise ZeRO-3's gathering."""
    zero = resolved("zero3", "fp32", 64)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 640
    cfg = pretrain_config.load(TINY, ["deepspeed.config=configs/deepspeed/zero3.json"])
    with pytest.raises(config.ConfigError, match="deepspeed.config: .*zero3.json: stage3_param_persistence_threshold"):
        config.deepspeed_dict(cfg, dp_size=1, micro_batch_size=8)


def test_no_zero_keeps_bf16_accumulation(tmp_path):
    """Without ZeRO DeepSpeed has no fp32 accumulation for bf16 weights (it raises NotImplementedError)."""
    plain = tmp_path / "zero0.json"
    plain.write_text('{"zero_optimization": {"stage": 0}}')
    cfg = pretrain_config.load(TINY, [f"deepspeed.config={plain}", "deepspeed.precision=bf16"])
    assert "data_types" not in config.deepspeed_dict(cfg, dp_size=1, micro_batch_size=8)


def test_data_types_belong_to_the_typed_config(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}}')
    cfg = pretrain_config.load(TINY, [f"deepspeed.config={bad}"])
    with pytest.raises(config.ConfigError, match=r"deepspeed.config: .*sets \['data_types'\]"):
        config.validate_engine(cfg, 1)


def test_deepspeed_optimizer_is_refused_unless_its_op_is_prebuilt():
    """optim.impl=deepspeed would JIT-compile FusedAdam (CPUAdam under offload) at the first step; this install
    (DS_BUILD_OPS=0) has neither prebuilt, so validation refuses it, naming the field and the way out."""
    from deepspeed.git_version_info import installed_ops

    assert not installed_ops["fused_adam"] and not installed_ops["cpu_adam"]
    for name, op in (("zero1", "fused_adam"), ("zero2_offload", "cpu_adam")):
        cfg = pretrain_config.load(TINY, ["optim.impl=deepspeed", f"deepspeed.config=configs/deepspeed/{name}.json"])
        with pytest.raises(config.ConfigError) as err:
            config.validate_engine(cfg, 1)
        assert f"tiny.yaml: optim.impl: 'deepspeed' uses DeepSpeed's {op} op" in str(err.value)
        assert "optim.impl=torch" in str(err.value)
    base = pretrain_config.load(REPO_ROOT / "configs" / "pretrain" / "base.yaml")
    assert base.optim.impl == "torch"


def test_adamw_is_torchs_fused_kernel_on_this_cpu_too():
    """The engine's AdamW is torch's fused kernel here as on CUDA, and it moves weights as the per-tensor loop does
    (float rounding apart: 1e-6)."""
    from pretrain.core.engine import adamw

    cfg = pretrain_config.load(TINY)
    torch.manual_seed(0)
    fused, loop = (torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2))
    loop.data.copy_(fused.data)
    start = fused.detach().clone()
    opt = adamw([{"params": [fused], "weight_decay": 0.01}], cfg)
    assert opt.defaults["fused"] is True
    reference = torch.optim.AdamW([{"params": [loop], "weight_decay": 0.01}], lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    for _ in range(3):
        grad = torch.randn(64, 32)
        fused.grad, loop.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    assert (fused.detach() - loop.detach()).abs().max() < 1e-6
    assert (fused.detach() - start).abs().max() > 1e-4  # the weights moved


@pytest.mark.parametrize("name, optimizer_class", [("zero1", "BF16_Optimizer"), ("zero2", "DeepSpeedZeroOptimizer"),
                                                   ("zero3", "DeepSpeedZeroOptimizer_Stage3")])
def test_bf16_steps_with_fp32_accumulation(name, optimizer_class, monkeypatch):
    """A real DeepSpeed engine on this CPU takes bf16 steps over 2 accumulated micro-batches with the resolved
    config; the gradient is accumulated in fp32 and the weights move."""
    import deepspeed

    from model import parallel
    from pretrain.core.engine import adamw

    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; this is a world of one
    parallel.ensure_initialized(seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    cfg = pretrain_config.load(TINY, [f"deepspeed.config=configs/deepspeed/{name}.json", "deepspeed.precision=bf16",
                             "train.grad_accum=2"])
    ds = config.deepspeed_dict(cfg, dp_size=1, micro_batch_size=4, d_model=64)
    opt = adamw([{"params": list(model.parameters())}], cfg)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    assert type(optimizer).__name__ == optimizer_class
    before = [p.detach().float().clone() for p in model.parameters()]
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    losses = []
    for _ in range(2 * 3):  # three optimizer steps
        loss = (engine(x).float() - 1.0).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert engine.global_steps == 3
    if name != "zero3":
        after = [p.detach().float() for p in model.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert losses[-1] < losses[0]
