"""The captioner stage: synthetic captions for a batch of images (BLIP_REFERENCE.md, 'Generation').

Nucleus sampling runs in our own decoding loop over ``model.text_decoder`` with the KV cache, because
HF ``generate`` draws every row from one random stream: a sample's captions would then depend on its
batch neighbours. Here each row owns a ``torch.Generator`` seeded from (run seed, sample key, caption
index), so the same sample gets the same captions whatever the batch size, order, worker or retry.

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


def process_logits(
    logits: torch.Tensor, seqs: torch.Tensor, cfg: CaptionConfig, eos: int, top_k: int = REFERENCE_TOP_K
) -> torch.Tensor:
    """Next-token logits [R, V] → filtered logits, each row from its own tokens ``seqs`` [R, L] only."""
    scores = logits.gather(1, seqs)
    scores = torch.where(scores < 0, scores * cfg.repetition_penalty, scores / cfg.repetition_penalty)
    logits = logits.scatter(1, seqs, scores)
    if seqs.shape[1] < cfg.min_length:
        logits[:, eos] = -float("inf")
    k = min(top_k, logits.shape[-1])
    logits = logits.masked_fill(logits < torch.topk(logits, k)[0][..., -1:], -float("inf"))
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= (1 - cfg.top_p)
    drop[..., -1:] = False  # keep at least the most likely token
    return logits.masked_fill(drop.scatter(1, sorted_idx, drop), -float("inf"))


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

    def __init__(self, path: str, cfg: CaptionConfig, device: str = "cpu", seed: int = 0):
        self.model, self.tokenizer, self.info = load_captioner(path, device)
        self.cfg, self.device, self.seed = cfg, torch.device(device), seed
        self.bos, self.eos = self.info["dec_token_id"], self.info["sep_token_id"]
        prompt_ids = self.tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = [self.bos, *prompt_ids]  # [DEC] + prompt, trailing [SEP] dropped

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """One list of ``num_captions`` captions per image, in input order."""
        if len(keys) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(keys)} keys")
        pixels, n = pixels.to(self.device), self.cfg.num_captions
        if self.cfg.method == "beam":
            ids = self._beam(pixels)
        else:
            image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state  # once per image
            gens = [self._generator(key, i) for key in keys for i in range(n)]
            ids = self._sample(image_embeds.repeat_interleave(n, dim=0), gens)
        texts = [self._text(row) for row in ids]
        return [texts[b * n : (b + 1) * n] for b in range(len(keys))]

    def _generator(self, key: str, index: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(row_seed(self.seed, key, index))

    def _text(self, ids: list[int]) -> str:
        """Decode the whole words generated after the prompt (see :func:`caption_tokens`)."""
        words = caption_tokens(ids, len(self.prompt_ids), self.eos, self._continuation)
        return self.tokenizer.decode(words, skip_special_tokens=True).strip()

    def _continuation(self, token_id: int) -> bool:
        return self.tokenizer.convert_ids_to_tokens(token_id).startswith("##")

    def _sample(self, image_embeds: torch.Tensor, gens: list[torch.Generator]) -> list[list[int]]:
        """Nucleus sampling with the KV cache; finished rows leave the batch (and the cache)."""
        rows = len(gens)
        seqs = torch.tensor([self.prompt_ids] * rows, device=self.device)
        active = torch.arange(rows, device=self.device)
        done: dict[int, list[int]] = {}
        step_ids, cache = seqs, None
        while True:
            out = self.model.text_decoder(
                input_ids=step_ids,
                encoder_hidden_states=image_embeds[active],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            probs = process_logits(out.logits[:, -1, :].float(), seqs, self.cfg, self.eos).softmax(-1)
            nxt = torch.cat(
                [torch.multinomial(probs[j], 1, generator=gens[r]) for j, r in enumerate(active.tolist())]
            )
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            finished = (nxt == self.eos) | (seqs.shape[1] >= self.cfg.max_length)
            for j in finished.nonzero().flatten().tolist():
                done[int(active[j])] = seqs[j].tolist()
            if bool(finished.all()):
                return [done[r] for r in range(rows)]
            keep = (~finished).nonzero().flatten()
            if len(keep) < len(active):
                cache.batch_select_indices(keep)
                seqs, active = seqs[keep], active[keep]
            step_ids = seqs[:, -1:]

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
