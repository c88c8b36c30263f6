"""Every decoding mode gives exactly the same tokens at TP=2 as at TP=1.

The test decodes with a TP=1 model in this process, saves its full weights, and starts 2 processes with
torchrun (gloo) that run this file as a script: each builds the model at TP=2 (model.parallel.initialize),
loads the TP=1 weights with model.sharding.load_full_state_dict, decodes every case and writes its tokens.
Tokens must be identical on both ranks and equal to TP=1; ranked scores agree within 1e-5.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO_ROOT))

from model.config import SPECIAL, ModelConfig  # noqa: E402
from model.generation import DecodeOptions, decode  # noqa: E402
from model.seq2seq import Seq2SeqModel  # noqa: E402

TOL = 1e-5
# case name -> (mode, options); early_exit's threshold is filled in from the TP=1 entropies.
CASES = {
    "ar_greedy": ("ar_greedy", dict(max_len=10, no_repeat_ngram_size=2)),
    "ar_greedy_bang_ar": ("ar_greedy", dict(max_len=10, ar_logits="bang_ar")),
    "ar_beam": ("ar_beam", dict(max_len=10, beam_size=3, length_penalty=1.2, no_repeat_ngram_size=2)),
    "ar_beam_bang_ar": ("ar_beam", dict(max_len=10, beam_size=3, ar_logits="bang_ar")),
    "nar_bidir": ("nar", dict(length_beam=2)),
    "nar_causal": ("nar", dict(nar_mode="nar_causal", length_source="source")),
    "semi_nar": ("semi_nar", dict(block_size=3, max_len=10)),
    "mask_predict": ("mask_predict", dict(iterations=4, length_beam=2)),
    "early_exit": ("early_exit", dict(length_source="source")),
}


def config() -> ModelConfig:
    return ModelConfig.preset("tiny", norm="pre", init_std=0.2, n_decoder_layers=3)


def decode_cases(model, src, cases) -> dict:
    out = {}
    for case, (mode, opts) in cases.items():
        result = decode(mode, model, src, DecodeOptions(**opts))
        out[case] = {"tokens": result.tokens, "scores": result.scores, "figures": result.figures}
    return out


def exit_threshold(model, src) -> float:
    """A threshold in the widest gap among the middle off-ramp entropies, so that float noise between TP
    sizes cannot move a slot across it and some slots exit early while others do not."""
    from model.streams import build_streams

    with torch.no_grad():
        real = torch.arange(src.shape[1])[None] < (src != SPECIAL.pad).sum(1)[:, None]
        out = model.decode(model.encode(src), build_streams("nar_bidir", tgt_mask=real), keep_layer_states=True)
        values = []
        for states in out.layer_states[:-1]:
            logp = torch.log_softmax(model.logits(model.decoder_final_norm(states)), -1)
            values.append(-(logp.exp() * logp).sum(-1)[real])
    ordered = torch.cat(values).sort().values
    n = len(ordered)
    middle = ordered[n // 4: 3 * n // 4 + 1]
    gap = (middle[1:] - middle[:-1]).argmax()
    return float((middle[gap] + middle[gap + 1]) / 2)


def test_every_mode_tp2_equals_tp1(tmp_path):
    from conftest import free_port
    from model.sharding import full_state_dict

    torch.manual_seed(0)
    model = Seq2SeqModel(config()).eval()
    with torch.no_grad():  # as in test_generation.tiny_model: a random model whose outputs vary
        model.decoder_embed_norm.weight.mul_(0.1)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(6, 1024, (4, 9), generator=g)
    src[:, -1] = SPECIAL.eos
    src[1, 6:] = SPECIAL.pad
    src[1, 5] = SPECIAL.eos
    cases = {k: (mode, dict(opts)) for k, (mode, opts) in CASES.items()}
    cases["early_exit"][1]["exit_entropy"] = exit_threshold(model, src)
    reference = decode_cases(model, src, cases)
    exits = reference["early_exit"]["figures"]["mean_exit_layer"]
    assert 1.0 < exits < model.cfg.n_decoder_layers  # the threshold really splits the slots

    torch.save(full_state_dict(model), tmp_path / "weights.pt")
    (tmp_path / "spec.json").write_text(json.dumps({"src": src.tolist(), "cases": cases}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["local_vocab"] == model.cfg.vocab_size // 2  # really sharded
        for case, ref in reference.items():
            assert got["cases"][case]["tokens"] == ref["tokens"], f"rank {rank}, {case}"
            if ref["scores"] is not None:
                for a, b in zip(got["cases"][case]["scores"], ref["scores"]):
                    assert abs(a - b) <= TOL, f"rank {rank}, {case}"
            for name in ("decoder_passes", "mean_exit_layer"):
                if name in ref["figures"]:
                    assert got["cases"][case]["figures"][name] == ref["figures"][name], f"{case} {name}"


def worker(workdir: Path) -> None:
    import torch.distributed as dist

    from model import parallel
    from model.sharding import load_full_state_dict

    dist.init_process_group("gloo")
    parallel.initialize(2, seed=0)
    spec = json.loads((workdir / "spec.json").read_text())
    model = Seq2SeqModel(config()).eval()
    load_full_state_dict(model, torch.load(workdir / "weights.pt"))
    cases = {k: (mode, opts) for k, (mode, opts) in spec["cases"].items()}
    out = decode_cases(model, torch.tensor(spec["src"]), cases)
    for case in out.values():
        case["figures"] = {k: v for k, v in case["figures"].items() if k != "wall_s" and math.isfinite(v)}
    result = {"local_vocab": model.embed_tokens.weight.shape[0], "cases": out}
    (workdir / f"rank{parallel.tp_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
