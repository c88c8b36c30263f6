"""Finetuning objectives, behind the same interface and registry as pretraining's (pretrain.core).

`ar` (plain main stream, or BANG's predicting stream), `nar` (mask slots + length loss), `bang_mixed` (a NAR step
with probability nar_ratio, else AR; methods.md §1.5) and `janus` (AR + NAR views with symmetric-KL auxiliary
terms, §3.2). Objectives that draw random numbers keep their own checkpointed generator, seeded alike on every rank
(finetune.run.build_objective): TP peers see the same batch, and under ZeRO-3 bang_mixed's per-step AR/NAR choice
must be the same on every data-parallel rank. Masks are drawn on the host, before the batch moves to the device
(`prepare`, pretrain.core.Objective), and travel with it: batch["nar_masked"] [B, T] bool (nar with
masking="uniform", janus) and, for nar with exits="random", batch["nar_exit_uniform"], what its exit layers are
drawn from. Evaluation draws from a fixed-seed copy, never from the training generator, so
evaluating does not change training and every evaluation sees the same masks.

Split invariance: the engine rescales each micro-batch loss by its share of the step's targets, which gives the
gradient of the global batch however it is split over ranks and micro-steps, provided the loss is a mean over the
batch's target tokens. `ar`, `nar` with masking="all" and `bang_mixed` are (the length loss is weighted per target
token: each example's length cross entropy counts once per target token); so DP=2 and one process agree on the same
global batch (tests/test_finetune_distributed.py). CMLM masking ("uniform") and `janus` average over the *masked*
targets, whose share differs between ranks, so there DP and one process agree only approximately.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model import parallel
from model.config import SPECIAL
from model.generation.options import NAR_MODES
from model.streams import build_streams
from pretrain.core import Metrics, Objective, gather_rows, register

AR_STREAMS = ("ar", "bang_ar")
NAR_MASKING = ("all", "uniform")
NAR_EXITS = ("last", "all", "random")


def symmetric_kl(logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor | None = None,
                 q: torch.Tensor | None = None) -> torch.Tensor:
    """½[KL(P‖Q) + KL(Q‖P)] = ½ Σ_v (p_v − q_v)(log p_v − log q_v) per row, from log-probabilities [..., V] or this
    tensor-parallel rank's vocabulary shard of them (the sum runs over the full vocabulary); p, q: their exp, when
    already at hand. Both sides carry gradients."""
    p = logp.exp() if p is None else p
    q = logq.exp() if q is None else q
    return 0.5 * parallel.sum_over_tp(((p - q) * (logp - logq)).sum(-1))


def log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities over the full vocabulary, as this TP rank's shard [..., V/tp] (no gather)."""
    return parallel.log_softmax_over_tp(model.logits_local(hidden).float())


def smoothed_nll(logp: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Label-smoothed cross entropy per row from (sharded) log-probabilities, as torch's cross_entropy and
    Seq2SeqModel.token_loss define it: (1 - eps)(-log p_target) + eps * mean over the full vocabulary of -log p_v."""
    vocab = logp.shape[-1] * parallel.tp_size()
    nll = -parallel.pick_over_tp(logp, targets)
    if label_smoothing == 0.0:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * parallel.sum_over_tp(logp.sum(-1)) / vocab


def length_targets(tgt: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The class of each example's target length (real tokens incl. eos), clamped to the last class."""
    return (tgt != SPECIAL.pad).sum(-1).clamp(max=n_classes - 1)


def token_weighted_length_loss(length_logits: torch.Tensor, tgt: torch.Tensor, n_classes: int):
    """The length cross entropy as a mean over target tokens (each example's CE once per target token of it), so
    that it splits over ranks like the token losses do; and its per-example (sum, count) metric entry."""
    per_example = F.cross_entropy(length_logits.float(), length_targets(tgt, n_classes), reduction="none")
    n_targets = (tgt != SPECIAL.pad).sum(-1).to(per_example.dtype)
    loss = (per_example * n_targets).sum() / n_targets.sum().clamp(min=1)
    return loss, (per_example.detach().sum(), per_example.numel())  # the count is known on the host


def exit_layers(uniform: torch.Tensor, scored: torch.Tensor, n_layers: int) -> torch.Tensor:
    """LPLM exit layers [B, T] from uniforms in [0, 1): uniform in 1..n_layers where scored, n_layers elsewhere."""
    drawn = (uniform * n_layers).long().clamp(max=n_layers - 1) + 1
    return torch.where(scored, drawn, torch.full_like(drawn, n_layers))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The mean of values where mask, and its (sum, count) metric entry."""
    mask = mask.to(values.dtype)
    total, count = (values * mask).sum(), mask.sum()
    return total / count.clamp(min=1), (total.detach(), count)


class SeededObjective(Objective):
    def __init__(self, seed: int):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def draws(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What this objective draws for a batch (host tensors, from self.generator); none by default."""
        return {}

    def prepare(self, batch: dict[str, Any], evaluate: bool = False) -> dict[str, Any]:
        """The batch with this objective's draws. evaluate=True draws from a generator reset to the seed: each
        evaluation draws the same masks, and the training generator (checkpointed, shared by all ranks) is left
        where it was."""
        if batch.get("drawn_by") == self.name:
            return batch
        if not evaluate:
            return {**batch, **self.draws(batch), "drawn_by": self.name}
        training_state = self.generator.get_state()
        self.generator.manual_seed(self.seed)
        try:
            return {**batch, **self.draws(batch), "drawn_by": self.name}
        finally:
            self.generator.set_state(training_state)

    def eval_metrics(self, model, batch) -> Metrics:
        """The training metrics on the batch's evaluation draws."""
        return self.loss(model, self.prepare(batch, evaluate=True))[1]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)


