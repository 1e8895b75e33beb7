"""Writing round outputs: contents, reproducible bytes, Parquet for pyarrow and pandas, atomicity."""

from __future__ import annotations

import errno
import fnmatch
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import DECODE_MAX_PIXELS, bad_shard_members, is_done, make_sample

from capfilt.data import writer
from capfilt.data.decode import PillowDecoder
from capfilt.data.reader import ShardReader, iter_shard
from capfilt.data.sample import Candidate, Reject, ScoredSample, ShardStats
from capfilt.data.writer import (
    SCORES_SCHEMA,
    is_temp,
    output_name,
    write_round_shard,
    write_tar,
)

PROVENANCE = {"round": 1, "captioner": "sha256:aa", "filter": "sha256:bb", "seed": 0}


def scored(n: int = 4, shard: str = "in/web-000000.tar") -> tuple[list[ScoredSample], ShardStats]:
    """n samples; the odd ones kept through their synthetic caption, the even ones dropped."""
    results = []
    for i in range(n):
        s = make_sample(f"web-{i:08d}", caption=f"alt text {i}", url=f"http://x/{i}")
        s.shard, s.extra = shard, {"cls": str(i).encode()}
        keep = i % 2 == 1
        cands = [
            Candidate(s.caption, "web", itm=0.1, itc=0.2),
            Candidate(f"a red circle {i}", "synthetic", 0.9, 0.4, keep),
        ]
        results.append(ScoredSample(s, cands, keep, cands[1].text if keep else ""))
    stats = ShardStats(shard, n_in=n + 1, kept=n // 2, dropped=n - n // 2)
    stats.reject(Reject("broken", shard, "bad_json", "x"))
    return results, stats


def test_round_outputs_contents(tmp_path):
    results, stats = scored()
    done = write_round_shard(str(tmp_path), "web-000000", results, stats, PROVENANCE)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        f"web-000000{e}" for e in (".done", ".parquet", ".scores.parquet", ".stats.json", ".tar")
    ]
    assert is_done(str(tmp_path), "web-000000") and not is_done(str(tmp_path), "web-000001")
    assert done["shard"] == "in/web-000000.tar" and done["provenance"] == PROVENANCE
    assert done["files"]["web-000000.tar"] == (tmp_path / "web-000000.tar").stat().st_size

    kept = list(iter_shard(str(tmp_path / "web-000000.tar")))
    assert [s.key for s in kept] == ["web-00000001", "web-00000003"]
    first = kept[0]
    assert first.image == results[1].sample.image  # original bytes, not re-encoded
    assert first.caption == "a red circle 1" and first.extra == {"cls": b"1"}
    assert first.meta["source_json"] == {"url": "http://x/1"} and first.meta["provenance"] == PROVENANCE
    assert [c["source"] for c in first.meta["candidates"]] == ["web", "synthetic"]
    assert first.meta["candidates"][1] == {
        "text": "a red circle 1",
        "source": "synthetic",
        "itm": 0.9,
        "itc": 0.4,
        "kept": True,
    }

    table = pq.read_table(tmp_path / "web-000000.parquet")
    assert (
        table.column("key").to_pylist() == ["web-00000001", "web-00000003"]
        and "image" not in table.column_names
    )
    frame = pd.read_parquet(tmp_path / "web-000000.parquet")
    assert frame["candidates"][0][1]["text"] == "a red circle 1"
    scores = pq.read_table(tmp_path / "web-000000.scores.parquet")
    assert scores.schema.equals(SCORES_SCHEMA) and scores.column("kept").to_pylist() == [
        False,
        True,
        False,
        True,
    ]
    assert pd.read_parquet(tmp_path / "web-000000.scores.parquet")["caption"].tolist()[:2] == [
        "",
        "a red circle 1",
    ]
    stats_json = json.loads((tmp_path / "web-000000.stats.json").read_text())
    assert stats_json["rejected"] == {"bad_json": 1} and stats_json["provenance"] == PROVENANCE


