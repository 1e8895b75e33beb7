"""The captioner stage: synthetic captions for a batch of images (BLIP_REFERENCE.md, 'Generation').

Nucleus sampling runs in our own decoding loop over ``model.text_decoder``'s weights
(:mod:`capfilt.stages.sampler`), because HF ``generate`` draws every row from one random stream: a
sample's captions would then depend on its batch neighbours. Here each row's random stream is seeded
from (run seed, sample key, caption index) and drawn once per batch, before the loop, on the CPU: one
uniform per step. Each step then filters all rows at once and draws by inverse CDF over the nucleus,
with one host sync (how many rows are still going), so a sample gets the same captions whatever the
batch size, order, worker or retry. (That holds on the CPU. On a GPU, matrix products of different row
counts round differently, so in bf16 a caption can change with the batch size; the same batch, as in a
rerun or a retry, gives the same captions: docs/BENCHMARKS.md, 'GPU path'.) Until 2026-11-25 each row
drew with its own ``torch.multinomial`` call in a Python loop; the stream changed then, so a seed's
captions differ from those of earlier runs. The fixed-shape decoder of the same evening left 511 of 512
demo captions as they were (float rounding at one draw's boundary changed the last).

The per-step processing mirrors what the reference gets from HF ``generate`` (BLIP passes
``do_sample=True, top_p=0.9, repetition_penalty=1.1, min_length, max_length`` and no ``top_k``, so HF's
default top_k=50 applies too): repetition penalty over the row's tokens (prompt included), eos
suppressed below min_length, top-k 50, top-p; then one draw per row. Like HF, ``min_length`` and
``max_length`` count the whole sequence, ``[DEC]`` and the prompt included: with "a picture of " (4
tokens with [DEC]) and max_length 20 a caption has at most 16 new tokens, [SEP] included.
Beam search is deterministic, so ``method: beam`` uses HF ``generate`` as the reference does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from capfilt.config import CaptionConfig
from capfilt.errors import UserError
from capfilt.model import blip
from capfilt.model.vision import image_embeds
from capfilt.stages.sampler import Sampler


def row_seed(seed: int, key: str, index: int) -> int:
    """A stable 63-bit seed for caption ``index`` of sample ``key`` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def caption_tokens(
    ids: list[int], prompt_len: int, eos: int, continuation: Callable[[int], bool]
) -> list[int]:
    """The caption's token ids: whole words only, generated after the prompt.

    The reference cuts ``len(prompt)`` characters off the decoded text; when the tokenizer cannot
    spell the prompt (a word of it becomes [UNK], which decoding drops) that cut lands inside the
    caption's first words. Cutting by token count cannot. A row stopped by ``max_length`` before its
    [SEP] may end inside a word (the next piece could be a ``##`` continuation), so its last word
    goes; a leading continuation piece (sampled right after the prompt) goes too.
    """
    tokens = ids[prompt_len:]
    truncated = eos not in tokens
    if not truncated:
        tokens = tokens[: tokens.index(eos)]
    while tokens and continuation(tokens[0]):
        tokens = tokens[1:]
    if truncated:
        while tokens and continuation(tokens[-1]):
            tokens = tokens[:-1]
        tokens = tokens[:-1]
    return tokens


class Captioner:
    """Loads an HF-format captioner once and writes ``num_captions`` captions per image."""

    def __init__(
        self, path: str, cfg: CaptionConfig, device: str = "cpu", seed: int = 0, dtype: str = "float32"
    ):
        self.dtype = getattr(torch, dtype)
        if cfg.method == "beam":  # transformers' generate; sampling runs on capfilt's own modules
            from capfilt.model.hf import load_captioner
        else:
            load_captioner = blip.load_captioner
        self.model, self.tokenizer, self.info = load_captioner(path, device, self.dtype)
        self.cfg, self.device, self.seed = cfg, torch.device(device), seed
        self.bos, self.eos = self.info["dec_token_id"], self.info["sep_token_id"]
        prompt_ids = self.tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = [self.bos, *prompt_ids]  # [DEC] + prompt, trailing [SEP] dropped
        if cfg.max_length <= len(self.prompt_ids):  # else every image would be a caption_failed reject
            raise UserError(
                f"caption.max_length ({cfg.max_length}) counts the prompt's {len(self.prompt_ids)} tokens "
                f"([DEC] and {cfg.prompt!r}) and leaves none to generate"
            )
        self.sampler = Sampler(self.model.text_decoder, cfg, self.prompt_ids, self.eos)

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """One list of ``num_captions`` captions per image, in input order."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(keys)} keys")
        if self.cfg.method == "beam":
            return self._texts(self._beam(pixels.to(self.device, self.dtype)), len(keys))
        return self.caption_embeds(self.encode(pixels), keys)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT's image embeddings [B, tokens, width], once per image whatever ``num_captions``."""
        return image_embeds(self.model.vision_model, pixels.to(self.device, self.dtype))

    @torch.no_grad()
    def caption_embeds(self, embeds: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """``caption`` from the images' embeddings (:meth:`encode`), which a filter with the same ViT
        reuses; nucleus sampling only (beam search runs HF ``generate``, which encodes the pixels itself)."""
        if self.cfg.method == "beam":
            raise ValueError("caption.method beam encodes the images itself: call caption(pixels, keys)")
        if len(keys) != embeds.shape[0]:
            raise ValueError(f"{embeds.shape[0]} images but {len(keys)} keys")
        n = self.cfg.num_captions
        gens = [self._generator(key, i) for key in keys for i in range(n)]
        return self._texts(self._sample(embeds.repeat_interleave(n, dim=0), gens), len(keys))

    def _texts(self, ids: list[list[int]], images: int) -> list[list[str]]:
        """Each image's ``num_captions`` texts from the generated rows (image-major)."""
        texts, n = [self._text(row) for row in ids], self.cfg.num_captions
        return [texts[b * n : (b + 1) * n] for b in range(images)]

    def _generator(self, key: str, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(row_seed(self.seed, key, index))

    def _text(self, ids: list[int]) -> str:
        """Decode the whole words generated after the prompt (see :func:`caption_tokens`)."""
        words = caption_tokens(ids, len(self.prompt_ids), self.eos, self._continuation)
        return self.tokenizer.decode(words, skip_special_tokens=True).strip()

    def _continuation(self, token_id: int) -> bool:
        return self.tokenizer.convert_ids_to_tokens(token_id).startswith("##")

    def _sample(self, image_embeds: torch.Tensor, gens: list[torch.Generator]) -> list[list[int]]:
        """Nucleus sampling (:class:`Sampler`); each row's random stream is drawn up front on the CPU (so
        it is the same on every device): one uniform per step, the row's own, whatever else is in the batch."""
        uniforms = torch.stack([torch.rand(self.sampler.steps, generator=g) for g in gens])
        tokens = self.sampler.sample(image_embeds, uniforms)
        return [self.prompt_ids + [t for t in row if t >= 0] for row in tokens.tolist()]

    def _beam(self, pixels: torch.Tensor) -> list[list[int]]:
        """Beam search through HF ``generate`` (which drops the trailing token it is given, hence [SEP])."""
        prompt = torch.tensor([[*self.prompt_ids, self.eos]] * pixels.shape[0], device=self.device)
        out = self.model.generate(
            pixel_values=pixels,
            input_ids=prompt,
            num_beams=self.cfg.num_beams,
            num_return_sequences=self.cfg.num_captions,
            max_length=self.cfg.max_length,
            min_length=self.cfg.min_length,
            repetition_penalty=1.0,
            do_sample=False,
        )
        return out.tolist()
