"""Tiny, seeded model fixtures for tests (ours and the training/eval tests that use the MED)."""

from __future__ import annotations

import contextlib

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
