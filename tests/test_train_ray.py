"""Data-parallel pretraining with Ray Train: 2 CPU workers (gloo) finish and leave a loadable checkpoint."""

import pytest
import ray
from test_train_data import make_shard

from capfilt.config import load_config
from capfilt.model.hf import load_med
from capfilt.train.checkpoint import latest_checkpoint
from capfilt.train.pretrain import pretrain


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_two_workers_pretrain(local_ray, tmp_path):
    shards = [make_shard(tmp_path / "web.tar", 64)]
    cfg = load_config("tiny", ["pretrain.steps=3", "pretrain.workers=2"])  # global batch 16, queue 32
    out = pretrain(cfg, shards, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-3"
    med, tok, _ = load_med(out)
    assert int(med.queue_ptr[0]) == (3 * 16) % 32  # the queue advanced by the global batch
