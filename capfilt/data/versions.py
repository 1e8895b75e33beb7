"""An input shard's version: what tells that its content changed, without reading it.

A round records each shard's version as it reads it (``ShardStats.input_version``, also in the shard's
done marker). A rerun compares it with the shard's version now and cleans again the committed shards
whose input changed (an img2dataset re-download into the same file names, say), instead of skipping
them as done. Reading every input again to hash it would cost a nightly rerun over a large corpus its
whole read; the store's own metadata costs one listing per folder.

The version is the size and the store's identity of the content when it has one (the ETag of S3, Azure,
GCS or an HTTP server; an MD5 or a generation), else the modification time (a local disk, an HTTP
server's Last-Modified). Like ``make`` or ``rsync``'s quick check, a change that keeps both size and
time (``cp -p`` of other bytes) is not seen here; ``capfilt select``'s SHA-256 check still catches it.
A touched but unchanged shard is cleaned again into the same bytes.
"""

from __future__ import annotations

from typing import Any

from fsspec.core import url_to_fs

from capfilt.data.specs import stat_each

# the first of these an fsspec listing or info has names the content's version: content identities (S3,
# Azure, HTTP, GCS) before modification times (disks, stores and servers that give no identity)
IDENTITY_KEYS = (
    *("ETag", "etag", "Content-MD5", "md5Hash", "generation"),
    *("mtime", "LastModified", "last_modified", "Last-Modified"),
)


def version_of(info: dict[str, Any]) -> dict[str, str]:
    """The version fields of an fsspec ``info`` or listing entry, as text (JSON-safe, comparable)."""
    version = {"size": str(info["size"])} if info.get("size") is not None else {}
    key = next((k for k in IDENTITY_KEYS if info.get(k) is not None), None)
    if key is not None:
        version[key] = str(info[key])
    return version


def version(url: str, **storage_options) -> dict[str, str]:
    """One file's version now (one metadata request)."""
    fs, path = url_to_fs(url, **storage_options)
    fs.invalidate_cache(path)  # a long-lived process may hold an old listing of its folder
    return version_of(fs.info(path))


def current_versions(urls: list[str]) -> dict[str, dict[str, str]]:
    """Each URL's version now ({} for one that is gone), from one listing per folder (a 100,000-shard
    corpus on S3 is 100 listing requests, not 100,000; ``specs.stat_each``)."""
    return {url: v or {} for url, v in stat_each(urls, version_of).items()}


def changed(recorded: dict[str, str], now: dict[str, str]) -> bool:
    """Whether a shard recorded as ``recorded`` is another now. Only fields both have are compared: a run
    made before versions were recorded, or a shard that is gone (a mount that did not come up must not
    cost the run its outputs), counts as unchanged."""
    return any(recorded[k] != now[k] for k in recorded.keys() & now.keys())
