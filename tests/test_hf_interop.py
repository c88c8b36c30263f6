"""Hugging Face interop: export to BART (post-LN) / mBART (pre-LN) and import back, checked on logits.

Plain AR mode ("ar" streams, prev_tokens = decoder_input_ids, source pads -> attention_mask 0), fp32, eval mode.
Logits must agree to max abs diff <= 1e-4 (they are ~1-5 in size); state-dict round trips must be bit-exact.
The TP=2 case runs this file as a torchrun worker (2 processes over gloo). Checkpoints numbered as BART is (pad 1,
bos 0, eos 2) import through a vocab_order permutation; mBART's scale_embedding is supported.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import (BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration)

from model import parallel
from model.config import ModelConfig
from model.hf import aside_weights, from_hf, hf_config, load_hf, save_hf, to_hf
from model.hf_state import ASIDE_KEYS, config_from_hf, from_hf_state_dict, to_hf_state_dict
from model.seq2seq import Seq2SeqModel
from model.sharding import full_state_dict, load_full_state_dict
from model.streams import build_streams

LOGITS_TOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(norm: str) -> ModelConfig:
    # Different source and target position sizes exercise the shared max_position_embeddings padding.
    return ModelConfig.preset("tiny", norm=norm, max_source_positions=32, max_target_positions=24)


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (LayerNorms and biases start at 1/0), so that every mapping is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # tied parameters are listed once
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def batch(vocab: int, seed: int, src_len: int = 11, tgt_len: int = 9):
    """Source with right padding of different lengths per row; decoder input starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(6, vocab, (3, src_len), generator=g)
    src[1, 7:] = 0
    src[2, 2:] = 0
    dec = torch.randint(6, vocab, (3, tgt_len), generator=g)
    dec[:, 0] = 2
    return src, dec


