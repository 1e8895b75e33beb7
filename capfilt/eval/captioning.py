"""Captioning quality: BLEU-4 and CIDEr against references, and attribute accuracy on the demo world.

Captions come from the captioner stage's own generation (``capfilt.stages.captioner.Captioner``) with
the reference's eval setting: beam search, 3 beams, max 20, min 5, prompt "a picture of " cut from the
output. pycocoevalcap's scorers are pure Python; its PTBTokenizer needs Java, so captions are tokenised
by ``normalize_caption`` and whitespace instead.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from capfilt.config import CaptionConfig
from capfilt.data.synth import caption_accuracy
from capfilt.eval.heldout import HeldOut
from capfilt.model.tokenizer import normalize_caption
from capfilt.stages.captioner import Captioner


def eval_caption_config(cfg: CaptionConfig) -> CaptionConfig:
    """The reference's caption-eval setting: one beam-search caption, 3 beams, lengths 5..20."""
    return dataclasses.replace(cfg, method="beam", num_beams=3, max_length=20, min_length=5, num_captions=1)


@torch.no_grad()
def generate(captioner_path: str, data: HeldOut, cfg: CaptionConfig, batch_size: int = 32) -> list[str]:
    """One caption per held-out image, in order."""
    captioner = Captioner(str(captioner_path), eval_caption_config(cfg))
    captions = []
    for start in range(0, len(data.keys), batch_size):
        keys = data.keys[start : start + batch_size]
        captions += [c[0] for c in captioner.caption(data.pixels[start : start + batch_size], keys)]
    return captions


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (pycocoevalcap), both on normalised, whitespace-tokenised text."""
    res = {i: [normalize_caption(p)] for i, p in enumerate(predictions)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def attribute_accuracy(predictions: list[str], keys: list[str], truth: str) -> float | None:
    """Demo world only: share of captions that name an object and state nothing false of the scene.

    None when ``truth`` has no ``scene`` column (a team's own labels file).
    """
    if "scene" not in pq.read_schema(truth).names:
        return None
    scenes = {
        r["key"]: json.loads(r["scene"]) for r in pq.read_table(truth, columns=["key", "scene"]).to_pylist()
    }
    return sum(caption_accuracy(p, scenes[k]) for p, k in zip(predictions, keys)) / max(len(predictions), 1)


def evaluate_captioning(
    captioner_path: str, data: HeldOut, cfg: CaptionConfig, truth: str | None = None, examples: int = 8
) -> dict:
    """BLEU-4, CIDEr, attribute accuracy (with a ``truth`` that has scenes) and a few example captions."""
    predictions = generate(captioner_path, data, cfg)
    metrics = caption_scores(predictions, data.references)
    accuracy = attribute_accuracy(predictions, data.keys, truth) if truth is not None else None
    if accuracy is not None:
        metrics["attribute_accuracy"] = accuracy
    metrics["examples"] = [
        {"key": k, "caption": p, "reference": r[0]}
        for k, p, r in zip(data.keys[:examples], predictions, data.references)
    ]
    return metrics
