"""S3 end to end against moto's server: expand specs, read shards, write round outputs atomically.

capfilt reaches an S3-compatible endpoint through standard settings, no code: botocore's
``AWS_ENDPOINT_URL`` (used here) or fsspec's ``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3`` config.
"""

from __future__ import annotations

import pytest
from conftest import is_done, make_sample
from run_helpers import tiny_cfg

from capfilt.data.reader import ShardReader
from capfilt.data.sample import Candidate, Sample, ScoredSample, ShardStats
from capfilt.data.specs import ShardSpecError, expand_shards
from capfilt.data.writer import atomic_open, output_name, write_round_shard, write_samples_shard
from capfilt.run.round import run_round

pytest_plugins = ["run_helpers"]  # tiny_models


def test_s3_specs_read_and_atomic_round_outputs(s3):
    for shard in range(2):
        samples = [make_sample(f"web-{shard}{i:07d}", caption=f"caption {i}") for i in range(3)]
        write_samples_shard(f"s3://bucket/in/web-{shard:06d}.tar", samples)
    urls = expand_shards(["s3://bucket/in/web-{000000..000001}.tar"])
    assert urls == ["s3://bucket/in/web-000000.tar", "s3://bucket/in/web-000001.tar"]
    assert expand_shards(["s3://bucket/in/*.tar"]) == urls
    with pytest.raises(ShardSpecError, match="do not exist"):
        expand_shards(["s3://bucket/in/web-{000000..000002}.tar"])

    reader = ShardReader(urls[1])
    samples = list(reader)
    assert not reader.truncated and [s.caption for s in samples] == ["caption 0", "caption 1", "caption 2"]
    assert all(isinstance(s, Sample) and s.shard == urls[1] for s in samples)

    results = [
        ScoredSample(s, [Candidate(s.caption, "web", 0.8, 0.3, True)], True, s.caption) for s in samples
    ]
    stats = ShardStats(urls[1], n_in=3, kept=3)
    assert not is_done("s3://bucket/out", "web-000001")
    write_round_shard("s3://bucket/out", "web-000001", results, stats, {"round": 1})
    assert is_done("s3://bucket/out", "web-000001")
    assert sorted(p.rsplit("/", 1)[1] for p in s3.ls("bucket/out")) == [
        f"web-000001{e}" for e in (".done", ".parquet", ".scores.parquet", ".stats.json", ".tar")
    ]
    assert [s.key for s in ShardReader("s3://bucket/out/web-000001.tar")] == [s.key for s in samples]


def test_s3_failed_write_leaves_no_object(s3):
    with pytest.raises(RuntimeError), atomic_open("s3://bucket/partial/x.tar") as f:
        f.write(b"half a shard")
        raise RuntimeError("killed")
    assert not s3.exists("bucket/partial/x.tar")


def test_mirror_pulls_what_a_resume_needs_and_pushes_no_temp_files(s3, tmp_path, monkeypatch):
    from capfilt.data.mirror import SCRATCH_ENV, Mirror

    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "scratch"))
    first = Mirror("s3://bucket/boot")
    assert first.remote and first.local.is_relative_to(tmp_path / "scratch")
    pre = first.local / "round-0" / "pretrain"
    for rel in ["step-4/med/model.safetensors", "step-8/med/model.safetensors", "init/config.json", ".x.tmp"]:
        (pre / rel).parent.mkdir(parents=True, exist_ok=True)
        (pre / rel).write_text(rel)
    (pre / "latest").write_text("step-8")
    first.push(pre)  # a step's outputs: its checkpoints are uploaded as they are written, not here
    s3.invalidate_cache()
    assert sorted(s3.find("bucket/boot")) == [
        "bucket/boot/round-0/pretrain/init/config.json",
        "bucket/boot/round-0/pretrain/latest",
    ]
    for step in ("step-4", "step-8"):
        s3.pipe(f"bucket/boot/round-0/pretrain/{step}/med/model.safetensors", step.encode())
    s3.pipe("bucket/boot/round-1/run/web-000000.tar", b"read where it lies")
    assert first.url_of(pre / "latest") == "s3://bucket/boot/round-0/pretrain/latest"

    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "fresh"))  # another machine
    second = Mirror("s3://bucket/boot/")
    second.pull(skip_dirs=("run",), pointer="latest")
    got = sorted(p.relative_to(second.local).as_posix() for p in second.local.rglob("*") if p.is_file())
    assert got == [
        "round-0/pretrain/init/config.json",
        "round-0/pretrain/latest",
        "round-0/pretrain/step-8/med/model.safetensors",
    ]
    assert (second.local / "round-0/pretrain/step-8/med/model.safetensors").read_text() == "step-8"
    assert first.upload_url(pre) == "s3://bucket/boot/round-0/pretrain"
    for local in (tmp_path / "local", f"file://{tmp_path}/local"):  # the folder itself, nothing uploaded
        mirror = Mirror(local)
        assert mirror.local == tmp_path / "local" and mirror.upload_url(mirror.local / "pretrain") == ""


def test_a_job_into_a_bucket_that_does_not_exist_is_refused_and_creates_none(s3):
    """s3fs's makedirs creates a missing bucket: a typo in the bucket's name used to fill a new bucket.
    ``capfilt synth``, which holds no lease, ended in s3fs's traceback."""
    from capfilt.data.synth import write_world
    from capfilt.errors import UserError
    from capfilt.run.lease import Lease

    with (
        pytest.raises(UserError, match="s3://typo-bucket/out: its bucket does not exist"),
        Lease("s3://typo-bucket/out"),
    ):
        pass
    with pytest.raises(UserError, match="s3://typo-bucket/world: its bucket does not exist"):
        write_world("s3://typo-bucket/world", tiny_cfg().synth)
    assert not s3.exists("typo-bucket")


def test_a_shard_pinned_to_an_s3_version_reads_that_version(s3, tmp_path, tiny_models):
    """s3fs reads ``s3://b/key?versionId=V`` as that version of the object: a way to pin a run's inputs.
    Before, the ``?`` made the spec a glob that matched no file, and the version was part of the shard's
    file name, so a pinned ``.tar.gz`` would have been read as a plain tar and written as ``web-0.tar.gz?..``."""
    import gzip

    import s3fs

    s3.mkdir("versioned")
    s3.make_bucket_versioned("versioned")
    for n in (3, 2):  # two versions of one shard
        write_samples_shard(str(tmp_path / "web-0.tar"), [make_sample(f"{i:04d}") for i in range(n)])
        s3.pipe("versioned/in/web-0.tar.gz", gzip.compress((tmp_path / "web-0.tar").read_bytes()))
    listed = s3fs.S3FileSystem(version_aware=True).object_version_info("versioned/in/web-0.tar.gz")
    first = next(v for v in listed if not v["IsLatest"])
    pinned = f"s3://versioned/in/web-0.tar.gz?versionId={first['VersionId']}"
    assert expand_shards([pinned]) == [pinned]
    reader = ShardReader(pinned)
    assert [s.key for s in reader] == ["0000", "0001", "0002"] and not reader.truncated
    assert output_name(pinned) == "web-0" and len(list(ShardReader("s3://versioned/in/web-0.tar.gz"))) == 2
    summary = run_round(tiny_cfg(), [pinned], str(tmp_path / "run"), *tiny_models, local=True, progress=False)
    assert summary["n_in"] == 3 and summary["shards_done"] == 1 and (tmp_path / "run" / "web-0.done").exists()
