"""A bootstrap round on S3 (moto's server): inputs, cleaning run outputs, checkpoints and markers all on
``s3://``, the driver SIGKILLed twice, each rerun from a fresh scratch folder, i.e. from S3 alone.

The first driver dies in the middle of round 1's cleaning run, the second right after round 1's step-4
pretraining checkpoint. The finished round's run outputs must be the bytes of an uninterrupted run with
the same models, and its resumed MED must equal an uninterrupted pretraining (test_train_loop.py's
promise), with every step run once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capfilt.config import load_config
from capfilt.data.mirror import SCRATCH_ENV
from capfilt.run.faults import KILL_DIR
from capfilt.run.round import run_round
from capfilt.train.pretrain import pretrain

pytestmark = pytest.mark.slow

CAPFILT = str(Path(sys.executable).parent / "capfilt")
OUT = "s3://bucket/boot"
STEPS = {"round-0": ["pretrain", "finetune", "eval"], "round-1": ["run", "pretrain", "finetune", "eval"]}


def _bootstrap(tmp_path: Path, attempt: str, kill: str | None) -> subprocess.CompletedProcess:
    """`capfilt bootstrap` to OUT in a new process with its own empty scratch folder, armed to SIGKILL
    itself at ``kill`` (a faults.py point) when given."""
    hooks = tmp_path / f"hooks-{attempt}"
    hooks.mkdir()
    if kill:
        (hooks / f"{kill}.kill").write_text("1")
    env = os.environ | {SCRATCH_ENV: str(tmp_path / f"scratch-{attempt}"), KILL_DIR: str(hooks)}
    world = "s3://bucket/world"
    argv = [CAPFILT, "bootstrap", "--web", f"{world}/web-*.tar", "--human", f"{world}/human-*.tar"]
    argv += ["--test", f"{world}/test-*.tar", "--out", OUT, "--rounds", "1", "--local", "--config", "tiny"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def _markers(s3) -> dict[str, list[str]]:
    s3.invalidate_cache()
    return {rd: [s for s in steps if s3.exists(f"{OUT}/{rd}/{s}.done")] for rd, steps in STEPS.items()}


def _files(s3, url: str) -> dict[str, bytes]:
    """A run folder's shard outputs (stats without their timings, which are measured)."""
    s3.invalidate_cache()
    return {
        Path(p).name: s3.cat_file(p)
        for p in s3.find(url)
        if Path(p).name.startswith("web-") and not p.endswith((".done", ".stats.json"))
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_bootstrap_on_s3_resumes_from_s3_after_the_driver_is_killed(s3, tiny_world, tmp_path):
    s3.put(f"{tiny_world}/", "bucket/world/", recursive=True)

    killed = _bootstrap(tmp_path, "a", kill="web-000001")  # mid-run: shard 1's first batch is computed
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _markers(s3) == {"round-0": STEPS["round-0"], "round-1": []}
    assert s3.exists(f"{OUT}/round-0/pretrain/latest") and s3.exists(f"{OUT}/round-0/finetune/captioner")

    killed = _bootstrap(tmp_path, "b", kill="pretrain.step-4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert _markers(s3) == {"round-0": STEPS["round-0"], "round-1": ["run"]}
    assert s3.cat_file(f"{OUT}/round-1/pretrain/latest") == b"step-4"

    done = _bootstrap(tmp_path, "c", kill=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _markers(s3) == STEPS
    log = done.stdout.splitlines()
    skipped = [f"round-0: {s} already done" for s in STEPS["round-0"]] + ["round-1: run already done"]
    assert set(skipped) <= set(log) and "round-1: pretrain ..." in log
    assert "[pretrain] resuming from step-4" in log  # from the checkpoint on S3, not from scratch
    assert log[-1].startswith("round-1")  # the round table's last row

    # What an uninterrupted run and pretraining give with the same inputs, computed here from S3.
    cfg = load_config("tiny")
    models = tmp_path / "round-0-models"
    s3.get(f"{OUT}/round-0/finetune/", f"{models}/", recursive=True)
    reference = tmp_path / "run"
    web = ["s3://bucket/world/web-*.tar"]
    summary = run_round(
        cfg,
        web,
        str(reference),
        str(models / "captioner"),
        str(models / "filter"),
        local=True,
        progress=False,
        human=["s3://bucket/world/human-*.tar"],
    )
    assert summary["n_in"] == 64 and not summary["failed_shards"]
    assert _files(s3, f"{OUT}/round-1/run") == {
        p.name: p.read_bytes()
        for p in sorted(reference.glob("web-*"))
        if not p.name.endswith((".done", ".stats.json"))
    }
    pre = tmp_path / "round-1-pretrain"
    s3.get(f"{OUT}/round-1/pretrain/", f"{pre}/", recursive=True)
    shards = [f"{OUT}/round-1/run/*.tar", "s3://bucket/world/human-*.tar"]
    straight = pretrain(cfg, shards, tmp_path / "straight", init=pre / "init")  # the MED round 1 started from
    resumed = pre / "med"
    want = _weights(straight)
    got = _weights(resumed)
    assert got.keys() == want.keys()
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-6, msg=name)
