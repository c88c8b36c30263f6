"""BANG pretraining loss (methods.md §1.4): n cross-stream-visible predicting streams over the masked span.

Stream s predicts y_i with the s preceding tokens masked; it is trained only on targets with at least s in-span
predecessors (span_index >= s). L = sum_s w_s * sum_i CE_s(i) * 1[span_index_i >= s] / (number of real targets).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from model.config import SPECIAL
from model.streams import build_streams
from pretrain.core.objectives import Metrics, Objective, masked_sum, register


@register("bang")
class BangObjective(Objective):
    def __init__(self, n_streams: int, stream_weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
        if n_streams < 1:
            raise ValueError(f"objective.bang.n_streams={n_streams}: must be at least 1")
        weights = list(stream_weights) if stream_weights else [1.0] * n_streams
        if len(weights) != n_streams:
            raise ValueError(f"objective.bang.stream_weights has {len(weights)} entries; n_streams={n_streams}")
        self.n_streams = n_streams
        self.stream_weights = weights
        self.label_smoothing = label_smoothing

    def metric_names(self) -> list[str]:
        return ["bang/loss"] + [f"bang/loss_s{s}" for s in range(self.n_streams)]

    def eval_metric_names(self) -> list[str]:
        return self.metric_names() + ["bang/ar_loss", "bang/nar_loss"]

    def _stream_losses(self, model, batch: dict[str, Any], label_smoothing: float) -> torch.Tensor:
        """Per-token losses [n, B, T] of the predicting streams (one vocab projection for all of them)."""
        tgt = batch["tgt_tokens"]
        streams = build_streams("bang", prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                                tgt_mask=tgt != SPECIAL.pad, n_predict=self.n_streams)
        hidden = model.decode(model.encode(batch["src_tokens"]), streams).hidden
        n, (B, T) = self.n_streams, tgt.shape
        predict = hidden[:, T:]  # the predicting streams follow the main stream: [B, n*T, D]
        per_token = model.token_loss(predict, tgt.repeat(1, n), label_smoothing)  # [B, n*T]
        return per_token.view(B, n, T).transpose(0, 1)

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        tgt, span = batch["tgt_tokens"], batch["span_index"]
        real = tgt != SPECIAL.pad
        per_stream = self._stream_losses(model, batch, self.label_smoothing)
        total = per_stream.new_zeros(())
        metrics: Metrics = {}
        for s in range(self.n_streams):
            trained = real & (span >= s)
            total = total + self.stream_weights[s] * (per_stream[s] * trained).sum()
            metrics[f"bang/loss_s{s}"] = masked_sum(per_stream[s], trained)
        n_real = real.sum()
        loss = total / n_real.clamp(min=1)
        metrics["bang/loss"] = (total.detach(), n_real.to(total.dtype))
        return loss, metrics

    @torch.no_grad()
    def eval_metrics(self, model, batch: dict[str, Any]) -> Metrics:
        """Per-stream losses (stream 0 is the AR view: it sees every gold predecessor) and the NAR view (BANG
        NAR: causal among mask slots, no gold target token visible)."""
        _, metrics = self.loss(model, batch)
        metrics["bang/ar_loss"] = metrics["bang/loss_s0"]
        tgt = batch["tgt_tokens"]
        real = tgt != SPECIAL.pad
        streams = build_streams("nar_causal", tgt_positions=batch["tgt_positions"], tgt_mask=real)
        hidden = model.decode(model.encode(batch["src_tokens"]), streams).hidden
        metrics["bang/nar_loss"] = masked_sum(model.token_loss(hidden, tgt), real)
        return metrics
