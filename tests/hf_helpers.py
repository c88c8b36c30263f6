"""Hugging Face checkpoints built locally for the interop tests (no download): a byte-level BPE tokenizer trained
with the `tokenizers` library on Gigaword text and numbered as BART's is (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask>
last), and a tiny BART- or mBART-shaped model with random weights saved beside it, as a public checkpoint folder is;
logits of ours and of Hugging Face models on the same batch. Imported by tests/test_hf_*.py (pytest puts tests/ on
sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path

BART_SPECIAL = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}  # facebook/bart-*'s numbering


def train_bart_style_tokenizer(shared_data: Path, folder: Path, vocab_size: int = 1000):
    """The tokenizer described above, saved into `folder` as a PreTrainedTokenizerFast; returns it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = (shared_data / "glge/gigaword/train.src").read_text(encoding="utf-8").split("\n")[:5000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.add_special_tokens(["<mask>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", mask_token="<mask>", sep_token="</s>", cls_token="<s>")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_bart_checkpoint(shared_data: Path, folder: Path, *, mbart: bool = False, vocab_size: int = 1024,
                          max_positions: int = 64, seed: int = 0) -> Path:
    """A BART (post-LN) or mBART (pre-LN, scale_embedding) checkpoint folder with the tokenizer above: config.json
    (BART's special ids), model.safetensors, the tokenizer files."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    train_bart_style_tokenizer(shared_data, folder)
    config_class, model_class = (MBartConfig, MBartForConditionalGeneration) if mbart else \
        (BartConfig, BartForConditionalGeneration)
    config = config_class(vocab_size=vocab_size, d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=max_positions, scale_embedding=mbart,
                          init_std=0.0688, decoder_start_token_id=2, **BART_SPECIAL)
    torch.manual_seed(seed)
    model_class(config).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == 1
    return folder


def our_logits(model, src, dec):
    """Our model's logits in plain AR mode (the main stream), what Hugging Face BART computes."""
    import torch

    from model.streams import build_streams

    with torch.no_grad():
        return model.logits(model.decode(model.encode(src), build_streams("ar", prev_tokens=dec)).hidden)


def hf_logits(hf_model, src, dec, pad: int):
    import torch

    with torch.no_grad():
        return hf_model(input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=dec).logits


def source_batch(tokenizer, sources: list[str], max_len: int = 32):
    """(sources padded with our pad 0, decoder inputs: our bos + the first source tokens) in our ids."""
    import torch

    from finetune.decoding import encode_sources

    ids = encode_sources(tokenizer, sources, max_len)
    width = max(map(len, ids))
    src = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    dec = torch.cat([torch.full((len(ids), 1), 2), src[:, :6].clamp(min=5)], dim=1)
    return src, dec
