"""Tiny random HF-format captioner/filter folders and tiny input shards, for the stage and round tests.

The round's contract with training is "HF-format folders", so random weights exercise every code path
in seconds. Import the fixtures into a test module: ``from run_helpers import tiny_models, tiny_shards``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.config import load_config
from capfilt.data.sample import Sample
from capfilt.data.writer import write_samples_shard
from capfilt.model.tokenizer import special_ids, train_tokenizer

WORDS = "a red green blue yellow square circle triangle on in near the big small picture of two one".split()


def make_models(folder: Path) -> tuple[str, str]:
    """Write a random tiny captioner and filter (our [ENC] ITM convention); return their folders."""
    rng = random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choices(WORDS, k=8)) for _ in range(200)], vocab_size=120)
    ids = special_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=ids["dec"],
        sep_token_id=ids["sep"],
        eos_token_id=ids["sep"],
        pad_token_id=ids["pad"],
        encoder_hidden_size=32,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(0)
    paths = []
    for name, cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        if name == "filter":
            config.capfilt = {"role": "filter", "itm_first_token": "[ENC]", "itc_temp": 0.07}
        path = folder / name
        cls(config).save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        paths.append(str(path))
    return paths[0], paths[1]


def png(seed: int) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (40, 36), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_shards(folder: Path, n_shards: int = 3, per_shard: int = 10) -> list[str]:
    """Input shards with one undecodable image in the first shard (a reject to account for)."""
    rng = random.Random(1)
    urls = []
    for s in range(n_shards):
        samples = [
            Sample(
                key=f"s{s}-{i:03d}",
                shard="",
                image=b"not an image" if (s, i) == (0, 3) else png(100 * s + i),
                image_ext="png",
                caption=" ".join(rng.choices(WORDS, k=5)),
                meta={"i": i},
            )
            for i in range(per_shard)
        ]
        url = str(folder / f"web-{s:06d}.tar")
        write_samples_shard(url, samples)
        urls.append(url)
    return urls


def tiny_cfg(*overrides: str):
    return load_config("tiny", ["run.actors=2", "caption.num_captions=2", *overrides])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"))
