"""Training checkpoints: ``OUT/step-N/`` (the MED folder, the optimiser in safetensors, a small json)
and ``OUT/latest`` naming the newest one, optionally uploaded to a remote copy of OUT. Never pickle.

A checkpoint is written to a temporary folder, flushed to the disk and renamed, and ``latest`` is
replaced atomically, so a run killed mid-write, or a machine that crashed, resumes from the previous
checkpoint. No RNG state is stored: the loop derives all randomness from (seed, step) and the data
order from (seed, epoch).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from capfilt.data.mirror import put_tree
from capfilt.data.writer import fsync_path, fsync_tree
from capfilt.model.hf import readable_weights, save_med

LATEST = "latest"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint ``OUT/latest`` names, or None when the run has not checkpointed yet."""
    pointer = Path(out) / LATEST
    return Path(out) / pointer.read_text().strip() if pointer.is_file() else None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as flat ``"{param}.{name}"`` tensors, and its param groups as plain data."""
    sd = opt.state_dict()
    tensors = {
        f"{i}.{name}": t.detach().cpu().contiguous()
        for i, state in sd["state"].items()
        for name, t in state.items()
    }
    return tensors, sd["param_groups"]


def save_checkpoint(
    out: str | Path, step: int, med, tokenizer, opt: torch.optim.Optimizer, state: dict, remote: str = ""
) -> Path:
    """Write ``OUT/step-{step}`` atomically and point ``OUT/latest`` at it; with ``remote`` (the URL that
    OUT mirrors) upload both there too, the pointer last, so the remote ``latest`` names a whole one."""
    out = Path(out)
    final, tmp = out / f"step-{step}", out / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_med(med, tokenizer, tmp / "med", {"step": step})
    tensors, groups = optimizer_tensors(opt)
    save_file(tensors, tmp / "optimizer.safetensors")
    readable_weights(tmp / "med", tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state | {"step": step, "param_groups": groups}))
    fsync_tree(tmp)  # on the disk before ``latest`` can name it: a crash must not leave it naming a torn one
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_path(out)
    pointer = out / f".{LATEST}.tmp"
    pointer.write_text(final.name)
    fsync_path(pointer)
    os.replace(pointer, out / LATEST)
    fsync_path(out)
    if remote:
        put_tree(final, f"{remote}/{final.name}")
        put_tree(out / LATEST, f"{remote}/{LATEST}")
    return final


def load_state(ckpt: Path, opt: torch.optim.Optimizer) -> dict:
    """Restore the optimiser from a checkpoint; returns its json state (step, loss history, ...)."""
    state = json.loads((ckpt / "state.json").read_text())
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in load_file(ckpt / "optimizer.safetensors").items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state