def test_parquet_image_bytes_and_bytes_reproducible(tmp_path):
    results, stats = scored()
    write_round_shard(str(tmp_path / "a"), "s", results, stats, PROVENANCE, parquet_image_bytes=True)
    write_round_shard(str(tmp_path / "b"), "s", results, stats, PROVENANCE, parquet_image_bytes=True)
    for ext in (".tar", ".parquet", ".scores.parquet", ".stats.json", ".done"):
        assert (tmp_path / "a" / f"s{ext}").read_bytes() == (tmp_path / "b" / f"s{ext}").read_bytes(), ext
    images = pq.read_table(tmp_path / "a" / "s.parquet").column("image").to_pylist()
    assert images == [results[1].sample.image, results[3].sample.image]
    with tarfile.open(tmp_path / "a" / "s.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in tar.getmembers()} == {(0, 0, 0, 0o644, "")}


def tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """What Python's tarfile writes for the members, as write_tar did before it wrote headers itself."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(writer._tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def test_write_tar_writes_what_tarfile_writes(tmp_path):
    """Byte for byte, for names on the template (ASCII, up to 100 bytes) and off it (longer, non-ASCII:
    a pax header first), data sizes around the 512-byte block, and archives ending anywhere in a record."""
    names = [
        "k0.jpg",
        "a/b/0001.seg.json",
        "x" * 96 + ".txt",
        "y" * 97 + ".txt",
        "caf\u00e9.jpg",
        "\u732b.txt",
    ]
    sizes = [0, 1, 511, 512, 513, 10_239, 10_240, 70_001]
    for count in (0, 1, 5, 17, 48):
        members = [(names[i % len(names)], bytes([i % 251]) * sizes[i % len(sizes)]) for i in range(count)]
        writer.write_tar(str(tmp_path / "t.tar"), members)
        assert (tmp_path / "t.tar").read_bytes() == tarfile_bytes(members), count
    with tarfile.open(tmp_path / "t.tar") as tar:  # and tarfile reads the names back
        assert {m.name for m in tar.getmembers()} == set(names)


@pytest.mark.parametrize("image_bytes", [False, True])
def test_a_shard_written_batch_by_batch_is_the_shard_written_at_once(tmp_path, image_bytes):
    """What a round does (the kept samples streamed into the tar as each batch is scored) gives the bytes
    of writing all results at once, with or without images in the Parquet file."""
    results, stats = scored(7)
    write_round_shard(str(tmp_path / "once"), "s", results, stats, PROVENANCE, image_bytes)
    with writer.RoundShardWriter(str(tmp_path / "batches"), "s", PROVENANCE, image_bytes) as out:
        for start, stop in ((0, 2), (2, 2), (2, 5), (5, 7)):  # an empty batch too
            out.add(results[start:stop])
        assert not is_done(str(tmp_path / "batches"), "s")
        assert all(is_temp(p.name) for p in (tmp_path / "batches").iterdir())  # nothing visible yet
        out.commit(stats)
    for ext in (".tar", ".parquet", ".scores.parquet", ".stats.json", ".done"):
        assert (tmp_path / "once" / f"s{ext}").read_bytes() == (tmp_path / "batches" / f"s{ext}").read_bytes()


def test_a_shard_that_fails_before_its_commit_leaves_nothing(tmp_path):
    results, _ = scored()
    with pytest.raises(RuntimeError, match="model died"):
        with writer.RoundShardWriter(str(tmp_path), "s", PROVENANCE) as out:
            out.add(results[:2])
            raise RuntimeError("model died")
    assert list(tmp_path.iterdir()) == []


def test_temp_owner_names_the_shard_a_temp_file_was_written_for():
    for ext in writer.ROUND_SUFFIXES:
        assert writer.temp_owner(f"/out/.web.000001{ext}.0123456789ab.tmp") == "web.000001"
    assert writer.temp_owner("/out/.manifest.json.0123456789ab.tmp") is None
    assert writer.temp_owner("/out/web-000001.tar") is None


def test_stats_must_agree_with_results(tmp_path):
    results, stats = scored()
    stats.kept += 1
    with pytest.raises(AssertionError):
        write_round_shard(str(tmp_path), "s", results, stats, PROVENANCE)
    assert not is_done(str(tmp_path), "s")


def test_output_names_unique_across_folders():
    a, b, c = "s3://b/crawl1/web-000003.tar", "s3://b/crawl2/web-000003.tar", "s3://b/crawl1/web-000004.tar"
    assert output_name(c, [a, b, c]) == "web-000004"
    assert output_name("/data/x.tar.gz") == "x" and output_name("/data/Y.TAR.GZ") == "Y"
    na, nb = output_name(a, [a, b, c]), output_name(b, [a, b, c])
    assert na != nb and na.startswith("web-000003-") and len(na) == len("web-000003-") + 8


def test_bad_shard_end_to_end_conservation(tmp_path):
    """Read → decode → (keep every decoded sample) → write: in = written + rejected, reasons counted."""
    members, expected = bad_shard_members()
    url = str(tmp_path / "bad.tar")
    write_tar(url, members)
    reader = ShardReader(url)
    items = list(reader)
    stats = ShardStats(url, n_in=len(items), truncated=reader.truncated)
    samples = []
    for item in items:
        (stats.reject(item) if isinstance(item, Reject) else samples.append(item))
    decoded = PillowDecoder(24, max_pixels=DECODE_MAX_PIXELS).decode(samples)
    results = []
    for s, d in zip(samples, decoded):
        if isinstance(d, Reject):
            stats.reject(d)
        else:
            results.append(ScoredSample(s, [Candidate(s.caption, "web", 0.9, 0.5, True)], True, s.caption))
    stats.kept = len(results)
    write_round_shard(str(tmp_path / "out"), "bad", results, stats, PROVENANCE)
    written = len(list(iter_shard(str(tmp_path / "out" / "bad.tar"))))
    want = {}
    for reason in expected.values():
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert stats.rejected == want
    assert stats.n_in == written + sum(stats.rejected.values()) == len(expected)
    assert set(want) >= {
        "missing_image",
        "duplicate_key",
        "bad_text",
        "bad_json",
        "empty_image",
        "undecodable_image",
        "too_many_pixels",
    }


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from conftest import make_sample
    from capfilt.data import writer
    from capfilt.data.sample import Candidate, ScoredSample, ShardStats
    from capfilt.data.writer import write_round_shard

    header = writer.tar_header
    def slow_header(*a):  # a slow disk: the tar takes seconds to write
        time.sleep(0.005)
        return header(*a)
    writer.tar_header = slow_header
    results = [ScoredSample(s, [Candidate("c", "web", 0.9, 0.5, True)], True, "c")
               for s in (make_sample(f"k{i:05d}", image=bytes(2000)) for i in range(2000))]
    stats = ShardStats("in.tar", n_in=2000, kept=2000)
    print("writing", flush=True)
    write_round_shard(sys.argv[1], "big", results, stats, {})
""")


