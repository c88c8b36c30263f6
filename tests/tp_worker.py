"""Every decoder mode on one model, forward and backward: the shared code of the TP=2 vs TP=1 test.

tests/test_model_tp.py imports this module to compute the TP=1 reference in its own (world-of-one) process, then
launches this file under `torchrun --nproc_per_node 2` (gloo): each rank builds the TP=2 model, loads the
reference's full weights, runs the same cases and saves logits, losses and full (gathered) gradients.

    python -m torch.distributed.run --nproc_per_node 2 tests/tp_worker.py REFERENCE.pt OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from model import parallel, sharding
from model.config import ModelConfig
from model.seq2seq import Seq2SeqModel
from model.streams import build_streams

SEED = 1234
B, S, T = 2, 6, 5

# Tiny shapes; 4 heads and vocab 256 split over TP=2. Pre-LN also switches the activation.
MODEL_CONFIGS = {
    "post": dict(vocab_size=256, d_model=32, n_heads=4, d_ffn=64, n_encoder_layers=2, n_decoder_layers=3,
                 max_source_positions=16, max_target_positions=16, n_length_classes=16, norm="post",
                 activation="gelu", dropout=0.0, attention_dropout=0.0),
    "pre": dict(vocab_size=256, d_model=32, n_heads=4, d_ffn=64, n_encoder_layers=2, n_decoder_layers=3,
                max_source_positions=16, max_target_positions=16, n_length_classes=16, norm="pre",
                activation="relu", dropout=0.0, attention_dropout=0.0),
}

# name -> (model, mode, build_streams kwargs, decode kwargs); tensors are named by key into the inputs.
# Cases named *_ls run token_loss with label smoothing (LABEL_SMOOTHING), the others without.
CASES = {
    "ar": ("post", "ar", {}, {}),
    "bang_ar": ("post", "bang_ar", {}, {}),
    "bang_n2": ("post", "bang", {"n_predict": 2}, {}),
    "bang_n3": ("post", "bang", {"n_predict": 3}, {}),
    "nar_bidir": ("post", "nar_bidir", {}, {}),
    "nar_bidir_cmlm": ("post", "nar_bidir", {"masked": "nar_masked"}, {}),
    "nar_causal": ("post", "nar_causal", {}, {}),
    "semi_nar_k2": ("post", "semi_nar", {"block_size": 2}, {}),
    "janus": ("post", "janus", {"masked": "janus_masked"}, {}),
    "lplm": ("post", "nar_bidir", {}, {"exit_layers": "exit_layers"}),
    "pre_ar": ("pre", "ar", {}, {}),
    "pre_bang_n2": ("pre", "bang", {"n_predict": 2}, {}),
    "pre_janus": ("pre", "janus", {"masked": "janus_masked"}, {}),
    "pre_lplm": ("pre", "nar_bidir", {}, {"exit_layers": "exit_layers"}),
    "ar_ls": ("post", "ar", {}, {}),
    "janus_ls": ("post", "janus", {"masked": "janus_masked"}, {}),
    "pre_bang_n2_ls": ("pre", "bang", {"n_predict": 2}, {}),
}
LABEL_SMOOTHING = 0.1
# Training objectives whose losses use the vocabulary-parallel head on gathered rows (BANG's trained rows; JANUS's
# log-softmax per view with its cross entropies and KL terms): loss, metrics and every gradient.
OBJECTIVE_CASES = {
    "objective_bang": ("post", "bang", {"n_streams": 2, "label_smoothing": LABEL_SMOOTHING}),
    "objective_janus": ("post", "janus", {"seed": 3}),
    "objective_janus_pre": ("pre", "janus", {"seed": 4, "label_smoothing": 0.0}),
}


def label_smoothing(case: str) -> float:
    return LABEL_SMOOTHING if case.endswith("_ls") else 0.0


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    src = torch.randint(6, 256, (B, S), generator=g)
    src[1, 4:] = 0  # source padding
    tgt = torch.randint(6, 256, (B, T), generator=g)
    tgt_mask = torch.tensor([[1] * T, [1] * (T - 2) + [0] * 2], dtype=torch.bool)  # target padding
    tgt = torch.where(tgt_mask, tgt, torch.zeros_like(tgt))
    prev = torch.cat([torch.full((B, 1), 2), tgt[:, :-1]], dim=1)
    return {
        "src": src, "tgt": tgt, "prev": prev, "tgt_mask": tgt_mask,
        "tgt_positions": torch.arange(1, T + 1).expand(B, T).clone(),
        "nar_masked": torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool),
        "janus_masked": torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool),
        "exit_layers": torch.tensor([[1, 3, 2, 3, 1], [2, 2, 1, 3, 3]]),
        "targets": torch.randint(0, 256, (B, T), generator=g),  # token_loss targets, spread over both shards
    }


def build_model(key: str) -> Seq2SeqModel:
    cfg = ModelConfig(**MODEL_CONFIGS[key])
    return Seq2SeqModel(cfg).eval()  # dropout 0 either way


def full_grads(model: Seq2SeqModel) -> dict[str, torch.Tensor | None]:
    """Gradients of the full (TP=1) parameters: shards concatenated along partition_dim in rank order."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and getattr(p, "tensor_model_parallel", False) and parallel.tp_size() > 1:
            parts = [torch.empty_like(g) for _ in range(parallel.tp_size())]
            dist.all_gather(parts, g.contiguous(), group=parallel.tp_group())
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = None if g is None else g.detach().clone()
    return out


