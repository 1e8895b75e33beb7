"""``capfilt inspect``: a readable summary of input shards or a round's output shards.

An output shard is recognised by its ``NAME.stats.json`` next to ``NAME.tar``; a folder holding
``*.stats.json`` files is inspected as a round's output. Everything else is read as input shards.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter

import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image

from capfilt.data.reader import ShardReader, read_shard
from capfilt.data.sample import CAPTION_FROM, Reject, shard_file_name
from capfilt.data.specs import expand_shards


def _score(x: float | None) -> str:
    """A stored score to 4 places; "-" for none (``filter.itc: false`` stores no ITC)."""
    return "-" if x is None else f"{x:.4f}"


def _image_size(data: bytes) -> str:
    try:
        w, h = Image.open(io.BytesIO(data)).size
        return f"{w}x{h}"
    except Exception as err:  # a summary line, never a crash
        return f"unreadable ({type(err).__name__})"


def _output_stats(url: str) -> str | None:
    """The stats.json URL of an output shard URL (``NAME.tar``), when there is one. Only a plain ``.tar``
    without a query can be one: a server that ignores a query answers ``a.tar.gz?t=1.stats.json`` with the
    shard itself."""
    if not url.endswith(".tar") or shard_file_name(url) != posixpath.basename(url):
        return None
    stats = url.removesuffix(".tar") + ".stats.json"
    fs, path = url_to_fs(stats)
    return stats if fs.exists(path) else None


def inspect_input(url: str, samples: int) -> str:
    return read_shard(url, lambda reader: _summarize(url, reader, samples))


def _summarize(url: str, reader: ShardReader, samples: int) -> str:
    n, rejects, shown, uncaptioned, elsewhere = 0, Counter(), [], 0, Counter()
    for item in reader:
        n += 1
        if isinstance(item, Reject):
            rejects[item.reason] += 1
            continue
        if not item.caption:  # where its alt-text may be instead: its other members and json keys
            uncaptioned += 1
            elsewhere.update(
                [*item.extra, *(f"json.{k}" for k, v in item.meta.items() if isinstance(v, str))]
            )
        if len(shown) < samples:
            shown.append(f"  {item.key}  {_image_size(item.image)} {item.image_ext}  {item.caption[:80]!r}")
    lines = [f"{url}: input shard, {n} samples, {n - sum(rejects.values())} readable"]
    if rejects:
        lines.append("  rejected: " + ", ".join(f"{r}={c}" for r, c in sorted(rejects.items())))
    if uncaptioned:
        found = ", ".join(f"{name} ({count})" for name, count in elsewhere.most_common(8)) or "none"
        lines.append(
            f"  without a web caption in {', '.join(CAPTION_FROM)} (run.caption_from): {uncaptioned}; "
            f"their other members and json strings: {found}"
        )
    if reader.truncated:
        lines.append(f"  TRUNCATED: {reader.truncation_detail}")
    if reader.grouped:
        lines.append(
            "  NOT IN KEY ORDER: a key's files stand apart (a tar of a folder written without --sort=name); "
            "capfilt reads it grouped by key, webdataset would read its samples in parts"
        )
    return "\n".join(lines + shown)


def inspect_output(stats_url: str, samples: int) -> str:
    fs, stats_path = url_to_fs(stats_url)
    stats = json.loads(fs.cat(stats_path))
    base, base_path = stats_url.removesuffix(".stats.json"), stats_path.removesuffix(".stats.json")
    rejected = sum(stats["rejected"].values())
    lines = [
        f"{base}: output shard of {stats['shard']}",
        f"  in={stats['n_in']} kept={stats['kept']} dropped={stats['dropped']} rejected={rejected}"
        + (" TRUNCATED input" if stats.get("truncated") else ""),
    ]
    if rejected:
        lines.append("  rejected: " + ", ".join(f"{r}={c}" for r, c in sorted(stats["rejected"].items())))
    if fs.exists(base_path + ".parquet"):
        # By path and filesystem, not a Python file object: pyarrow 26 aborts the process at exit after a
        # column-projected read from one ("terminate called without an active exception").
        columns = ["key", "caption", "candidates"]
        table = pq.read_table(base_path + ".parquet", columns=columns, filesystem=fs)
        rows = table.slice(0, samples).to_pylist()
        for row in rows:
            lines.append(f"  {row['key']}  {row['caption']!r}")
            for c in row["candidates"]:
                mark = "kept" if c["kept"] else "    "
                lines.append(
                    f"      {mark} {c['source']:9s} itm={_score(c['itm'])} itc={_score(c['itc'])}  {c['text'][:70]!r}"
                )
    if not fs.exists(base_path + ".done"):
        lines.append("  not committed (no .done marker)")
    return "\n".join(lines)


def inspect_shards(urls: list[str], samples: int = 3) -> str:
    """Summaries of every shard the specs name; folders of round output are summarised per shard."""
    parts = []
    for spec in urls:
        fs, path = url_to_fs(spec)
        if fs.isdir(path):
            folder = spec.rstrip("/")
            found = sorted(posixpath.basename(p) for p in fs.glob(posixpath.join(path, "*.stats.json")))
            if found:
                parts += [inspect_output(f"{folder}/{name}", samples) for name in found]
                continue
            spec = f"{folder}/*.tar"
        for url in expand_shards([spec]):
            stats = _output_stats(url)
            parts.append(inspect_output(stats, samples) if stats else inspect_input(url, samples))
    return "\n\n".join(parts)
