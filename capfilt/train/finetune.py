"""``capfilt finetune``: a captioner (LM) and a filter (ITC+ITM) from one MED, sharing no parameter.

Each is its own training job that loads its own copy of the MED, so neither can see the other's
updates (BLIP's "confirmation bias": shared parameters keep each other's mistakes). The captioner
learns "a picture of " + caption with the prompt masked out of the loss; the filter learns with image
ids, so the several references of one image are positives of each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from capfilt.config import Config
from capfilt.data.specs import expand_shards
from capfilt.model.hf import export_captioner, export_filter, load_med
from capfilt.run.lease import Lease
from capfilt.train.data import count_pairs
from capfilt.train.distributed import run_job
from capfilt.train.loop import Job, final_checkpoint


def shared_tensors(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of ``a``'s tensors whose storage ``b`` also uses (must be empty for captioner vs filter)."""
    b_ptrs = {t.untyped_storage().data_ptr() for t in b.state_dict().values()}
    return [n for n, t in a.state_dict().items() if t.untyped_storage().data_ptr() in b_ptrs]


def finetune(cfg: Config, med_path: str | Path, shards: list[str], out: str | Path, remote: str = "") -> dict:
    """Write ``out/captioner`` and ``out/filter`` (HF folders) and ``out/finetune.json``; with ``remote``
    (the URL ``out`` mirrors) every training checkpoint is uploaded there as it is written."""
    out, shards = Path(out), expand_shards(shards)
    with Lease(str(out)) as lease:  # two trainings in one folder would resume from each other's checkpoints
        counted = count_pairs(shards)
        print(f"[finetune] {counted}", flush=True)
        stage = cfg.finetune
        jobs = {
            "captioner": dict(losses=["lm"], prompt=stage.prompt),
            "filter": dict(losses=["itc", "itm"], use_idx=True),
        }
        report = {
            "config": cfg.to_dict(),
            "med": str(med_path),
            "n_pairs": counted.n_pairs,
            "rejected": dict(counted.rejects),
        }
        models = {}
        for name, kind in jobs.items():
            job = Job(
                name=name,
                config=cfg.to_dict(),
                stage="finetune",
                init=str(med_path),
                shards=counted.shards,
                unordered=counted.unordered,
                out=str(out / "train" / name),
                n_pairs=counted.n_pairs,
                remote=f"{remote}/train/{name}" if remote else "",
                lease=lease.url,
                lease_owner=lease.owner,
                **kind,
            )
            run_job(job, stage)
            ckpt = final_checkpoint(job.out)
            models[name] = load_med(ckpt / "med")
            state = json.loads((ckpt / "state.json").read_text())
            report[name] = {
                "steps": state["step"],
                "samples_per_s": state["samples_per_s"],
                "losses": state["history"],
            }
        (cap, tok, _), (filt, _, _) = models["captioner"], models["filter"]
        if shared := shared_tensors(cap, filt):
            raise AssertionError(f"captioner and filter share tensors: {shared[:5]}")
        lease.check()
        export_captioner(cap, tok, out / "captioner")
        export_filter(filt, tok, out / "filter")
        (out / "finetune.json").write_text(json.dumps(report, indent=1))
        return report
