"""Shard specs: braces, padded ranges, globs, list files, and a clear error when nothing matches."""

from __future__ import annotations

import gzip
import os

import fsspec
import pytest
from conftest import make_sample

from capfilt.data import versions
from capfilt.data.inspect import inspect_shards
from capfilt.data.reader import ShardReader
from capfilt.data.signing import read_urls, redact, unsigned
from capfilt.data.specs import ShardSpecError, expand_braces, expand_shards
from capfilt.data.writer import output_name, write_samples_shard


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


def test_a_local_file_has_one_spelling_however_it_is_written(tmp_path, monkeypatch):
    """``file://``, a relative path and a plain path name one shard, cleaned once under one name."""
    _touch(tmp_path, "web-000000.tar", "web-000001.tar")
    monkeypatch.chdir(tmp_path)
    specs = [f"file://{tmp_path}/web-00000[01].tar", f"file://{tmp_path}/web-000000.tar", "web-000001.tar"]
    assert expand_shards(specs + [str(tmp_path / "web-000000.tar")]) == [
        f"{tmp_path}/web-000000.tar",
        f"{tmp_path}/web-000001.tar",
    ]


def test_list_files(tmp_path):
    _touch(tmp_path, "a.tar", "b.tar")
    (tmp_path / "shards.txt").write_text(f"# my shards\n{tmp_path}/b.tar\n\n{tmp_path}/a.tar\n")
    (tmp_path / "shards.cfg").write_text(f"{tmp_path}/*.tar\n")
    assert expand_shards([str(tmp_path / "shards.txt")]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    assert expand_shards([f"@{tmp_path}/shards.cfg"]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    (tmp_path / "windows.txt").write_bytes(f"\ufeff{tmp_path}/a.tar\r\n{tmp_path}/b.tar\r\n".encode())
    assert expand_shards([str(tmp_path / "windows.txt")]) == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]


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


@pytest.fixture
def http_folder(tmp_path, request):
    """A real HTTP server over ``tmp_path`` that, like a CDN or HF's resolve URLs, lists no folder: it
    answers 404 (or the status a test passes as the fixture's param: S3 answers 403)."""
    import functools
    import http.server
    import threading

    class NoListing(http.server.SimpleHTTPRequestHandler):
        def list_directory(self, path):
            self.send_error(getattr(request, "param", 404), "no listing")

        def log_message(self, *args):
            pass

    handler = functools.partial(NoListing, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("http_folder", [404, 403], indirect=True)
def test_shards_over_http_without_listings_are_found_one_by_one(http_folder):
    folder, base = http_folder
    _touch(folder, "web-000000.tar", "web-000001.tar")
    urls = [f"{base}/web-000000.tar", f"{base}/web-000001.tar"]
    assert expand_shards([f"{base}/web-{{000000..000001}}.tar"]) == urls
    with pytest.raises(ShardSpecError, match=r"1 shard\(s\) do not exist: .*web-000002.tar"):
        expand_shards([f"{base}/web-{{000000..000002}}.tar"])
    now = versions.current_versions(urls)  # a rerun's version check: the server's size and Last-Modified
    size = (folder / "web-000000.tar").stat().st_size
    assert now[urls[0]]["size"] == str(size) and "Last-Modified" in now[urls[0]]
    os.utime(folder / "web-000000.tar", (1_000_000_000, 1_000_000_000))
    assert versions.changed(now[urls[0]], versions.current_versions(urls)[urls[0]])


def test_presigned_shard_urls_are_named_and_decompressed_by_their_path(http_folder):
    """An http(s) URL's query (a presigned URL's signature) is not part of the shard's file name. Before, a
    ``.tar.gz?X-Amz-Signature=...`` shard was read as a plain tar, ended at its first header and was
    committed as an empty truncated shard (every sample lost), and outputs were named
    ``web-0.tar?X-Amz-...``; ``capfilt inspect`` took the server's answer to ``...?X-Amz-....stats.json``
    (the shard itself) for an output shard's stats."""
    folder, base = http_folder
    write_samples_shard(str(folder / "plain.tar"), [make_sample(f"s{i}") for i in range(3)])
    (folder / "web-0.tar.gz").write_bytes(gzip.compress((folder / "plain.tar").read_bytes()))
    url = f"{base}/web-0.tar.gz?X-Amz-Signature=ab%2Fc&X-Amz-Expires=3600"
    assert expand_shards([url]) == [url]
    reader = ShardReader(url)
    assert [s.key for s in reader] == ["s0", "s1", "s2"] and not reader.truncated
    assert output_name(url) == "web-0" and output_name(f"{base}/web-0.tar#part") == "web-0"
    other = f"{base}/web-0.tar.gz?X-Amz-Signature=other"  # the same path twice: names stay unique
    assert len({output_name(url, [url, other]), output_name(other, [url, other])}) == 2
    assert output_name("/data/odd?name.tar") == "odd?name"  # a local file name keeps every character
    assert inspect_shards([url]).startswith(f"{url}: input shard, 3 samples, 3 readable")


def test_a_signed_url_is_named_without_its_signature():
    """What a run records of a shard URL (``signing.unsigned``): no credential of any of the common
    presigning schemes, every other parameter as it was spelled; a SAS's short names only with its sig."""
    shard = "https://host/c/web-0.tar"
    signed = {
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F2026&X-Amz-Signature=ab": "",
        "x-goog-signature=ab&X-Goog-Expires=600": "",
        "AWSAccessKeyId=AK&Expires=1&Signature=ab%3D": "",
        "Policy=eyJ&Signature=ab&Key-Pair-Id=K2": "",
        "sv=2022-11-02&sp=r&se=2026-12-01&sig=ab%3D": "",
        "versionId=3&X-Amz-Signature=ab&part%20no=1+2": "?versionId=3&part%20no=1+2",
        "sv=1&sp=r": "?sv=1&sp=r",  # no sig: not a SAS
        "token=abc#frag": "#frag",
    }
    for query, rest in signed.items():
        assert unsigned(f"{shard}?{query}") == shard + rest
    assert unsigned("/data/odd?name.tar") == "/data/odd?name.tar" and unsigned(shard) == shard
    error = f"403, message='Forbidden', url='{shard}?X-Amz-Signature=ab&X-Amz-Date=1' (retried)"
    assert redact(error) == f"403, message='Forbidden', url='{shard}' (retried)"
    assert read_urls([f"{shard}?X-Amz-Signature=a", f"{shard}?X-Amz-Signature=b"]) == {
        shard: f"{shard}?X-Amz-Signature=a"
    }


def test_a_pattern_over_an_img2dataset_folder_names_its_shards_not_its_other_files(tmp_path):
    """img2dataset writes ``00000.parquet`` and ``00000_stats.json`` beside ``00000.tar``. Before, ``*``
    took them for shards too: each was read as a tar that is none, and cleaned as an empty shard."""
    _touch(tmp_path, "00000.tar", "00000.parquet", "00000_stats.json", "00001.tar.gz")
    with pytest.raises(ShardSpecError, match=r"2 tar shard\(s\) and 2 other file\(s\) \(00000.parquet, 0000"):
        expand_shards([f"{tmp_path}/*"])
    assert expand_shards([f"{tmp_path}/0000?.tar*"]) == [f"{tmp_path}/00000.tar", f"{tmp_path}/00001.tar.gz"]
    (tmp_path / "bare").mkdir()
    _touch(tmp_path / "bare", "shard-0", "shard-1")  # shards named without an ending, alone: taken
    assert expand_shards([f"{tmp_path}/bare/*"]) == [f"{tmp_path}/bare/shard-0", f"{tmp_path}/bare/shard-1"]
