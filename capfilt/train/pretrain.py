"""``capfilt pretrain``: a MED on cleaned + human pairs with ITC + ITM + LM.

Without ``init``, a seeded MED (with the configured pretrained ViT and BERT, as the reference starts) is
written to ``OUT/init`` first, so that every Ray worker (and every resume) starts from the same folder;
its tokenizer is BERT's or one trained on the training captions. With ``init`` the given checkpoint is
the start, with its own tokenizer. The finished model is ``OUT/med``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from capfilt.config import Config
from capfilt.data.specs import expand_shards
from capfilt.model.hf import save_med
from capfilt.model.hub import resolve_model
from capfilt.model.init import bert_tokenizer, load_text, load_vision
from capfilt.model.med import MED
from capfilt.model.tokenizer import count_words, train_tokenizer
from capfilt.run.lease import Lease
from capfilt.train.data import count_pairs
from capfilt.train.distributed import run_job
from capfilt.train.loop import Job, final_checkpoint


def fresh_med(cfg: Config, words: Counter | None, path: Path) -> Path:
    """The MED pretraining starts from, saved at ``path``: seeded from the pretrain seed, with the
    configured pretrained ViT and BERT loaded (``model/init.py``). Its tokenizer is BERT's with
    ``model.text_init``, else one trained on ``words``, the training captions' word counts."""
    if cfg.model.text_init:
        tok = bert_tokenizer(cfg.model.text_init)
    elif words is None:
        raise ValueError("a MED without model.text_init trains its tokenizer: give the captions' word counts")
    else:  # the prompts go in too: a tokenizer that cannot spell "a picture of" turns it into [UNK]
        with_prompts = count_words([cfg.finetune.prompt, cfg.caption.prompt], Counter(words))
        tok = train_tokenizer(with_prompts, cfg.model.vocab_size)
    torch.manual_seed(cfg.pretrain.seed)
    med = MED.from_config(cfg.model, tok)
    with torch.no_grad():
        if cfg.model.vision_init:
            load_vision(med.vision, cfg.model.vision_init)
        if cfg.model.text_init:
            load_text(med, cfg.model.text_init)
    med.copy_to_momentum()
    return save_med(med, tok, path, {"config": cfg.to_dict()})


def pretrain(
    cfg: Config, shards: list[str], out: str | Path, init: str | Path | None = None, remote: str = ""
) -> Path:
    """Pretrain into ``out`` (checkpoints ``out/step-N``, final model ``out/med``); resumes if interrupted.
    With ``remote`` (the URL ``out`` mirrors) every checkpoint is uploaded there as it is written."""
    out, shards = Path(out), expand_shards(shards)
    with Lease(str(out)) as lease:  # two trainings in one folder would resume from each other's checkpoints
        if init is None:  # an uncached pretrained model fails now, not after a scan of the whole corpus
            for ref in (cfg.model.vision_init, cfg.model.text_init):
                if ref:
                    resolve_model(ref)
        fresh = init is None and not (out / "init" / "config.json").is_file()
        words = Counter() if fresh and not cfg.model.text_init else None  # only for a tokenizer to train
        counted = count_pairs(shards, words)
        print(f"[pretrain] {counted}", flush=True)
        if init is None:
            init = out / "init"
            if fresh:  # a pure function of the captions, the seed and the inits: a rerun rebuilds it
                fresh_med(cfg, words, init)
        job = Job(
            name="pretrain",
            config=cfg.to_dict(),
            stage="pretrain",
            init=str(init),
            shards=counted.shards,
            unordered=counted.unordered,
            out=str(out),
            n_pairs=counted.n_pairs,
            losses=["itc", "itm", "lm"],
            remote=remote,
            lease=lease.url,
            lease_owner=lease.owner,
        )
        run_job(job, cfg.pretrain)
        lease.check()
        final = out / "med"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(final_checkpoint(out) / "med", final)
        return final