def ar_hidden(model, batch, stream: str) -> torch.Tensor:
    """Teacher-forced decoder states that predict each target: main stream ("ar") or predicting stream ("bang_ar")."""
    tgt = batch["tgt_tokens"]
    streams = build_streams(stream, prev_tokens=batch["prev_tokens"], tgt_positions=batch["tgt_positions"],
                            tgt_mask=tgt != SPECIAL.pad)
    hidden = model(batch["src_tokens"], streams).hidden
    return streams.slice(hidden, "main" if stream == "ar" else "predict0")


@register("ar")
class ArObjective(Objective):
    """Next-token loss; `stream` "ar" (BART-style main stream) or "bang_ar" (BANG / JANUS predicting stream)."""

    def __init__(self, stream: str, label_smoothing: float = 0.1):
        if stream not in AR_STREAMS:
            raise ValueError(f"objective.stream={stream!r}: choose one of {AR_STREAMS}")
        self.stream, self.label_smoothing = stream, label_smoothing

    def metric_names(self) -> list[str]:
        return ["ar/loss"]

    def loss(self, model, batch) -> tuple[torch.Tensor, Metrics]:
        tgt = batch["tgt_tokens"]
        per_token = model.token_loss(ar_hidden(model, batch, self.stream), tgt, self.label_smoothing)
        loss, entry = masked_mean(per_token, tgt != SPECIAL.pad)
        return loss, {"ar/loss": entry}