def our_ar_logits(model: Seq2SeqModel, src: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = model.decode(model.encode(src), build_streams("ar", prev_tokens=dec)).hidden
        return model.logits(hidden)


def hf_logits(hf_model, src: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    return hf_logits_of(hf_model, src, dec, torch.tensor(0))


@pytest.mark.parametrize("norm,hf_class", [("post", BartForConditionalGeneration),
                                           ("pre", MBartForConditionalGeneration)])
def test_export_gives_equal_ar_logits(norm, hf_class):
    torch.manual_seed(0)
    model = Seq2SeqModel(tiny_cfg(norm)).eval()
    perturb_(model, seed=1)
    hf_model = to_hf(model)
    assert type(hf_model) is hf_class
    c = hf_model.config
    assert (c.max_position_embeddings, c.scale_embedding, c.activation_function) == (32, False, "gelu")
    assert hf_model.model.encoder.embed_positions.weight.shape[0] == 32 + 2  # BART's offset of 2 rows
    assert bool((hf_model.final_logits_bias == 0).all())
    # The per-head fused layout is really reordered (a naive [q; k; v] split would be wrong).
    fused = model.encoder_layers[0].self_attn.block.qkv.weight
    assert not torch.equal(hf_model.model.encoder.layers[0].self_attn.q_proj.weight, fused[:64])

    src, dec = batch(1024, seed=2, tgt_len=24)  # all 24 main-stream positions
    ours, theirs = our_ar_logits(model, src, dec), hf_logits(hf_model, src, dec)
    assert ours.shape == theirs.shape == (3, 24, 1024)
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= LOGITS_TOL


@pytest.mark.parametrize("config_class,hf_class,norm", [(BartConfig, BartForConditionalGeneration, "post"),
                                                        (MBartConfig, MBartForConditionalGeneration, "pre")])
def test_import_from_random_hf_model_gives_equal_logits(config_class, hf_class, norm):
    torch.manual_seed(3)
    config = config_class(vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=3,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                          decoder_ffn_dim=96, max_position_embeddings=40, scale_embedding=False,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
                          forced_eos_token_id=3, attn_implementation="eager")
    hf_model = hf_class(config).eval()
    perturb_(hf_model, seed=4)
    model = from_hf(hf_model)
    cfg = model.cfg
    assert (cfg.norm, cfg.n_decoder_layers, cfg.d_ffn, cfg.max_source_positions, cfg.max_target_positions) == \
        (norm, 3, 96, 40, 40)
    assert not model.training
    src, dec = batch(512, seed=5, src_len=16, tgt_len=40)  # every decoder position HF has
    ours, theirs = our_ar_logits(model, src, dec), hf_logits(hf_model, src, dec)
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= LOGITS_TOL
    # No HF counterpart: freshly initialised (init_std normal, zero bias), not copied from anywhere.
    assert model.slot_embed.shape == (64,) and 0.005 < model.slot_embed.std().item() < 0.05
    assert bool((model.length_head.bias == 0).all())


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_round_trip_reproduces_state_dict_exactly(norm, tmp_path):
    torch.manual_seed(6)
    cfg = tiny_cfg(norm)
    model = Seq2SeqModel(cfg).eval()
    perturb_(model, seed=7)
    ours = {k: v for k, v in full_state_dict(model).items() if isinstance(v, torch.Tensor)}

    # The pure mapping, both ways.
    hf_sd, aside = to_hf_state_dict(ours, cfg)
    assert sorted(aside) == sorted(ASIDE_KEYS)
    back = from_hf_state_dict(hf_sd, cfg, aside)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)

    # Through a real HF model, and through its files (save_pretrained + tandem_aside.pt).
    assert config_from_hf(hf_config(cfg)) == cfg
    for again in (from_hf(to_hf(model), aside=aside_weights(model)), load_hf(save_hf(model, tmp_path / "hf"))):
        assert again.cfg == cfg
        got = full_state_dict(again)
        assert all(torch.equal(got[k], ours[k]) for k in ours)


def test_export_and_import_refuse_what_hf_cannot_hold():
    with pytest.raises(ValueError, match="model.layer_norm_eps"):
        hf_config(ModelConfig.preset("tiny", layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match="pad_token_id=1: differs from our pad id 0: import the checkpoint with its "
                                         "tokenizer"):
        config_from_hf(BartConfig())  # facebook/bart-* convention: pad=1, without the tokenizer's vocab_order
    with pytest.raises(ValueError, match="eos_token_id=2: its tokenizer puts our eos at id 5"):
        config_from_hf(BartConfig(vocab_size=8), vocab_order=[1, 3, 0, 5, 4, 2, 6, 7])
    with pytest.raises(ValueError, match="vocab_order must be a permutation of the 8 vocabulary ids"):
        config_from_hf(BartConfig(vocab_size=8), vocab_order=[1, 3, 0, 2, 4, 5, 6, 6])
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf(BartConfig(pad_token_id=0, activation_function="gelu_new"))


# BART's numbering: bos 0, pad 1, eos 2, unk 3, and <mask> last; the permutation a tokenizer of that numbering gives
# (data_pipeline/hf_tokenizer.py): our pad/unk/bos/eos/mask (0..4) are its 1, 3, 0, 2 and 511.
BART_ORDER = [1, 3, 0, 2, 511, *range(5, 511), 4]


@pytest.mark.parametrize("config_class,hf_class", [(BartConfig, BartForConditionalGeneration),
                                                   (MBartConfig, MBartForConditionalGeneration)])
def test_bart_numbered_checkpoint_round_trips_exactly(config_class, hf_class):
    """HF (BART's special ids; mBART with scale_embedding) -> ours -> HF: our logits are the checkpoint's with the
    vocabulary permuted, and the exported model's logits and weights are the checkpoint's (all but the two
    position rows BART never reads, which our export writes as zeros)."""
    torch.manual_seed(11)
    scale = config_class is MBartConfig
    config = config_class(vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=40,
                          scale_embedding=scale, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2, attn_implementation="eager")
    hf_model = hf_class(config).eval()
    perturb_(hf_model, seed=12)
    with torch.no_grad():
        hf_model.final_logits_bias.zero_()  # BART's is a zero buffer (perturb_ leaves buffers alone)
    model = from_hf(hf_model, vocab_order=BART_ORDER).eval()
    assert model.cfg.scale_embedding is scale
    order = torch.tensor(BART_ORDER)
    src, dec = batch(512, seed=13, src_len=12, tgt_len=10)  # our ids; pads (0) in the source
    ours = our_ar_logits(model, src, dec)
    theirs = hf_logits_of(hf_model, order[src], order[dec], order[0])
    assert ours.abs().max() > 1.0
    assert (ours - theirs[..., order]).abs().max().item() <= LOGITS_TOL

    back = to_hf(model, vocab_order=BART_ORDER)
    c = back.config
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id, c.decoder_start_token_id, c.scale_embedding) == \
        (1, 0, 2, 0, scale)  # the checkpoint's ids; decoding starts from bos, as we finetune
    again = hf_logits_of(back, order[src], order[dec], order[0])
    assert (again - theirs).abs().max().item() <= LOGITS_TOL
    original, exported = hf_model.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    for name, value in original.items():
        if name.endswith("embed_positions.weight"):
            assert torch.equal(exported[name][2:], value[2:]) and not exported[name][:2].any()
        else:
            assert torch.equal(exported[name], value), name


def hf_logits_of(hf_model, src: torch.Tensor, dec: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=dec).logits


# --- tensor parallelism: export gathers the full weights, import keeps this rank's shard ----------------------

def _tp_worker(out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    parallel.initialize(tp_size=2, seed=8)
    cfg = tiny_cfg("post")
    model = Seq2SeqModel(cfg).eval()
    g = torch.Generator().manual_seed(9)  # the same full noise on both ranks
    noisy = {k: v + 0.1 * torch.randn(v.shape, generator=g) if isinstance(v, torch.Tensor) else v
             for k, v in full_state_dict(model).items()}
    load_full_state_dict(model, noisy)
    src, dec = batch(1024, seed=10)
    ours = our_ar_logits(model, src, dec)
    hf_model = to_hf(model)
    expected_hf, _ = to_hf_state_dict({k: v for k, v in noisy.items() if isinstance(v, torch.Tensor)}, cfg)
    again = from_hf(hf_model, aside=aside_weights(model))
    full_again = full_state_dict(again)
    result = {
        "local_qkv_rows": model.encoder_layers[0].self_attn.block.qkv.weight.shape[0],
        "export_exact": all(torch.equal(v, expected_hf[k]) for k, v in hf_model.state_dict().items()),
        "export_diff": (ours - hf_logits(hf_model, src, dec)).abs().max().item(),
        "import_diff": (our_ar_logits(again, src, dec) - ours).abs().max().item(),
        "round_trip_exact": all(torch.equal(full_again[k], v) for k, v in noisy.items() if isinstance(v, torch.Tensor)),
    }
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_export_and_import_under_tensor_parallelism(tmp_path):
    from conftest import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["local_qkv_rows"] == 3 * 64 // 2  # really sharded
        assert r["export_exact"] and r["round_trip_exact"]
        assert r["export_diff"] <= LOGITS_TOL and r["import_diff"] <= LOGITS_TOL


if __name__ == "__main__":
    _tp_worker(sys.argv[1])
