"""The filter stage: ITM match probability and ITC similarity of every candidate caption of an image.

Each image is encoded once, and so are the text layers' cross-attention keys and values of it, which its
candidates share. The candidates are scored in chunks of ``filter.batch_size``, shortest captions first:
a chunk is padded to its longest caption, and alt-texts range from a few tokens to the 35 kept, so
sorting saves text-encoder work in both passes.
ITM feeds the caption with its first token replaced by the one the checkpoint was trained with
(``[ENC]`` for ours, ``[CLS]`` for Salesforce's: BLIP_REFERENCE.md, traps) and takes softmax(itm_head)[:, 1]. ITC is the cosine of the normalised projected CLS features of the
image and of the unimodal text encoder (no cross-attention, ``[CLS]`` first), without temperature;
``filter.itc: false`` skips that pass and gives NaN (the selection uses ITM only, as BLIP's filter does).
Captions are normalised with BLIP's ``pre_caption`` first, as in training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from capfilt.config import FilterConfig
from capfilt.model.blip import ImageKeysValues, load_filter
from capfilt.model.tokenizer import normalize_caption, tokenize
from capfilt.model.vision import image_embeds

MAX_TEXT_TOKENS = 35  # the reference ITM model's text length


def length_chunks(lengths: list[int], size: int) -> Iterator[list[int]]:
    """Indices into ``lengths`` in chunks of ``size``, shortest first (ties in order): a chunk is padded
    to its longest text, so similar lengths share one."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), size):
        yield order[start : start + size]


class Filter:
    """Loads an HF-format ITM/ITC filter once and scores (image, caption) pairs."""

    def __init__(self, path: str, cfg: FilterConfig, device: str = "cpu", dtype: str = "float32"):
        self.dtype = getattr(torch, dtype)
        self.model, self.tokenizer, self.info = load_filter(path, device, self.dtype)
        self.cfg, self.device = cfg, torch.device(device)
        self.itm_first_id = self.info["itm_first_token_id"]

    def itm_only(self) -> Filter:
        """This filter without the ITC pass, sharing its loaded model (calibration reads ITM only)."""
        view = copy.copy(self)
        view.cfg = dataclasses.replace(self.cfg, itc=False)
        return view

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, captions: list[list[str]]) -> list[list[tuple[float, float]]]:
        """``captions[b]`` are image b's candidates; returns (itm, itc) per candidate, same shape."""
        return self.score_embeds(self.encode(pixels), captions)

    @torch.no_grad()
    def score_embeds(
        self, image_embeds: torch.Tensor, captions: list[list[str]]
    ) -> list[list[tuple[float, float]]]:
        """``score`` from the images' ViT embeddings, e.g. a captioner's that holds the same ViT
        (``Captioner.encode``): the round then encodes each image once for both."""
        if len(captions) != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} images but {len(captions)} caption lists")
        image_feat = self.image_features(image_embeds)
        image_kv = self.model.text_encoder.image_keys_values(image_embeds)  # once per image, not per caption
        pairs = [(b, text) for b, texts in enumerate(captions) for text in texts]
        scores: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
        for chunk in length_chunks([len(text) for _, text in pairs], self.cfg.batch_size):
            idx = torch.tensor([pairs[i][0] for i in chunk], device=self.device)
            texts = [pairs[i][1] for i in chunk]
            for i, score in zip(chunk, self.score_pairs(image_kv.for_rows(idx), image_feat[idx], texts)):
                scores[i] = score
        out, i = [], 0
        for texts in captions:
            out.append(scores[i : i + len(texts)])
            i += len(texts)
        return out

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's image embeddings [B, tokens, width] of a batch of pixels."""
        return image_embeds(self.model.vision_model, pixels.to(self.device, self.dtype))

    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ViT embeddings [B, N, D], normalised ITC image features [B, E]) of a batch of pixels."""
        embeds = self.encode(pixels)
        return embeds, self.image_features(embeds)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features [B, E]: the ViT's first token, projected."""
        return F.normalize(self.model.vision_proj(image_embeds[:, 0]), dim=-1)

    def score_pairs(
        self, image_kv: ImageKeysValues, image_feat: torch.Tensor, texts: list[str]
    ) -> list[tuple[float, float]]:
        """(ITM match probability, ITC similarity) of each text against its image, given as ``image_kv``
        with one row per text (:meth:`ImageKeysValues.for_rows`) and ``image_feat`` [texts, E]."""
        ids, mask = self._tokenize(texts)
        itm = self._itm(ids, mask, image_kv=image_kv).tolist()
        if not self.cfg.itc:
            return [(score, float("nan")) for score in itm]
        itc = (image_feat * self.text_features(ids, mask)).sum(-1)
        return list(zip(itm, itc.float().tolist()))

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text features [texts, E]: the unimodal text encoder's first token, projected."""
        cls = self.model.text_encoder(ids, mask, first_token_only=True).last_hidden_state[:, 0]
        return F.normalize(self.model.text_proj(cls), dim=-1)

    def match(self, image_embeds: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """ITM match probability (float32, on the CPU) of each text against the image embeddings on its row."""
        return self._itm(*self._tokenize(texts), image_embeds=image_embeds).cpu()

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize(self.tokenizer, [normalize_caption(t) for t in texts], MAX_TEXT_TOKENS)
        return ids.to(self.device), mask.to(self.device)

    def _itm(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        image_kv: ImageKeysValues | None = None,
    ) -> torch.Tensor:
        """ITM match probabilities against the image of each row: its embeddings or their projections."""
        itm_ids = ids.clone()
        itm_ids[:, 0] = self.itm_first_id
        fused = self.model.text_encoder(
            itm_ids, mask, encoder_hidden_states=image_embeds, image_kv=image_kv, first_token_only=True
        ).last_hidden_state[:, 0]
        return self.model.itm_head(fused).float().softmax(-1)[:, 1]
