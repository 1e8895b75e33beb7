"""Measure a CapFilt round against what a user would write instead, in one process, on the same shards.

The baseline is the batched script a competent user writes with transformers alone (:class:`HFScript`):
per batch, ``BlipForConditionalGeneration.generate(do_sample=True, top_p, repetition_penalty, min_length,
max_length)``, then ``BlipForImageTextRetrieval(use_itm_head=True)`` on the web and the synthetic
captions. The one-image loop is the same script with batches of one. Both are compared with capfilt
twice: model only (decoded batches in memory, ``Captioner.caption`` + ``Filter.score`` against the
script's two calls; once more with ``filter.itc: false``, which does the script's work: capfilt also
scores ITC by default) and end to end (read, decode, caption, score, select, write the same outputs:
``run_round``, as ``capfilt run`` does, against the script's sequential loop, model loading included in
both). Used for docs/BENCHMARKS.md; not a test of speed.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from capfilt.config import Config, ConfigError, ModelConfig
from capfilt.data import writer
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader
from capfilt.data.specs import expand_shards
from capfilt.model.hf import export_captioner, export_filter, load_captioner, load_filter
from capfilt.model.tokenizer import normalize_caption
from capfilt.run.pipeline import decoded_batches, score_batch, shard_stats
from capfilt.run.round import run_round
from capfilt.stages.captioner import Captioner
from capfilt.stages.filter import MAX_TEXT_TOKENS, Filter


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


def random_models(model: ModelConfig, out: str | Path, captions: list[str]) -> tuple[str, str]:
    """A captioner and a filter with random weights at ``model``'s size, for timing where no trained ones
    exist (a random captioner seldom writes [SEP], so its captions run to ``max_length``)."""
    from transformers import BertTokenizer

    from capfilt.model.med import MED
    from capfilt.model.tokenizer import DEC_TOKEN, ENC_TOKEN, train_tokenizer

    vocab = train_tokenizer(captions, min(model.vocab_size, 1000)).get_vocab()
    vocab |= {
        f"[unused{i}]": len(vocab) + i for i in range(model.vocab_size - len(vocab))
    }  # full-size LM head
    tok = BertTokenizer(vocab=vocab, bos_token=DEC_TOKEN, extra_special_tokens=[ENC_TOKEN])
    torch.manual_seed(0)
    med = MED.from_config(model, tok)
    out = Path(out)
    return str(export_captioner(med, tok, out / "captioner")), str(export_filter(med, tok, out / "filter"))


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


def model_images_per_s(pairs: dict[str, tuple[Any, Any]], batches: list) -> dict[str, float]:
    """Images/s of each (captioner, filter) pair on the same decoded batches, after one warm-up batch each.

    The pairs take turns batch by batch, so a change in the machine's speed during the measurement (this
    project's 2-core machine drifts by 10-20 % within minutes) falls on all of them alike; timed one after
    the other, the ratio between two pairs moved by half between runs (docs/BENCHMARKS.md).
    """
    seconds = dict.fromkeys(pairs, 0.0)
    for i, (pixels, keys, web) in enumerate([batches[0], *batches]):
        for name, (cap, flt) in pairs.items():
            start = time.perf_counter()
            caps = cap.caption(pixels, keys)
            flt.score(pixels, [[w, *c] for w, c in zip(web, caps)])
            if i > 0:
                seconds[name] += time.perf_counter() - start
    images = sum(len(keys) for _, keys, _ in batches)
    return {name: images / s for name, s in seconds.items()}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_round(
    cfg: Config,
    shards: list[str],
    captioner: str,
    filter_: str,
    truth: str | None = None,
    model_images: int = 1024,
    one_image: list[str] | None = None,
    local: bool = False,
    address: str | None = None,
) -> dict[str, Any]:
    """Model-only and end-to-end images/s of capfilt, the batched HF script and the one-image loop, their
    ratios, capfilt's wall time against its model time, and the filter's precision/recall given ``truth``.
    The one-image loop, the slowest, runs on ``one_image`` (default: the first shard) for its rate.
    capfilt's round starts a local Ray, or joins the cluster at ``address`` (``auto``: a running one), where
    a scheduled job pays neither Ray's start nor its shutdown."""
    if cfg.run.actors == "auto":
        raise ConfigError("bench_round compares per-actor model time: set a fixed run.actors")
    urls, bs = expand_shards(shards), cfg.run.batch_size
    decoder, batches = PillowDecoder(cfg.run.image_size, 1, cfg.run.max_pixels), []
    for batch in decoded_batches(ShardReader(urls[0]), decoder, bs):
        if batch.samples and sum(len(k) for _, k, _ in batches) < model_images:
            batches.append((batch.pixels, [s.key for s in batch.samples], [s.caption for s in batch.samples]))
    ours = (Captioner(captioner, cfg.caption, seed=cfg.run.seed), Filter(filter_, cfg.filter))
    itm_only = (ours[0], Filter(filter_, dataclasses.replace(cfg.filter, itc=False)))  # the script's work
    script = HFScript(cfg, captioner, filter_)
    pairs = {"capfilt": ours, "capfilt_itm_only": itm_only, "hf_script": (script, script)}
    model = model_images_per_s(pairs, batches)
    del ours, itm_only, script

    tmp = tempfile.mkdtemp(prefix="capfilt-bench-")
    try:
        summary, ours_s = timed(
            run_round, cfg, shards, f"{tmp}/capfilt", captioner, filter_, local, address, progress=False
        )
        run = summary["this_invocation"]
        n_script, script_s = timed(
            lambda: script_round(cfg, urls, f"{tmp}/hf", HFScript(cfg, captioner, filter_), bs)
        )
        n_one, one_s = timed(
            lambda: script_round(
                cfg, one_image or urls[:1], f"{tmp}/one", HFScript(cfg, captioner, filter_), 1
            )
        )
        stage = run["stage_seconds"]
        actors = 1 if local else min(cfg.run.actors, len(urls))
        model_s = (stage.get("caption", 0.0) + stage.get("score", 0.0)) / actors
        e2e = {
            "capfilt_run": run["n_in"] / ours_s,
            "hf_script": n_script / script_s,
            "one_image": n_one / one_s,
        }
        result: dict[str, Any] = {
            "images": run["n_in"],
            "ray": "in-process" if local else f"joined {address}" if address else "started locally",
            "model_images": sum(len(k) for _, k, _ in batches),
            "model_images_per_s": model,
            "e2e_images_per_s": e2e,
            "ratios": {
                "model_vs_hf_script": model["capfilt"] / model["hf_script"],
                "model_itm_only_vs_hf_script": model["capfilt_itm_only"] / model["hf_script"],
                "e2e_vs_hf_script": e2e["capfilt_run"] / e2e["hf_script"],
                "e2e_vs_one_image": e2e["capfilt_run"] / e2e["one_image"],
                "wall_over_model_time": ours_s / model_s if model_s else None,
            },
            "stage_seconds": stage,
            "startup_seconds": run["startup_seconds"],
            "close_seconds": run["close_seconds"],
            "kept_rate": summary["kept_rate"],
            "kept_rate_by_source": summary["kept_rate_by_source"],
        }
        if truth:
            from capfilt.eval.filtering import round_metrics

            result["filter"] = round_metrics(f"{tmp}/capfilt", truth, cfg.filter.threshold)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