@register("nar")
class NarObjective(SeededObjective):
    """Mask-slot loss plus a length loss. masking="all": every target is a slot (BANG NAR, ELMER); "uniform":
    CMLM — a uniformly drawn number of targets are slots, the rest shown (what mask-predict decoding expects).

    exits: which decoder layers the token loss trains (ELMER's off-ramps, the tied head on a layer's normed
    states; early-exit decoding reads them). "last": the final layer only. "all": the mean over every layer's
    cross entropy from one decoder pass (ELMER's released finetuning: (CE_L + sum_{l<L} CE_l) / L). "random":
    LPLM as in pretraining (methods.md §2.3), each scored slot exits at a layer drawn uniformly from 1..L and
    later layers see its detached state; shown and pad slots run to the last layer."""

    def __init__(self, mode: str = "nar_bidir", masking: str = "all", label_smoothing: float = 0.1,
                 length_weight: float = 0.1, exits: str = "last", seed: int = 0):
        super().__init__(seed)
        if mode not in NAR_MODES:
            raise ValueError(f"objective.mode={mode!r}: choose one of {NAR_MODES}")
        if masking not in NAR_MASKING:
            raise ValueError(f"objective.masking={masking!r}: choose one of {NAR_MASKING}")
        if exits not in NAR_EXITS:
            raise ValueError(f"objective.exits={exits!r}: choose one of {NAR_EXITS}")
        self.mode, self.masking, self.exits = mode, masking, exits
        self.label_smoothing, self.length_weight = label_smoothing, length_weight

    def metric_names(self) -> list[str]:
        extra = ["nar/last_layer_loss"] if self.exits == "all" else []
        return ["nar/loss", "nar/token_loss", "nar/length_loss"] + extra

    def draw_masked(self, tgt: torch.Tensor) -> torch.Tensor | None:
        """CMLM masks [B, T] on tgt's device, drawn on the host (None for masking="all")."""
        if self.masking == "all":
            return None
        real = tgt.cpu() != SPECIAL.pad
        n_real = real.sum(-1, keepdim=True)
        n_mask = (self.uniform(tgt.shape[0], 1) * n_real).long().clamp(min=1)
        scores = self.uniform(*tgt.shape).masked_fill(~real, 2.0)  # pads sort last
        rank = scores.argsort(-1).argsort(-1)
        return ((rank < n_mask) & real).to(tgt.device)

    def draws(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """CMLM masks (masking="uniform") and, for exits="random", one uniform per target that the loss turns
        into an exit layer (the objective does not know the model's depth before it sees the model)."""
        tgt = batch["tgt_tokens"]
        masked = self.draw_masked(tgt)
        drawn = {} if masked is None else {"nar_masked": masked}
        if self.exits == "random":
            drawn["nar_exit_uniform"] = self.uniform(*tgt.shape).to(tgt.device)
        return drawn

    def loss(self, model, batch) -> tuple[torch.Tensor, Metrics]:
        batch = self.prepare(batch)  # a no-op for the engine's batches, prepared on the host
        tgt = batch["tgt_tokens"]
        real = tgt != SPECIAL.pad
        masked = batch.get("nar_masked")
        streams = build_streams(self.mode, tgt_tokens=tgt, tgt_positions=batch["tgt_positions"], tgt_mask=real,
                                masked=masked)
        enc = model.encode(batch["src_tokens"])
        scored = real if masked is None else masked
        token_loss, token_entry, exit_metrics = self.token_term(model, enc, streams, tgt, scored,
                                                                batch.get("nar_exit_uniform"))
        length_loss, length_entry = token_weighted_length_loss(model.length_logits(enc), tgt,
                                                               model.cfg.n_length_classes)
        loss = token_loss + self.length_weight * length_loss
        n = real.sum().to(loss.dtype)  # the loss is a mean over the targets: weight it so across ranks
        return loss, {"nar/loss": (loss.detach() * n, n), "nar/token_loss": token_entry,
                      "nar/length_loss": length_entry, **exit_metrics}  # length: logged per example

    def draw_exits(self, scored: torch.Tensor, n_layers: int) -> torch.Tensor:
        """LPLM exit layers [B, T] on scored's device: uniform in 1..n_layers where scored, n_layers elsewhere
        (the draw a prepared batch carries: this objective's next uniforms, from its checkpointed generator)."""
        return exit_layers(self.uniform(*scored.shape).to(scored.device), scored, n_layers)

    def token_term(self, model, enc, streams, tgt: torch.Tensor, scored: torch.Tensor,
                   uniform: torch.Tensor | None = None):
        """The token term at the trained exits (see the class), its metric entry and the exit metrics. Every layer
        runs whatever the exits: no host sync, and the same layers on every rank."""
        ls = self.label_smoothing
        if self.exits == "last":
            return (*masked_mean(model.token_loss(model.decode(enc, streams).hidden, tgt, ls), scored), {})
        if self.exits == "random":
            exits = exit_layers(uniform, scored, len(model.decoder_layers))
            hidden = model.decode(enc, streams, exit_layers=exits, stop_when_all_exited=False).hidden
            return (*masked_mean(model.token_loss(hidden, tgt, ls), scored), {})
        states = model.decode(enc, streams, keep_layer_states=True).layer_states
        per_layer = [masked_mean(model.token_loss(model.decoder_final_norm(h), tgt, ls), scored) for h in states]
        loss = sum(layer_loss for layer_loss, _ in per_layer) / len(per_layer)
        count = per_layer[-1][1][1]
        entry = (sum(total for _, (total, _) in per_layer) / len(per_layer), count)
        return loss, entry, {"nar/last_layer_loss": per_layer[-1][1]}


@register("bang_mixed")
class BangMixedObjective(SeededObjective):
    """BANG finetuning: each optimizer step is NAR with probability nar_ratio (0 = pure AR, 1 = pure NAR).

    The draw is made once per step (start_step, called by the engine), so every accumulation micro-batch of a
    step takes the same path, as the data-parallel ranks of a step do (methods.md §1.5: the reference draws per
    criterion call, i.e. per micro-batch); the generator advances by one draw per step whatever grad_accum is.
    A caller that never calls start_step (a single loss() outside the engine) gets one draw per loss() call."""

    def __init__(self, nar_ratio: float = 0.5, label_smoothing: float = 0.1, length_weight: float = 0.1,
                 seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= nar_ratio <= 1.0:
            raise ValueError(f"objective.nar_ratio={nar_ratio}: must be in [0, 1]")
        self.nar_ratio = nar_ratio
        self.ar = ArObjective("bang_ar", label_smoothing)
        self.nar = NarObjective("nar_causal", "all", label_smoothing, length_weight)
        self.step_uses_nar: bool | None = None  # this step's draw; not checkpointed (drawn again each step)

    def metric_names(self) -> list[str]:
        return self.ar.metric_names() + self.nar.metric_names()

    def start_step(self, step: int) -> None:
        self.step_uses_nar = self.draw_nar()

    def draw_nar(self) -> bool:
        return bool(self.uniform(1) < self.nar_ratio)

    def loss(self, model, batch) -> tuple[torch.Tensor, Metrics]:
        use_nar = self.draw_nar() if self.step_uses_nar is None else self.step_uses_nar
        return (self.nar if use_nar else self.ar).loss(model, batch)

    def eval_metrics(self, model, batch) -> Metrics:
        """Both paths on every held-out batch (no draw): every rank runs the same modules, as ZeRO-3 needs."""
        return {**self.ar.loss(model, batch)[1], **self.nar.loss(model, batch)[1]}


@register("janus")
class JanusObjective(SeededObjective):
    """JANUS (methods.md §3.2): one decoder pass over the janus streams gives P_AR (AR query stream), P_C (CMLM
    placeholders) and P_Q (NAR query stream) for the NAR-masked targets.

    L = LS(P_AR) + w_ar_c·symKL(P_AR,P_C) + w_ar_q·symKL(P_AR,P_Q) + ½[LS(P_Q) + LS(P_C)] + w_len·CE_len
        + w_c_q·symKL(P_C,P_Q), every KL over the masked targets.
    Targets are span-masked at `mask_ratio` with Poisson(span_lambda) spans; the final eos is never masked.

    Every term lives on real target rows, so the LM head runs on those alone (gathered first, their number from
    the batch's host-side n_tokens, so nothing waits on the GPU), once per view, and one log-softmax per view
    serves both its label-smoothed cross entropy and its KL terms (formerly: the head on every row for the cross
    entropies, then again on the masked rows for the KLs). The masked rows are not gathered apart: their number
    is drawn on the device, and a host-known bound for it is the number of real rows anyway."""

    def __init__(self, w_ar_c: float = 1.0, w_ar_q: float = 3.0, w_c_q: float = 1.0, length_weight: float = 0.1,
                 label_smoothing: float = 0.1, mask_ratio: float = 0.7, span_lambda: float = 2.0, seed: int = 0):
        super().__init__(seed)
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"objective.mask_ratio={mask_ratio}: must be in (0, 1]")
        self.w_ar_c, self.w_ar_q, self.w_c_q, self.length_weight = w_ar_c, w_ar_q, w_c_q, length_weight
        self.label_smoothing, self.mask_ratio, self.span_lambda = label_smoothing, mask_ratio, span_lambda

    def metric_names(self) -> list[str]:
        return ["janus/loss", "janus/ar", "janus/nar_content", "janus/nar_query", "janus/length",
                "janus/kl_ar_content", "janus/kl_ar_query", "janus/kl_content_query"]

    def draw_masked(self, tgt: torch.Tensor) -> torch.Tensor:
        """Span masks [B, T] on tgt's device, drawn on the host for all examples at once. Per example: spans of
        max(1, Poisson(span_lambda)) targets starting uniformly in the maskable prefix (every real target but the
        last: the final eos is never masked, unless it is the only target), one after another, overlaps allowed,
        until mask_ratio of the maskable targets is covered (the last span may overshoot). Spans are drawn in
        rounds of a few per example; each example keeps the shortest run of its spans that reaches its goal, which
        is that sequential process exactly (tests/test_finetune_objectives.py compares the statistics)."""
        real = tgt.cpu() != SPECIAL.pad
        B, T = real.shape
        maskable = (real.sum(-1) - 1).clamp(min=1)  # [B]
        goal = (maskable.double() * self.mask_ratio).round().clamp(min=1)  # round half to even, like round()
        positions = torch.arange(T)
        masked = torch.zeros(B, T, dtype=torch.bool)
        pending = torch.ones(B, dtype=torch.bool)
        spans_per_round = int(goal.max() / max(self.span_lambda, 1.0)) + 4  # more rounds if overlaps need them
        while bool(pending.any()):
            lengths = torch.poisson(torch.full((B, spans_per_round), float(self.span_lambda)),
                                    generator=self.generator).long().clamp(min=1)
            starts = (torch.rand(B, spans_per_round, dtype=torch.float64, generator=self.generator)
                      * maskable[:, None]).long()
            ends = torch.minimum(starts + lengths, maskable[:, None])
            spans = (positions >= starts[..., None]) & (positions < ends[..., None])  # [B, spans, T]
            covered = (spans | masked[:, None]).long().cumsum(dim=1) > 0  # covered after each span, in order
            reached = covered.sum(-1) >= goal[:, None]  # [B, spans]
            first = reached.long().argmax(1)  # the first span that reaches the goal (0 when none does)
            done = reached.any(1)
            take = torch.where(done, first, torch.full_like(first, spans_per_round - 1))
            new = covered[torch.arange(B), take]
            masked = torch.where(pending[:, None], new, masked)
            pending &= ~done
        return masked.to(tgt.device)

    def draws(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tgt = batch["tgt_tokens"]
        return {"nar_masked": self.draw_masked(tgt) & (tgt != SPECIAL.pad)}

    def forward_views(self, model, batch, masked):
        """Decoder states [B, T, D] of the AR query, content and NAR query views, and the length logits."""
        tgt = batch["tgt_tokens"]
        streams = build_streams("janus", prev_tokens=batch["prev_tokens"], tgt_tokens=tgt,
                                tgt_positions=batch["tgt_positions"], tgt_mask=tgt != SPECIAL.pad, masked=masked)
        enc = model.encode(batch["src_tokens"])
        hidden = model.decode(enc, streams).hidden
        views = [streams.slice(hidden, name) for name in ("ar_query", "content", "nar_query")]
        return views, model.length_logits(enc)

    def loss(self, model, batch) -> tuple[torch.Tensor, Metrics]:
        batch = self.prepare(batch)  # a no-op for the engine's batches, prepared on the host
        tgt = batch["tgt_tokens"]
        real = tgt != SPECIAL.pad
        masked = batch["nar_masked"]  # drawn on the host (prepare)
        views, length_logits = self.forward_views(model, batch, masked)
        B, T = tgt.shape
        rows, valid = gather_rows(real, batch.get("n_tokens", B * T))
        example, position = rows // T, rows % T
        logp = [log_probs(model, h[example, position]) for h in views]  # AR query, content, NAR query: [R, V/tp]
        probs = [lp.exp() for lp in logp]
        targets = tgt[example, position]
        on_masked = masked[example, position] & valid  # the gathered rows hold every real row, so every masked one

        def kl(i: int, j: int) -> torch.Tensor:
            return masked_mean(symmetric_kl(logp[i], logp[j], probs[i], probs[j]), on_masked)[0]

        ls = self.label_smoothing
        ar, ar_e = masked_mean(smoothed_nll(logp[0], targets, ls), valid)
        nar_c, c_e = masked_mean(smoothed_nll(logp[1], targets, ls), on_masked)
        nar_q, q_e = masked_mean(smoothed_nll(logp[2], targets, ls), on_masked)
        kl_ar_c, kl_ar_q, kl_c_q = kl(0, 1), kl(0, 2), kl(1, 2)
        length = F.cross_entropy(length_logits.float(), length_targets(tgt, model.cfg.n_length_classes))
        loss = (ar + self.w_ar_c * kl_ar_c + self.w_ar_q * kl_ar_q + 0.5 * (nar_q + nar_c)
                + self.length_weight * length + self.w_c_q * kl_c_q)
        one = loss.new_ones(())
        scalar = lambda t: (t.detach(), one)  # noqa: E731
        return loss, {"janus/loss": scalar(loss), "janus/ar": ar_e, "janus/nar_content": c_e,
                      "janus/nar_query": q_e, "janus/length": scalar(length), "janus/kl_ar_content": scalar(kl_ar_c),
                      "janus/kl_ar_query": scalar(kl_ar_q), "janus/kl_content_query": scalar(kl_c_q)}
