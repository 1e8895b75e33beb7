"""Tiny, seeded model fixtures for tests (ours and the training/eval tests that use the MED)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from capfilt.config import ModelConfig, load_config
from capfilt.model.med import MED
from capfilt.model.tokenizer import normalize_caption, tokenize, train_tokenizer

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]


def tiny_captions() -> list[str]:
    return [f"a {c} {s} on a plain background." for c in COLORS for s in SHAPES]


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = load_config("tiny").model
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_tokenizer(vocab_size: int = 400):
    return train_tokenizer(tiny_captions() + ["a picture of"], vocab_size)


def tiny_med(tokenizer=None, seed: int = 0, **overrides) -> tuple[MED, object]:
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    return MED.from_config(tiny_model_config(**overrides), tokenizer), tokenizer


def tiny_batch(tokenizer, cfg: ModelConfig, n: int = 8, seed: int = 0):
    """n (pixels, ids, mask): each caption paired with an image whose colour channel pattern depends on it."""
    g = torch.Generator().manual_seed(seed)
    caps = [normalize_caption(c) for c in tiny_captions()[:n]]
    ids, mask = tokenize(tokenizer, caps, cfg.max_text_len)
    pixels = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g) * 0.1
    for i in range(n):
        pixels[i, i % 3] += 1.0 + i / n  # a visible, caption-specific signal
    return pixels, ids, mask


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run tiny models single-threaded: on a shared 2-core box, 2 threads make them ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def salesforce_like(folder: Path):
    """Tiny random ``folder/itm`` and ``folder/cap`` laid out like Salesforce/blip-itm-base-coco and
    blip-image-captioning-base: transformers' classes and config, a BertTokenizer with [DEC] as bos."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipTextConfig,
        BlipVisionConfig,
    )

    words = ["a", "red", "circle", "dog", "on", "the", "grass"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    vocab["[DEC]"], vocab["[ENC]"] = len(vocab), len(vocab) + 1
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]", extra_special_tokens=["[ENC]"])
    text = BlipTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=vocab["[DEC]"], sep_token_id=3, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    vision = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=16)
    torch.manual_seed(0)
    BlipForImageTextRetrieval(config).save_pretrained(folder / "itm")
    tok.save_pretrained(folder / "itm")
    BlipForConditionalGeneration(config).save_pretrained(folder / "cap")
    tok.save_pretrained(folder / "cap")
    return tok
