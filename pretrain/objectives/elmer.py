"""ELMER's layer-permutation language modelling (LPLM, methods.md §2.3).

Every target slot (mask slots, bidirectional decoder) exits at a layer drawn uniformly from 1..L; its state
there goes through the one tied LM head, and later layers see a detached copy. The exit layers come from this
objective's own torch.Generator, which is checkpointed, so a resumed run draws the same layers; they are drawn on
the host (`prepare`) and travel with the batch as batch["exit_layers"].
"""
from __future__ import annotations

from typing import Any

import torch

from model.config import SPECIAL
from model.streams import build_streams
from pretrain.core.objectives import Metrics, Objective, masked_sum, register


@register("elmer")
class ElmerObjective(Objective):
    def __init__(self, n_layers: int, label_smoothing: float = 0.0, seed: int = 0):
        self.n_layers = n_layers
        self.label_smoothing = label_smoothing
        self.generator = torch.Generator().manual_seed(seed)

    def metric_names(self) -> list[str]:
        return ["elmer/loss"] + [f"elmer/loss_exit{l}" for l in range(1, self.n_layers + 1)]

    def eval_metric_names(self) -> list[str]:
        return ["elmer/ar_loss", "elmer/nar_loss"] + [f"elmer/loss_exit{l}" for l in range(1, self.n_layers + 1)]

    def _slot_losses(self, model, batch: dict[str, Any], exit_layers: torch.Tensor, label_smoothing: float,
                     depth: int | None = None):
        tgt = batch["tgt_tokens"]
        streams = build_streams("nar_bidir", tgt_positions=batch["tgt_positions"], tgt_mask=tgt != SPECIAL.pad)
        # Training reads nothing back (every layer runs; the draws include the last); evaluation at a fixed exit
        # layer runs that depth.
        hidden = model(batch["src_tokens"], streams, exit_layers=exit_layers, stop_when_all_exited=False,
                       depth=depth).hidden
        return model.token_loss(hidden, tgt, label_smoothing)  # [B, T]

    def draw_exits(self, real: torch.Tensor) -> torch.Tensor:
        """Exit layers [B, T], uniform in 1..L, on real's device (drawn on the host). Pad rows (no loss, masked as
        keys) exit at L, so the decoder runs all L layers on every rank: ZeRO-3 gathers parameters layer by layer
        and needs every data-parallel rank to run the same layers. Should a batch without pads draw no L at all
        (probability (1-1/L)^targets), its last target is moved to L."""
        real_host = real.cpu()
        exits = torch.randint(1, self.n_layers + 1, real_host.shape, generator=self.generator)
        exits = torch.where(real_host, exits, torch.full_like(exits, self.n_layers))
        if not bool((exits == self.n_layers).any()):
            exits[-1, -1] = self.n_layers
        return exits.to(real.device)

    def prepare(self, batch: dict[str, Any], evaluate: bool = False) -> dict[str, Any]:
        if evaluate or "exit_layers" in batch:  # evaluation runs every fixed exit layer, drawing nothing
            return batch
        return {**batch, "exit_layers": self.draw_exits(batch["tgt_tokens"] != SPECIAL.pad)}

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        batch = self.prepare(batch)  # a no-op for the engine's batches, prepared on the host
        tgt = batch["tgt_tokens"]
        real = tgt != SPECIAL.pad
        exits = batch["exit_layers"]
        per_token = self._slot_losses(model, batch, exits, self.label_smoothing)
        total = (per_token * real).sum()
        n_real = real.sum()
        metrics: Metrics = {"elmer/loss": (total.detach(), n_real.to(total.dtype))}
        for l in range(1, self.n_layers + 1):
            metrics[f"elmer/loss_exit{l}"] = masked_sum(per_token, real & (exits == l))
        return total / n_real.clamp(min=1), metrics

    @torch.no_grad()
    def eval_metrics(self, model, batch: dict[str, Any]) -> Metrics:
        """NAR view at every fixed exit layer (the last is `nar_loss`), and the AR view (gold prefix, BANG AR
        stream) on the same targets. Draws nothing from the training generator."""
        tgt = batch["tgt_tokens"]
        real = tgt != SPECIAL.pad
        metrics: Metrics = {}
        for l in range(1, self.n_layers + 1):
            per_token = self._slot_losses(model, batch, torch.full_like(tgt, l), 0.0, depth=l)
            metrics[f"elmer/loss_exit{l}"] = masked_sum(per_token, real)
        metrics["elmer/nar_loss"] = metrics[f"elmer/loss_exit{self.n_layers}"]
        streams = build_streams("bang_ar", prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                                tgt_mask=real)
        hidden = model.decode(model.encode(batch["src_tokens"]), streams).hidden
        metrics["elmer/ar_loss"] = masked_sum(model.token_loss(streams.slice(hidden, "predict0"), tgt), real)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