def run_case(model: Seq2SeqModel, index: int, name: str, inputs: dict[str, torch.Tensor]) -> dict:
    _, mode, stream_kw, decode_kw = CASES[name]
    stream_kw = {k: inputs[v] if isinstance(v, str) else v for k, v in stream_kw.items()}
    model.zero_grad(set_to_none=True)
    enc = model.encode(inputs["src"])
    streams = build_streams(mode, prev_tokens=inputs["prev"], tgt_tokens=inputs["tgt"],
                            tgt_positions=inputs["tgt_positions"], tgt_mask=inputs["tgt_mask"], **stream_kw)
    K = len(streams.names)
    decode_kw = {k: inputs[v].repeat(1, K) for k, v in decode_kw.items()}
    hidden = model.decode(enc, streams, **decode_kw).hidden  # [B, K*T, D]
    logits = model.logits(hidden)  # [B, K*T, V], gathered over TP
    token_loss = model.token_loss(hidden, inputs["targets"].repeat(1, K), label_smoothing(name))
    length_logits = model.length_logits(enc)
    # A loss that reaches every logit, the cross entropy and the length head, with fixed weights scaled so that
    # gradients are O(1): an absolute tolerance then means what it says.
    g = torch.Generator().manual_seed(100 + index)
    w_logits = torch.randn(logits.shape, generator=g) / logits.numel() ** 0.5
    w_length = torch.randn(length_logits.shape, generator=g) / length_logits.numel() ** 0.5
    loss = (logits * w_logits).sum() + token_loss.mean() + (length_logits * w_length).sum()
    loss.backward()
    return {"logits": logits.detach(), "token_loss": token_loss.detach(),
            "length_logits": length_logits.detach(), "grads": full_grads(model)}


def objective_batch(inputs: dict[str, torch.Tensor]) -> dict:
    real = inputs["tgt_mask"]
    span = torch.where(real, torch.arange(T).expand(B, T) % 3, torch.full_like(inputs["tgt"], -1))
    return {"src_tokens": inputs["src"], "tgt_tokens": inputs["tgt"], "prev_tokens": inputs["prev"],
            "tgt_positions": inputs["tgt_positions"] * real, "span_index": span,
            "span_counts": torch.bincount(span[real]).tolist(), "n_tokens": int(real.sum())}


def run_objective_case(model: Seq2SeqModel, name: str, inputs: dict[str, torch.Tensor]) -> dict:
    import finetune.objectives  # noqa: F401  (registers janus)
    from pretrain.objectives import build

    _, objective_name, kwargs = OBJECTIVE_CASES[name]
    model.zero_grad(set_to_none=True)
    loss, metrics = build(objective_name, **kwargs).loss(model, objective_batch(inputs))
    loss.backward()
    return {"loss": loss.detach(), "metrics": {k: torch.stack([v[0], v[1]]) for k, v in metrics.items()},
            "grads": full_grads(model)}


def run_all(models: dict[str, Seq2SeqModel], inputs: dict[str, torch.Tensor]) -> dict[str, dict]:
    results = {name: run_case(models[CASES[name][0]], i, name, inputs) for i, name in enumerate(CASES)}
    results.update({name: run_objective_case(models[OBJECTIVE_CASES[name][0]], name, inputs)
                    for name in OBJECTIVE_CASES})
    return results


def main(reference_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    parallel.initialize(tp_size=2, seed=SEED)
    assert parallel.tp_size() == 2 and parallel.dp_size() == 1
    reference = torch.load(reference_path, weights_only=True)
    models = {}
    state_roundtrip = {}
    for key, full in reference["states"].items():
        model = build_model(key)
        sharding.load_full_state_dict(model, full)
        state_roundtrip[key] = sharding.full_state_dict(model)  # must give back the reference weights
        models[key] = model
    results = run_all(models, reference["inputs"])
    rank = dist.get_rank()
    torch.save({"rank": rank, "tp_rank": parallel.tp_rank(), "states": state_roundtrip, "results": results},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    parallel.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
