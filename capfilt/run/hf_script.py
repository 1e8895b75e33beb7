"""The batched HF script a competent user writes instead of capfilt, as a class and as a command.

Per batch: ``BlipForConditionalGeneration.generate(do_sample=True, top_p, repetition_penalty, min_length,
max_length)``, then ``BlipForImageTextRetrieval(use_itm_head=True)`` on the web and the synthetic captions,
with transformers' own classes. It reads, decodes, selects and writes with capfilt's reader, decoder and
writer, so that its outputs are a round's outputs and only the models' code differs.

``python -m capfilt.run.hf_script CONFIG.yaml CAPTIONER FILTER OUT URL...`` runs it as a user runs a
script: a fresh process that imports torch and transformers, loads both models, then goes through the
shards one batch after the other. ``capfilt bench --parts round`` times it beside ``capfilt run``, both from
launch to exit. It imports no Ray (tests/test_bench.py checks).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from capfilt.config import Config, load_config
from capfilt.data import writer
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.data.specs import expand_shards
from capfilt.model.hf import load_captioner, load_filter
from capfilt.model.tokenizer import normalize_caption
from capfilt.run.pipeline import decoded_batches, score_batch, shard_stats
from capfilt.stages.filter import MAX_TEXT_TOKENS


class HFScript:
    """The user's script with the stage interface (``caption``, ``score``), so it runs the same batches."""

    def __init__(
        self, cfg: Config, captioner: str, filter_: str, device: str = "cpu", dtype: str = "float32"
    ):
        self.dtype = getattr(torch, dtype)
        self.cap, self.cap_tok, _ = load_captioner(captioner, device, self.dtype)
        self.flt, self.flt_tok, info = load_filter(filter_, device, self.dtype)
        self.itm_first, self.cfg, self.device = info["itm_first_token_id"], cfg.caption, torch.device(device)

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        c = self.cfg
        prompt = self.cap_tok([c.prompt] * len(keys), return_tensors="pt").input_ids.to(self.device)
        ids = self.cap.generate(
            pixel_values=pixels.to(self.device, self.dtype),
            input_ids=prompt,
            do_sample=True,
            top_p=c.top_p,
            repetition_penalty=c.repetition_penalty,
            min_length=c.min_length,
            max_length=c.max_length,
        )
        return [
            [t[len(c.prompt) :].strip()] for t in self.cap_tok.batch_decode(ids, skip_special_tokens=True)
        ]

    @torch.no_grad()
    def score(self, pixels: torch.Tensor, captions: list[list[str]]) -> list[list[tuple[float, float]]]:
        """ITM of every caption in one call, the image repeated per caption; the script has no ITC (NaN)."""
        rows = [b for b, texts in enumerate(captions) for _ in texts]
        tok = self.flt_tok(
            [normalize_caption(t) for texts in captions for t in texts],
            padding="longest",
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            return_tensors="pt",
        )
        tok.input_ids[:, 0] = self.itm_first
        itm = (
            self.flt(
                input_ids=tok.input_ids.to(self.device),
                attention_mask=tok.attention_mask.to(self.device),
                pixel_values=pixels[rows].to(self.device, self.dtype),
                use_itm_head=True,
            )
            .itm_score.float()
            .softmax(-1)[:, 1]
        )
        it = iter(itm.tolist())
        return [[(next(it), float("nan")) for _ in texts] for texts in captions]


def script_round(cfg: Config, urls: list[str], out: str, script: Any, batch_size: int) -> int:
    """The script's end to end, one step after the other: per shard, read and decode a batch, caption,
    score, select; then write the shard's outputs as a round does. Returns the images read."""
    decoder, n = PillowDecoder(cfg.run.image_size, 1, cfg.run.max_pixels), 0
    for url in urls:
        shard, results, rejects, n_in = ShardReader(url), [], [], 0
        for batch in decoded_batches(shard, decoder, batch_size):
            n_in += batch.n_in
            rejects += batch.rejects
            if batch.samples:
                done, failed = score_batch(batch, script, script, cfg.filter.threshold, {})
                results += done
                rejects += failed
        stats = shard_stats(url, results, rejects, n_in, shard.truncated)
        writer.write_round_shard(out, writer.output_name(url), results, stats, {"script": "hf"})
        n += n_in
    return n


def main(argv: list[str]) -> None:
    """``CONFIG.yaml CAPTIONER FILTER OUT URL...``: the script over the shards in batches of ``run.batch_size``."""
    config, captioner, filter_, out, *shards = argv
    cfg = load_config(config)
    n = script_round(cfg, expand_shards(shards), out, HFScript(cfg, captioner, filter_), cfg.run.batch_size)
    print(f"{n} images")


if __name__ == "__main__":
    main(sys.argv[1:])
