"""Shard specs: turn what a user types into a sorted list of shard URLs.

A spec is an fsspec URL (local path, ``file://``, ``s3://``, ``gs://``, ``memory://``...) that may hold
brace patterns (``web-{000000..000999}.tar``, ``{a,b}``), glob characters (``*?[``), or name a list
file (a path ending in ``.txt``/``.list``, or any path given as ``@path``) with one spec per line.
Expanded literal URLs are checked against one listing of their folder (not one request per shard), so
a typo fails here, with the missing names, instead of deep inside a round.

S3-compatible stores (MinIO, Ceph, R2, moto...) need no code: set ``AWS_ENDPOINT_URL`` (read by
botocore, for every AWS client) or ``FSSPEC_S3_ENDPOINT_URL`` (fsspec's config, for s3fs only), plus
the usual credentials; every read and write in capfilt goes through fsspec and picks them up.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from capfilt.data.sample import shard_compression, shard_path, shard_suffix
from capfilt.errors import UserError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = set("*?[")
LIST_SUFFIXES = (".txt", ".list")
LOCAL_PROTOCOLS = ("file://", "local://")  # spellings of a local path that ``canonical`` drops


T = TypeVar("T")


class ShardSpecError(FileNotFoundError, UserError):
    """A spec that matches no shard, or names shards that do not exist."""


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..123}`` ranges (zero padding keeps its width), left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def _is_list_file(spec: str) -> bool:
    return spec.startswith("@") or spec.endswith(LIST_SUFFIXES)


def _read_list(spec: str) -> list[str]:
    """A list file's specs: one a line, blank lines and ``#`` comments skipped; CRLF line ends and the BOM
    a Windows editor puts first are not part of them."""
    with fsspec.open(spec.removeprefix("@"), "rt", encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _spelling(fs, path: str) -> str:
    """One spelling per file: a local file's absolute path (``file:///x/a.tar`` and ``/x/a.tar`` are one
    shard, not two cleaned twice under two names), any other store's full URL."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def canonical(url: str) -> str:
    """The one spelling of a shard URL (``_spelling``); runs made before capfilt kept one may list a
    ``file://`` URL."""
    fs, path = url_to_fs(url)
    return _spelling(fs, path)


def _glob(spec: str) -> list[str]:
    """The files a pattern matches. Refused when it matches tar shards (by their names' endings) and other
    files beside them: those are a folder's other files, such as the Parquet and stats files img2dataset
    writes next to its shards, and each would be read as a shard that is no tar. Shards named without an
    ending are taken when nothing the pattern matches has one."""
    fs, path = url_to_fs(spec)
    matches = fs.glob(path, detail=True)
    found = [_spelling(fs, p) for p, info in matches.items() if info["type"] != "directory"]
    if not found:
        raise ShardSpecError(f"shard spec {spec!r} matches no file; check the path and pattern")
    others = sorted(url for url in found if shard_suffix(url) is None)
    if others and len(others) < len(found):
        shown = ", ".join(posixpath.basename(url) for url in others[:3]) + (" ..." if len(others) > 3 else "")
        raise ShardSpecError(
            f"shard spec {spec!r} matches {len(found) - len(others)} tar shard(s) and {len(others)} other "
            f"file(s) ({shown}), which are no shards; name the shards, e.g. with a pattern ending in .tar"
        )
    return found


def stat_each(urls: Iterable[str], pick: Callable[[dict[str, Any]], T]) -> dict[str, T | None]:
    """``pick`` of each URL's fsspec info, None for a file that is not there: one listing per parent
    folder, then one request for each URL the listing lacks (a store that does not list: plain HTTP,
    HF's resolve URLs). ``pick`` keeps only what the caller needs: a folder may list 100,000 shards."""
    by_parent: dict[tuple[int, str], list[tuple[str, str]]] = defaultdict(list)
    filesystems = {}
    for url in urls:
        fs, path = url_to_fs(url)
        filesystems[id(fs)] = fs
        by_parent[(id(fs), posixpath.dirname(path))].append((url, path))
    found: dict[str, T | None] = {}
    for (fs_id, parent), items in by_parent.items():
        fs = filesystems[fs_id]
        fs.invalidate_cache(parent)  # a long-lived process may hold an old listing
        try:
            listed = {fs._strip_protocol(e["name"]): pick(e) for e in fs.ls(parent, detail=True)}
        except Exception:  # no such folder, no listings, a listing refused (403): each file is asked on
            listed = {}  # its own below, which raises what is wrong with it
        for url, path in items:
            if path in listed:
                found[url] = listed[path]
                continue
            try:
                found[url] = pick(fs.info(path))
            except FileNotFoundError:
                found[url] = None
    return found


def missing(urls: Iterable[str]) -> list[str]:
    """The URLs that name no file now (``stat_each``), in their order."""
    return [url for url, seen in stat_each(urls, lambda info: True).items() if seen is None]


def _check_exist(urls: Iterable[str]) -> None:
    """Raise naming the shards that are not there, or that are folders (``stat_each``)."""
    kinds = stat_each(urls, lambda info: info["type"])
    missing = [url for url, kind in kinds.items() if kind is None]
    folders = [url for url, kind in kinds.items() if kind == "directory"]
    if folders:
        raise ShardSpecError(
            f"{folders[0]} is a folder, not a shard: name its shards, e.g. {folders[0]}/*.tar"
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardSpecError(f"{len(missing)} shard(s) do not exist: {shown}; check the path")


def expand_shards(specs: list[str] | str) -> list[str]:
    """Every shard URL the specs name: braces, globs and list files expanded; sorted, de-duplicated."""
    specs = [specs] if isinstance(specs, str) else specs
    found: set[str] = set()
    literals: list[str] = []
    for spec in specs:
        for url in expand_braces(spec.strip()):
            if _is_list_file(url):
                lines = _read_list(url)
                if not lines:
                    raise ShardSpecError(f"list file {url!r} names no shard")
                found.update(expand_shards(lines))
            elif _GLOB_CHARS & set(shard_path(url).split("://", 1)[-1]):  # not a query's "?"
                found.update(_glob(url))
            else:
                literals.append(canonical(url))
    _check_exist(literals)
    found.update(literals)
    if not found:
        raise ShardSpecError(f"shard specs {specs!r} match nothing")
    for url in found:  # a codec missing here fails now, not as every shard read as an empty one
        shard_compression(url)
    return sorted(found)