def test_sigkill_mid_write_leaves_no_visible_partial_file(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, str(script), str(out), tests_dir], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        deadline = time.time() + 60
        while time.time() < deadline:  # kill once the temp tar holds data
            temps = [p for p in out.glob(".*") if p.stat().st_size > 0] if out.exists() else []
            if temps:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    names = [p.name for p in out.iterdir()]
    assert names and all(is_temp(n) for n in names), names
    assert not is_done(str(out), "big")


def test_inspect_input_and_output_shards(tmp_path):
    from capfilt.data.inspect import inspect_shards

    results, stats = scored()
    write_round_shard(str(tmp_path / "out"), "web-000000", results, stats, PROVENANCE)
    members, _ = bad_shard_members()
    write_tar(str(tmp_path / "bad.tar"), members)
    (tmp_path / "cut.tar").write_bytes((tmp_path / "bad.tar").read_bytes()[:5000])

    text = inspect_shards([str(tmp_path / "out")], samples=1)
    assert "in=5 kept=2 dropped=2 rejected=1" in text and "bad_json=1" in text
    assert (
        "kept synthetic itm=0.9000 itc=0.4000" in text
        and "web-00000001" in text
        and "web-00000003" not in text
    )
    assert inspect_shards([str(tmp_path / "out" / "web-000000.tar")], samples=0).startswith(
        f"{tmp_path}/out/web-000000: output shard"
    )
    cli = [sys.executable, "-m", "capfilt.cli", "inspect", str(tmp_path / "out" / "web-000000.tar")]
    done = subprocess.run(cli, capture_output=True, text=True)  # the process must also exit cleanly
    assert done.returncode == 0 and "kept synthetic" in done.stdout, done.stderr[-2000:]
    text = inspect_shards([f"{tmp_path}/{{bad,cut}}.tar"], samples=2)
    assert "missing_image=1" in text and "duplicate_key=2" in text and "TRUNCATED" in text
    assert "ok  48x40 jpg  'a red circle'" in text


