"""Measure a CapFilt round: throughput of ``run_round`` against a naive loop, and the filter's decisions.

The naive loop is what a first script does: one image at a time, Pillow decode, HF ``generate``, then
the ITM head on the web caption and the synthetic one, no batching, no KV-cache-aware sampler, no
overlap. Both run in the same process on the same shards, so their ratio is meaningful even on a
shared machine. Used for docs/BENCHMARKS.md ('CapFilt round'); not a test.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from typing import Any

import torch

from capfilt.config import Config
from capfilt.data.decode import pillow_decode
from capfilt.data.reader import ShardReader
from capfilt.data.sample import Sample
from capfilt.data.specs import expand_shards
from capfilt.model.hf import load_captioner, load_filter
from capfilt.model.tokenizer import normalize_caption
from capfilt.run.round import run_round


@torch.no_grad()
def naive_images_per_s(cfg: Config, shards: list[str], captioner: str, filter_: str, limit: int) -> float:
    cap, cap_tok, cap_info = load_captioner(captioner)
    flt, flt_tok, flt_info = load_filter(filter_)
    prompt = cap_tok([cfg.caption.prompt], return_tensors="pt").input_ids
    samples = (s for url in expand_shards(shards) for s in ShardReader(url) if isinstance(s, Sample))
    start, n = time.perf_counter(), 0
    for s in itertools.islice(samples, limit):
        pixels = pillow_decode(s, cfg.run.image_size, cfg.run.max_pixels)
        if not torch.is_tensor(pixels):
            continue
        pixels = pixels[None]
        ids = cap.generate(
            pixel_values=pixels,
            input_ids=prompt.clone(),
            do_sample=True,
            top_p=cfg.caption.top_p,
            repetition_penalty=cfg.caption.repetition_penalty,
            min_length=cfg.caption.min_length,
            max_length=cfg.caption.max_length,
        )
        synthetic = cap_tok.decode(ids[0], skip_special_tokens=True)[len(cfg.caption.prompt) :]
        for text in (s.caption, synthetic):
            tok = flt_tok([normalize_caption(text)], return_tensors="pt", truncation=True, max_length=35)
            tok.input_ids[:, 0] = flt_info["itm_first_token_id"]
            flt(
                input_ids=tok.input_ids,
                attention_mask=tok.attention_mask,
                pixel_values=pixels,
                use_itm_head=True,
            ).itm_score.softmax(-1)
        n += 1
    return n / (time.perf_counter() - start)


def bench_round(
    cfg: Config,
    shards: list[str],
    captioner: str,
    filter_: str,
    truth: str | None = None,
    naive_limit: int = 200,
    local: bool = False,
) -> dict[str, Any]:
    """Round throughput (fresh run folder, model loading included and excluded), naive throughput, ratio,
    and the filter's precision/recall of dropping noisy web captions when ``truth`` is given."""
    out = tempfile.mkdtemp(prefix="capfilt-bench-")
    try:
        summary = run_round(cfg, shards, out, captioner, filter_, local=local, progress=False)
        run = summary["this_invocation"]
        stage = run["stage_seconds"]
        per_actor_busy = (
            stage.get("total", 0.0) / max(1, min(cfg.run.actors, run["shards"]))
            if not local
            else stage.get("total", 0.0)
        )
        result: dict[str, Any] = {
            "images": run["n_in"],
            "round_images_per_s": run["images_per_s"],
            "round_images_per_s_excluding_startup": run["n_in"] / per_actor_busy if per_actor_busy else 0.0,
            "stage_seconds": stage,
            "kept_rate": summary["kept_rate"],
            "kept_rate_by_source": summary["kept_rate_by_source"],
        }
        result["naive_images_per_s"] = naive_images_per_s(cfg, shards, captioner, filter_, naive_limit)
        result["speedup"] = result["round_images_per_s"] / result["naive_images_per_s"]
        if truth:
            from capfilt.eval.filtering import round_metrics

            result["filter"] = round_metrics(out, truth, cfg.filter.threshold)
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)
