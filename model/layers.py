"""Transformer layers on megatron-core tensor-parallel linears.

Q/K/V and FFN-in are column-parallel (each rank holds n_heads/tp heads, d_ffn/tp units), attention-out and
FFN-out are row-parallel (their outputs are all-reduced). The fused QKV weight is laid out per head
([head][q|k|v][head_dim] rows) so that megatron's contiguous row split hands every rank whole heads.

At TP=1 both run as F.linear (ColumnLinear, RowLinear): its addmm adds the bias inside the GEMM, where megatron's
forward adds it in a second pass over every output (one more read and write of each activation). At TP>1 they run
megatron's forward, whose input-gradient all-reduce overlaps the weight-gradient GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from model import parallel
from model.attention import attend, resolve_backend
from model.config import ModelConfig


def normal_init(std: float):
    def init(weight: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(weight, mean=0.0, std=std)

    return init


class _TiedProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # A detached alias, as F.linear's saved transpose is: it keeps the weight as the forward saw it, even if
        # ZeRO-3 re-partitions the parameter before this backward runs.
        ctx.save_for_backward(hidden, weight.detach())
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad
        grad_hidden = grad @ weight if needs_hidden else None
        grad_weight = None
        if needs_weight:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ hidden.reshape(-1, hidden.shape[-1])
        return grad_hidden, grad_weight


def tied_projection(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T for the output head that shares its [V, D] weight with the token lookup.

    Same values as F.linear; what differs is the weight's gradient. F.linear's is the transposed view of a [D, V]
    product, which autograd will not add into in place, so summing it with the lookup's gradient allocates a
    third [V, D] tensor every step (94 MB at the base shape; on the 2-core CPU that add took 25 ms of a 1.6 s step,
    the in-place one 3 ms). Here it is one [V, D] product of its own, and the lookup's gradient is added into it
    in place.
    """
    return _TiedProjection.apply(hidden, weight)


class BiasInGemmAtTp1:
    """Mixed in before a megatron-core linear: F.linear at TP=1, megatron's forward at TP>1 (module docstring)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if parallel.tp_size() == 1:
            return F.linear(x, self.weight, self.bias), None
        return super().forward(x)


class ColumnLinear(BiasInGemmAtTp1, ColumnParallelLinear):
    """megatron-core's column-parallel linear (gather_output=False)."""


class RowLinear(BiasInGemmAtTp1, RowParallelLinear):
    """megatron-core's row-parallel linear (input_is_parallel=True)."""


def column(cfg: ModelConfig, d_in: int, d_out: int) -> ColumnLinear:
    return ColumnLinear(d_in, d_out, config=parallel.megatron_config(), init_method=normal_init(cfg.init_std),
                        bias=True, gather_output=False, tp_group=parallel.tp_group())


def row(cfg: ModelConfig, d_in: int, d_out: int) -> RowLinear:
    return RowLinear(d_in, d_out, config=parallel.megatron_config(), init_method=normal_init(cfg.init_std),
                     bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=parallel.tp_group())


@dataclass
class KVCache:
    """Per-layer self-attention keys/values of the main stream only, and the encoder's cross-attention keys/values."""

    self_k: list[torch.Tensor | None]
    self_v: list[torch.Tensor | None]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None]

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers, [None] * n_layers)

    @property
    def length(self) -> int:
        return 0 if self.self_k[0] is None else self.self_k[0].shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        self.self_k = [pick(t) for t in self.self_k]
        self.self_v = [pick(t) for t in self.self_v]
        self.cross_kv = [None if kv is None else (pick(kv[0]), pick(kv[1])) for kv in self.cross_kv]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.cross = cross
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.n_heads // parallel.tp_size()
        self.dropout = cfg.attention_dropout
        self.backend = cfg.attention_backend
        d = cfg.d_model
        if cross:
            self.q = column(cfg, d, d)
            self.kv = column(cfg, d, 2 * d)
        else:
            self.qkv = column(cfg, d, 3 * d)
        self.out = row(cfg, d, d)

    def _heads(self, x: torch.Tensor, parts: int) -> list[torch.Tensor]:
        B, L, _ = x.shape
        x = x.view(B, L, self.local_heads, parts, self.head_dim).permute(3, 0, 2, 1, 4)  # parts, B, h, L, hd
        return list(x.unbind(0))

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(self.kv(memory)[0], 2)
        return k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple]:
        """mask: [B, L_q, L_k] bool (True = visible), or a FlexAttention BlockMask. `past` (self-attention): cached
        keys/values prepended to the new ones. Returns the output and the keys/values attended to (past + new), so
        that a cache can keep a prefix of them without concatenating again."""
        if self.cross:
            (q,) = self._heads(self.q(x)[0], 1)
            k, v = kv if kv is not None else self.project_kv(memory)
        else:
            q, k, v = self._heads(self.qkv(x)[0], 3)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        # A few new rows against the cache: no tiles worth skipping, SDPA.
        backend = "sdpa" if past is not None else resolve_backend(self.backend, q.device, p)
        if p > 0 and parallel.tp_size() > 1:
            with parallel.rng_tracker().fork():  # heads differ per TP rank, so must their dropout
                ctx = attend(q, k, v, mask, dropout_p=p, backend=backend)
        else:
            ctx = attend(q, k, v, mask, dropout_p=p, backend=backend)
        B, _, L, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(B, L, self.local_heads * self.head_dim)
        return self.out(ctx)[0], (k, v)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = column(cfg, cfg.d_model, cfg.d_ffn)
        self.fc_out = row(cfg, cfg.d_ffn, cfg.d_model)
        self.act = F.gelu if cfg.activation == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)[0]))[0]


class Sublayer(nn.Module):
    """Residual + dropout + LayerNorm around one block; post-LN (BART) or pre-LN (mBART)."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.block = block
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.pre = cfg.norm == "pre"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.block(self.norm(x) if self.pre else x, *args, **kwargs)
        out, extra = out if isinstance(out, tuple) else (out, None)
        y = x + self.dropout(out)
        return (y if self.pre else self.norm(y)), extra


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Sublayer(cfg, Attention(cfg, cross=False))
        self.ffn = Sublayer(cfg, FeedForward(cfg))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x, _ = self.self_attn(x, mask)
        x, _ = self.ffn(x)
        return x


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Sublayer(cfg, Attention(cfg, cross=False))
        self.cross_attn = Sublayer(cfg, Attention(cfg, cross=True))
        self.ffn = Sublayer(cfg, FeedForward(cfg))

    def forward(self, x, self_mask, memory, cross_mask, cross_kv=None, past=None):
        """Returns the new states and the self-attention keys/values (cached past + this step's)."""
        x, new_kv = self.self_attn(x, self_mask, past=past)
        x, _ = self.cross_attn(x, cross_mask, memory=memory, kv=cross_kv)
        x, _ = self.ffn(x)
        return x, new_kv