def test_a_committed_shard_is_on_the_disk_before_its_done_marker(tmp_path, disk_events):
    """Each file's data is flushed under its temp name before the rename, and the folder after it: after
    a power loss a visible file is whole, and the done marker is never on the disk before what it commits."""
    results, stats = scored()
    write_round_shard(str(tmp_path), "web-000000", results, stats, PROVENANCE)
    folder, expected = str(tmp_path), []
    for ext in (".tar", ".parquet", ".scores.parquet", ".stats.json", ".done"):
        expected += [("fsync", f"{folder}/.web-000000{ext}.*.tmp"), ("rename", f"{folder}/web-000000{ext}")]
        expected += [("fsync", folder)]
    assert len(disk_events) == len(expected)
    for (kind, path), (want_kind, pattern) in zip(disk_events, expected):
        assert kind == want_kind and fnmatch.fnmatch(path, pattern), (kind, path, pattern)


def test_a_local_mirror_flushes_a_finished_step_before_its_marker(tmp_path, disk_events):
    """For a local bootstrap folder, `push` (called before a step's marker) puts the step on the disk."""
    from capfilt.data.mirror import Mirror

    step = tmp_path / "round-0" / "finetune"
    (step / "captioner").mkdir(parents=True)
    (step / "captioner" / "model.safetensors").write_bytes(b"w")
    (step / "finetune.json").write_text("{}")
    os.mkfifo(step / "a-pipe")  # left alone: opening it would wait for a writer
    (step / "a-link").symlink_to(tmp_path / "gone")
    Mirror(tmp_path).push(step)
    flushed = {path for kind, path in disk_events if kind == "fsync"}
    want = [step / "captioner" / "model.safetensors", step / "finetune.json", step / "captioner", step]
    assert {str(p) for p in [*want, step.parent]} <= flushed


def test_a_folder_the_file_system_cannot_flush_still_commits_but_a_file_must_flush(tmp_path, monkeypatch):
    """Some FUSE mounts of buckets answer a folder's fsync with EINVAL: the shard commits as that file
    system keeps renames. A file whose data cannot reach the disk (EIO) fails the write."""
    fsync = os.fsync

    def folders_unsupported(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", folders_unsupported)
    results, stats = scored()
    write_round_shard(str(tmp_path), "web-000000", results, stats, PROVENANCE)
    assert (tmp_path / "web-000000.done").exists()

    def broken_disk(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_disk)
    with pytest.raises(OSError, match="Input/output error"):
        write_round_shard(str(tmp_path / "again"), "web-000000", results, stats, PROVENANCE)
    assert list((tmp_path / "again").iterdir()) == []  # not even a temp file
