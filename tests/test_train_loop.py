"""Pretraining on the tiny config: loss goes down, a resumed run equals an uninterrupted one, and no rank
is left with only empty shards."""

import json
import shutil
from itertools import islice

import pytest
import torch
from test_train_data import make_shard

from capfilt.config import load_config
from capfilt.data.writer import write_tar
from capfilt.model.hf import load_med
from capfilt.train import pretrain as pretrain_module
from capfilt.train.checkpoint import latest_checkpoint
from capfilt.train.data import PairBatches
from capfilt.train.loop import Schedule
from capfilt.train.pretrain import pretrain


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return [make_shard(d / "web.tar", 48), make_shard(d / "human.tar", 8, refs=2, start=48)]


def tiny(steps: int, **pretrain):
    sets = [f"pretrain.steps={steps}", "pretrain.checkpoint_every=4", "pretrain.batch_size=8"]
    return load_config("tiny", sets + [f"pretrain.{k}={v}" for k, v in pretrain.items()])


def test_schedule_warmup_cosine_and_alpha_ramp():
    cfg = tiny(0)
    s = Schedule(cfg.pretrain, steps_per_epoch=10, alpha=0.4)
    assert s.total == 10  # tiny: 1 epoch
    assert s.lr(0) == pytest.approx(cfg.pretrain.lr / 2) and s.lr(1) == pytest.approx(cfg.pretrain.lr)
    assert s.lr(s.total) == pytest.approx(cfg.pretrain.min_lr)
    assert s.alpha_at(0) == 0 and s.alpha_at(10) == pytest.approx(0.2) and s.alpha_at(40) == 0.4


def test_pretrain_reduces_loss(shards, tmp_path):
    out = pretrain(tiny(24, lr=0.002), shards, tmp_path)
    history = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["history"]
    assert len(history) == 24

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    first, last = history[:4], history[-4:]
    # LM is what 24 steps move reliably; ITC rises while its queue fills with real features.
    assert mean("lm", last) < 0.8 * mean("lm", first), (mean("lm", first), mean("lm", last))
    assert mean("loss", last) < mean("loss", first)
    med, _, _ = load_med(out)
    assert med.cfg.image_size == 32


def test_resume_equals_uninterrupted(shards, tmp_path):
    cfg = tiny(12)  # 64 pairs / 8 = 8 steps per epoch: resume mid-epoch 0, then cross into epoch 1
    straight = load_med(pretrain(cfg, shards, tmp_path / "straight"))[0].state_dict()
    # A run killed right after its step-4 checkpoint: that checkpoint (and the init) alone, then resumed.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "straight" / "init", crashed / "init")
    shutil.copytree(tmp_path / "straight" / "step-4", crashed / "step-4")
    (crashed / "latest").write_text("step-4")
    resumed = load_med(pretrain(cfg, shards, crashed))[0].state_dict()
    assert latest_checkpoint(crashed).name == "step-12"
    curves = [
        json.loads((d / "step-12" / "state.json").read_text())["history"]
        for d in (tmp_path / "straight", crashed)
    ]
    assert [p["step"] for p in curves[1]] == [p["step"] for p in curves[0]] == list(range(1, 13))
    for resumed_point, point in zip(*curves):
        assert resumed_point == pytest.approx(point, abs=1e-5)
    assert resumed.keys() == straight.keys()
    for name, t in straight.items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6, msg=name)


def test_a_shard_without_a_pair_is_no_ranks_share(shards, tmp_path, monkeypatch):
    """A cleaned shard whose every caption was dropped is an empty tar. Of two shards on two ranks it would
    be one rank's whole share, and that rank would run out of data: training leaves it out."""
    empty = str(tmp_path / "empty.tar")
    write_tar(empty, [])
    jobs = []
    monkeypatch.setattr(pretrain_module, "run_job", lambda job, stage: jobs.append(job))
    cfg = tiny(0, workers=2)
    with pytest.raises(RuntimeError, match="wrote no checkpoint"):  # the stand-in trains nothing
        pretrain(cfg, [empty, shards[0]], tmp_path / "run")
    steps = jobs[0].n_pairs // (cfg.pretrain.batch_size * 2)  # the loop's steps_per_epoch: 3
    for rank in (0, 1):
        assert len(list(islice(PairBatches(jobs[0].shards, cfg.pretrain, 0, rank, 2), steps))) == steps
    assert jobs[0].shards == [shards[0]]


def test_a_checkpoint_is_on_the_disk_before_latest_names_it(tmp_path, disk_events):
    """After a machine crash, ``latest`` never names a checkpoint whose files did not reach the disk."""
    from capfilt.model.testing import tiny_med
    from capfilt.train.checkpoint import save_checkpoint
    from capfilt.train.loop import make_optimizer

    med, tok = tiny_med()
    save_checkpoint(tmp_path, 4, med, tok, make_optimizer(med, tiny(4).pretrain), {"history": []})
    out, final = str(tmp_path), tmp_path / "step-4"
    renamed = disk_events.index(("rename", str(final)))
    flushed = {path for kind, path in disk_events[:renamed] if kind == "fsync"}
    files = [p.relative_to(final) for p in final.rglob("*")]
    assert files and all(str(tmp_path / ".step-4.tmp" / f) in flushed for f in files)
    assert disk_events[renamed:] == [
        ("rename", str(final)),
        ("fsync", out),
        ("fsync", f"{out}/.latest.tmp"),
        ("rename", f"{out}/latest"),
        ("fsync", out),
    ]
