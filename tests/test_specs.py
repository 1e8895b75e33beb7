"""Shard specs: braces, padded ranges, globs, list files, and a clear error when nothing matches."""

from __future__ import annotations

import fsspec
import pytest

from capfilt.data.specs import ShardSpecError, expand_braces, expand_shards


def _touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"x")


def test_brace_ranges_keep_zero_padding_and_lists_expand():
    assert expand_braces("s3://b/web-{000008..000011}.tar") == [
        "s3://b/web-000008.tar",
        "s3://b/web-000009.tar",
        "s3://b/web-000010.tar",
        "s3://b/web-000011.tar",
    ]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_expand_local_braces_globs_sorted_unique(tmp_path):
    _touch(tmp_path, "web-000000.tar", "web-000001.tar", "web-000002.tar", "web-000000.parquet")
    specs = [f"{tmp_path}/web-{{000001..000002}}.tar", f"{tmp_path}/web-*.tar"]
    assert expand_shards(specs) == [f"{tmp_path}/web-00000{i}.tar" for i in range(3)]
    assert expand_shards([f"file://{tmp_path}/web-00000[01].tar"]) == [
        f"file://{tmp_path}/web-000000.tar",
        f"file://{tmp_path}/web-000001.tar",
    ]


def test_list_files(tmp_path):
    _touch(tmp_path, "a.tar", "b.tar")
    (tmp_path / "shards.txt").write_text(f"# my shards\n{tmp_path}/b.tar\n\n{tmp_path}/a.tar\n")
    (tmp_path / "shards.cfg").write_text(f"{tmp_path}/*.tar\n")
    assert expand_shards([str(tmp_path / "shards.txt")]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    assert expand_shards([f"@{tmp_path}/shards.cfg"]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]


def test_memory_filesystem_glob_and_braces():
    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/specs/s-{i}.tar", b"x")
    assert expand_shards(["memory://specs/s-*.tar", "memory://specs/s-{0..1}.tar"]) == [
        f"memory:///specs/s-{i}.tar" for i in range(3)
    ]


def test_no_match_is_a_clear_error(tmp_path):
    _touch(tmp_path, "web-000000.tar")
    with pytest.raises(ShardSpecError, match="matches no file"):
        expand_shards([f"{tmp_path}/nothing-*.tar"])
    with pytest.raises(ShardSpecError, match=r"1 shard\(s\) do not exist: .*web-000001.tar"):
        expand_shards([f"{tmp_path}/web-{{000000..000001}}.tar"])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ShardSpecError, match="names no shard"):
        expand_shards([str(tmp_path / "empty.txt")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ShardSpecError, match="is a folder"):
        expand_shards([str(tmp_path / "folder")])
