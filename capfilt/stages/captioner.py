"""The captioner stage: synthetic captions for a batch of images (BLIP_REFERENCE.md, 'Generation').

Nucleus sampling runs in our own decoding loop over ``model.text_decoder`` with the KV cache, because
HF ``generate`` draws every row from one random stream: a sample's captions would then depend on its
batch neighbours. Here each row's random stream is seeded from (run seed, sample key, caption index) and
drawn once per batch, before the loop, on the CPU: one uniform per step. Each step then filters all rows
at once and draws by inverse CDF over the nucleus, with one host sync (how many rows are still going),
so a sample gets the same captions whatever the batch size, order, worker or retry. (Until
2026-11-25 each row drew with its own ``torch.multinomial`` call in a Python loop; the stream changed
then, so a seed's captions differ from those of earlier runs.)

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
from capfilt.model.hf import load_captioner

REFERENCE_TOP_K = 50  # HF generate's default, in force in the reference's nucleus sampling


def row_seed(seed: int, key: str, index: int) -> int:
    """A stable 63-bit seed for caption ``index`` of sample ``key`` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def nucleus(
    logits: torch.Tensor, seqs: torch.Tensor, cfg: CaptionConfig, eos: int, top_k: int = REFERENCE_TOP_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [R, V] → the nucleus of each row: (probabilities [R, k], token ids [R, k]),
    most likely first, zero outside the nucleus; each row from its own tokens ``seqs`` [R, L] only.

    HF's chain (repetition penalty, min length, top-k, top-p) on the k best tokens instead of a sort of
    the whole vocabulary: HF keeps a token when the probability mass *below* it exceeds 1 - top_p, that
    is when the mass *above* it (most likely first) is under top_p; the most likely token always stays.
    """
    scores = logits.gather(1, seqs)
    scores = torch.where(scores < 0, scores * cfg.repetition_penalty, scores / cfg.repetition_penalty)
    logits = logits.scatter(1, seqs, scores)
    if seqs.shape[1] < cfg.min_length:
        logits[:, eos] = -float("inf")
    top, ids = torch.topk(logits, min(top_k, logits.shape[-1]))
    probs = top.softmax(-1)
    above = probs.cumsum(-1) - probs
    return probs.masked_fill(above >= cfg.top_p, 0.0), ids


def draw(probs: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF: the first candidate whose cumulative mass exceeds u·total."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    return ids.gather(1, pick.clamp_(max=ids.shape[1] - 1)).squeeze(1)


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
        self.model, self.tokenizer, self.info = load_captioner(path, device, self.dtype)
        self.cfg, self.device, self.seed = cfg, torch.device(device), seed
        self.bos, self.eos = self.info["dec_token_id"], self.info["sep_token_id"]
        prompt_ids = self.tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = [self.bos, *prompt_ids]  # [DEC] + prompt, trailing [SEP] dropped

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """One list of ``num_captions`` captions per image, in input order."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(keys)} keys")
        pixels, n = pixels.to(self.device, self.dtype), self.cfg.num_captions
        if self.cfg.method == "beam":
            ids = self._beam(pixels)
        else:
            image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state  # once per image
            gens = [self._generator(key, i) for key in keys for i in range(n)]
            ids = self._sample(image_embeds.repeat_interleave(n, dim=0), gens)
        texts = [self._text(row) for row in ids]
        return [texts[b * n : (b + 1) * n] for b in range(len(keys))]

    def _generator(self, key: str, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(row_seed(self.seed, key, index))

    def _text(self, ids: list[int]) -> str:
        """Decode the whole words generated after the prompt (see :func:`caption_tokens`)."""
        words = caption_tokens(ids, len(self.prompt_ids), self.eos, self._continuation)
        return self.tokenizer.decode(words, skip_special_tokens=True).strip()

    def _continuation(self, token_id: int) -> bool:
        return self.tokenizer.convert_ids_to_tokens(token_id).startswith("##")

    def _sample(self, image_embeds: torch.Tensor, gens: list[torch.Generator]) -> list[list[int]]:
        """Nucleus sampling with the KV cache; finished rows leave the batch (and the cache)."""
        rows, steps = len(gens), self.cfg.max_length - len(self.prompt_ids)
        # Each row's whole random stream, drawn up front on the CPU (so it is the same on every device):
        # one uniform per step, the row's own, whatever else is in the batch.
        uniforms = torch.stack([torch.rand(steps, generator=g) for g in gens]).to(self.device)
        seqs = torch.tensor([self.prompt_ids] * rows, device=self.device)
        active = torch.arange(rows, device=self.device)
        tokens = torch.full((rows, steps), -1, device=self.device)
        step_ids, cache = seqs, None
        for step in range(steps):
            out = self.model.text_decoder(
                input_ids=step_ids, encoder_hidden_states=image_embeds, cache=cache, use_cache=True
            )
            cache = out.cache
            nxt = draw(*nucleus(out.logits[:, -1, :].float(), seqs, self.cfg, self.eos), uniforms[:, step])
            tokens[active, step] = nxt
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            going = nxt != self.eos
            n_going = int(going.sum())  # the step's one host sync
            if n_going == 0:
                break
            if n_going < len(active):  # rows that wrote [SEP] leave, their cache too
                keep = torch.argsort((~going).byte(), stable=True)[:n_going]
                cache.batch_select_indices(keep)
                seqs, active, uniforms, image_embeds = (
                    seqs[keep],
                    active[keep],
                    uniforms[keep],
                    image_embeds[keep],
                )
            step_ids = seqs[:, -1:]
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
