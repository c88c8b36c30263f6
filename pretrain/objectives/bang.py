"""BANG pretraining loss (methods.md §1.4): n cross-stream-visible predicting streams over the masked span.

Stream s predicts y_i with the s preceding tokens masked; it is trained only on targets with at least s in-span
predecessors (span_index >= s). L = sum_s w_s * sum_i CE_s(i) * 1[span_index_i >= s] / (number of real targets).

Only those rows go through the LM head: at 9 streams over 9-token spans they are 45 of 81 (55%), and the head
(d_model x vocabulary, fp32 logits, cross entropy) is the largest single matmul of the step. They are gathered
before it, in a number of rows counted on the host from the batch's span counts (data_pipeline/corruption.py),
so that no step waits for the GPU to count them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from model.config import SPECIAL
from model.streams import build_streams
from pretrain.core.objectives import Metrics, Objective, gather_rows, masked_sum, register


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

    def trained_rows(self, batch: dict[str, Any]) -> int:
        """How many (stream, target) rows the loss trains, from the host-side span counts (counts[k]: real targets
        with span_index k; a target at span index k trains streams 0..min(k, n-1)); without them, every row."""
        counts = batch.get("span_counts")
        if counts is None:
            B, T = batch["tgt_tokens"].shape
            return B * self.n_streams * T
        return sum(int(c) * min(k + 1, self.n_streams) for k, c in enumerate(counts))

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, Metrics]:
        tgt, span = batch["tgt_tokens"], batch["span_index"]
        real = tgt != SPECIAL.pad
        n, (B, T) = self.n_streams, tgt.shape
        streams = build_streams("bang", prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                                tgt_mask=real, n_predict=n)
        hidden = model(batch["src_tokens"], streams).hidden
        predict = hidden[:, T:]  # the predicting streams follow the main stream: [B, n*T, D], stream-major rows
        stream_ids = torch.arange(n, device=tgt.device)
        trained = real[:, None] & (span[:, None] >= stream_ids[None, :, None])  # [B, n, T], predict's row order
        rows, valid = gather_rows(trained, self.trained_rows(batch))
        example, row = rows // (n * T), rows % (n * T)
        per_row = model.token_loss(predict[example, row], tgt[example, row % T], self.label_smoothing)
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        per_stream = per_row.new_zeros(n).index_add(0, row // T, per_row)  # [n] loss sums
        counts = trained.sum(dim=(0, 2)).to(per_row.dtype)
        total = sum(w * per_stream[s] for s, w in enumerate(self.stream_weights))
        metrics: Metrics = {f"bang/loss_s{s}": (per_stream[s].detach(), counts[s]) for s in range(n)}
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
