"""Data-parallel pretraining with Ray Train: 2 CPU workers (gloo) finish and leave a loadable checkpoint."""

import json
import time

import pytest
import ray
from conftest import scrambled
from test_train_data import make_shard

from capfilt.config import load_config
from capfilt.model.hf import load_med
from capfilt.run.lease import LeaseLost
from capfilt.train.checkpoint import latest_checkpoint
from capfilt.train.pretrain import pretrain


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_two_workers_pretrain(local_ray, tmp_path, monkeypatch, capsys):
    """Into ``-o run`` as a user types it: before, Ray Train refused the relative storage path ("URI has
    empty scheme"). The shard is a tar of a folder in its hash order, which each rank reads grouped."""
    (tmp_path / "hashed").mkdir()
    scrambled(make_shard(tmp_path / "web.tar", 64), str(tmp_path / "hashed" / "web.tar"))
    monkeypatch.chdir(tmp_path)
    # global batch 16, queue 32; caption ids, which every rank gathers into its queue as the features
    cfg = load_config("tiny", ["pretrain.steps=3", "pretrain.workers=2", "model.same_text_positives=true"])
    out = pretrain(cfg, ["hashed/web.tar"], "run")
    assert "64 pairs, rejected {}, 1 not in key order" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step-3"
    med, tok, _ = load_med(out)
    assert int(med.queue_ptr[0]) == (3 * 16) % 32  # the queue advanced by the global batch
    assert (med.text_idx_queue != -100).all()  # 48 pairs' caption ids queued
    assert (med.idx_queue == -100).all()  # and no image ids: pretraining gives none


def test_ranks_on_ray_train_stop_once_the_lease_is_taken_over(local_ray, tmp_path, monkeypatch):
    """The ranks read the lease themselves (the driver holding it may be the one that stalled): none
    writes a checkpoint, and the driver says LeaseLost, not Ray Train's wrapped failure. (Without
    Ray Train's restarts, 20 s each here: a restarted group stops at its first check the same way.)"""
    from capfilt.train import distributed
    from capfilt.train import pretrain as pretrain_module

    monkeypatch.setattr(distributed, "MAX_FAILURES", 0)

    out, run_job = tmp_path / "run", pretrain_module.run_job
    other = {"owner": "y", "host": "another-node", "pid": 1, "renewed": time.time()}

    def taken_over_first(job, stage):
        (out / "lease.json").write_text(json.dumps(other))
        run_job(job, stage)

    monkeypatch.setattr(pretrain_module, "run_job", taken_over_first)
    cfg = load_config("tiny", ["pretrain.steps=3", "pretrain.workers=2"])
    with pytest.raises(LeaseLost, match="another-node"):
        pretrain(cfg, [make_shard(tmp_path / "web.tar", 64)], out)
    assert latest_checkpoint(out) is None and not list(out.glob("step-*"))
