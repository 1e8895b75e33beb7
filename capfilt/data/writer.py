"""Write shards through fsspec, atomically and byte-for-byte reproducibly.

Atomic: on file systems with a rename (local, NFS, memory...) each file is written to a hidden temp
name in the same folder (``.NAME.EXT.<random>.tmp``) and renamed; on object stores (s3, gs, azure)
an object only becomes visible when its single put or multipart upload completes, so it is written in
place with ``autocommit=False`` and committed, or discarded on error. Readers, globs and the ledger
never match temp names (they start with a dot and end in ``.tmp``). A writer killed on an object store
may leave an incomplete multipart upload (invisible; clean up with a bucket lifecycle rule).

Durable on a local disk: each file's data is flushed to the disk (fsync) before its rename, and the
folder after it, so a file that is visible after a power loss or a kernel crash is whole, and a done
marker, written last, is never on the disk before the files it commits. Without that, ext4 and XFS
may keep a renamed file's data in memory for seconds and, after a crash, show it empty.

Reproducible: tar members in a fixed order with mtime 0, uid/gid 0, empty user names, mode 0644, so
the same results give the same bytes on every rerun.

A round's outputs per input shard, in this order: ``NAME.tar``, ``NAME.parquet``,
``NAME.scores.parquet``, ``NAME.stats.json``, then ``NAME.done`` last: its presence commits the shard.
:class:`RoundShardWriter` streams the kept samples into the (temp) tar batch by batch, so a worker holds a
batch's image bytes, never a shard's; only the Parquet rows (captions and scores) wait for the commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import posixpath
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from capfilt import jsonio
from capfilt.data.sample import Sample, ScoredSample, ShardStats, shard_file_name, shard_suffix
from capfilt.errors import UserError

ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
TEMP_SUFFIX = ".tmp"

CANDIDATE_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("source", pa.string()),
        ("itm", pa.float64()),
        ("itc", pa.float64()),
        ("kept", pa.bool_()),
    ]
)
ROW_FIELDS = [
    ("key", pa.string()),
    ("shard", pa.string()),
    ("caption", pa.string()),
    ("candidates", pa.list_(CANDIDATE_TYPE)),
    ("image_ext", pa.string()),
    ("meta_json", pa.string()),
]
KEPT_SCHEMA = pa.schema(ROW_FIELDS)
KEPT_SCHEMA_WITH_IMAGE = pa.schema([*ROW_FIELDS, ("image", pa.binary())])
SCORES_SCHEMA = pa.schema([*ROW_FIELDS, ("kept", pa.bool_())])


def is_temp(name: str) -> bool:
    """A writer's temp file: never a shard, never a commit."""
    base = posixpath.basename(name)
    return base.startswith(".") and base.endswith(TEMP_SUFFIX)


ROUND_SUFFIXES = (".scores.parquet", ".stats.json", ".parquet", ".tar", ".done")  # longest match first


def temp_owner(path: str) -> str | None:
    """The output NAME whose round file the temp file ``path`` was being written as; None for any other."""
    base = posixpath.basename(path)
    if not is_temp(base):
        return None
    target = base[1 : -len(TEMP_SUFFIX)].rpartition(".")[0]  # `.NAME.tar.<hex>.tmp` → `NAME.tar`
    return next((target[: -len(s)] for s in ROUND_SUFFIXES if target.endswith(s)), None)


def is_object_store(fs) -> bool:
    """Whether ``fs`` commits an object whole (one put or a completed upload) instead of renaming a file."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ATOMIC_PUT_PROTOCOLS


def make_folder(fs, path: str) -> None:
    """Create a folder and its parents on a file system. An object store has no folders (a key's prefix
    is one), so nothing is made there: s3fs's and gcsfs's ``makedirs`` would create a missing bucket, and
    a typo in a bucket's name would fill a new bucket instead of failing at the first write."""
    if not is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def check_bucket(url: str) -> None:
    """Refuse, before any work, an output URL in a bucket that does not exist (capfilt creates none)."""
    fs, path = url_to_fs(url)
    if is_object_store(fs) and not fs.exists(path.split("/", 1)[0]):
        raise missing_bucket(url)


def missing_bucket(url: str) -> UserError:
    """The one error for it, whether a command checks first (``check_bucket``) or meets it writing."""
    return UserError(
        f"{url}: its bucket does not exist; create it (capfilt creates no bucket) or fix the URL"
    )


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to the disk: a rename in a folder survives a crash only
    once the folder is flushed. A file system that cannot flush a folder (some FUSE mounts of buckets say
    EINVAL) keeps its renames as it does; a file that cannot be flushed is an error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (os.path.isdir(path) and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder under a folder, to the disk, and the folder that holds it:
    before something that says it is complete (a rename into place, a marker) is written."""
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if os.path.isfile(file) and not os.path.islink(file):  # not a pipe (opening one would wait)
                fsync_path(file)
        fsync_path(root)
    if not os.path.isdir(path):
        fsync_path(path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[io.RawIOBase]:
    """Open ``url`` for writing so that readers see the whole file or nothing."""
    fs, path = url_to_fs(url)
    if is_object_store(fs):  # fsspec's transaction protocol: commit or discard
        f = fs.open(path, "wb", autocommit=False)
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True  # else fsspec's __del__ would flush, and start an upload, after the discard
            raise
        f.close()
        f.commit()
        return
    folder, base = posixpath.split(path)
    make_folder(fs, folder)
    tmp = posixpath.join(folder, f".{base}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    local = isinstance(fs, LocalFileSystem)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
            if local:
                f.flush()
                os.fsync(f.fileno())
        fs.mv(tmp, path)
        if local:
            fsync_path(folder)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_TEMPLATE = _tarinfo("", 0).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")  # one ustar block
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)


def tar_header(name: str, size: int) -> bytes:
    """The header that ``tarfile`` (PAX format) writes for ``_tarinfo(name, size)``, byte for byte.

    Why: tarfile builds each header field by field (a TarInfo copy, a pax check, a dozen encodings), 0.16 s
    of a 1,000-sample shard's 0.2-0.3 s write on the project's machine, on the cores the models use. Here
    a plain ASCII name of at most 100 bytes (almost every WebDataset key) goes into a fixed template with
    its size and checksum; any other name (longer, or not ASCII: a pax header first) goes through tarfile.
    """
    if not name.isascii() or len(name) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    buf = bytearray(_TEMPLATE)
    buf[_NAME] = name.encode("ascii").ljust(100, b"\0")
    buf[_SIZE] = b"%011o\0" % size
    buf[_CHKSUM] = b" " * 8  # summed as spaces, then six octal digits and a NUL; the last space stays
    buf[_CHKSUM.start : _CHKSUM.stop - 1] = b"%06o\0" % sum(buf)
    return bytes(buf)


class TarStream:
    """Reproducible tar members appended to an open binary file, then :meth:`finish`.

    The bytes are what ``tarfile.open(mode="w|", format=PAX_FORMAT)`` writes (tests/test_writer.py checks):
    each header and its data padded to 512 bytes, two zero blocks, then zeros to a 10,240-byte record.
    """

    def __init__(self, f: io.RawIOBase):
        self.f, self.members, self.offset = f, 0, 0

    def add(self, name: str, data: bytes) -> None:
        header, pad = tar_header(name, len(data)), -len(data) % tarfile.BLOCKSIZE
        self.f.write(b"".join((header, data, bytes(pad))))
        self.offset += len(header) + len(data) + pad
        self.members += 1

    def finish(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.f.write(bytes(2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))


def write_tar(url: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Write ``(name, bytes)`` members, in the given order, as a reproducible tar; returns the count."""
    with atomic_open(url) as f:
        tar = TarStream(f)
        for name, data in members:
            tar.add(name, data)
        tar.finish()
    return tar.members


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False).encode()


def sample_members(sample: Sample, txt: str, json_obj: dict) -> list[tuple[str, bytes]]:
    """One sample's members, sorted by extension: original image bytes, txt, json, carried extras."""
    members = {sample.image_ext: sample.image, "txt": txt.encode(), **sample.extra}
    if json_obj:
        members["json"] = _json_bytes(json_obj)
    return [(f"{sample.key}.{ext}", members[ext]) for ext in sorted(members)]


def write_samples_shard(url: str, samples: Iterable[Sample]) -> int:
    """Write input-style samples (image, txt, json = ``meta``, extras) as a WebDataset shard."""
    return write_tar(url, (m for s in samples for m in sample_members(s, s.caption, s.meta)))


# --- a round's outputs -------------------------------------------------------------------------------


def _score(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _candidates(r: ScoredSample) -> list[dict]:
    return [
        {"text": c.text, "source": c.source, "itm": _score(c.itm), "itc": _score(c.itc), "kept": c.kept}
        for c in r.candidates
    ]


def _row(r: ScoredSample) -> dict:
    s = r.sample
    return {
        "key": s.key,
        "shard": s.shard,
        "caption": r.caption,
        "candidates": _candidates(r),
        "image_ext": s.image_ext,
        "meta_json": json.dumps(s.meta, ensure_ascii=False, sort_keys=True),
    }


def _write_parquet(url: str, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_open(url) as f:
        pq.write_table(table, f)


def write_json(url: str, obj: dict) -> None:
    """A run folder's JSON file (stats, markers, manifest, summary, card), whole or not at all."""
    with atomic_open(url) as f:
        f.write(jsonio.dumps(obj, indent=1, sort_keys=True).encode())


def output_name(input_url: str, inputs: Sequence[str] = ()) -> str:
    """The output NAME of an input shard: its file name (``sample.shard_file_name``) without ``.tar`` or a
    compressed tar's ending, in any case (``web-000003.tar`` → ``web-000003``).

    When another URL in ``inputs`` (the round's full shard list) has the same name (in another folder, or
    the same file with another query), both get ``-`` plus the first 8 hex digits of the SHA-1 of their
    full URL, so names stay unique and stable for a given input list.
    """

    def stem(url: str) -> str:
        base, suffix = shard_file_name(url), shard_suffix(url)
        return base[: -len(suffix)] if suffix else base

    name = stem(input_url)
    if any(stem(u) == name and u != input_url for u in inputs):
        name += "-" + hashlib.sha1(input_url.encode()).hexdigest()[:8]
    return name


class RoundShardWriter:
    """One input shard's round outputs, written as its batches are scored.

    ``add`` appends each kept sample to the tar at once (a temp file, or an uncommitted upload) and keeps
    only its Parquet rows, so image bytes and carried members leave memory batch by batch: an actor's
    memory does not grow with the size of its shards. ``commit`` checks the results against the stats,
    then writes the tar, both Parquet files, the stats and the done marker, in that order. Leaving the
    ``with`` block without a commit (an exception) discards the tar; nothing becomes visible.
    With ``parquet_image_bytes`` the kept images are also rows of ``NAME.parquet``, held until the commit.
    """

    def __init__(self, out_dir: str, name: str, provenance: dict, parquet_image_bytes: bool = False):
        self.out_dir, self.name, self.provenance = out_dir, name, provenance
        self.parquet_image_bytes = parquet_image_bytes
        self.kept_rows: list[dict] = []
        self.score_rows: list[dict] = []
        self._files = contextlib.ExitStack()

    def __enter__(self) -> RoundShardWriter:
        self.fs, self.root = url_to_fs(self.out_dir)
        make_folder(self.fs, self.root)
        self.base = self.out_dir.rstrip("/") + "/" + self.name
        self.tar = TarStream(self._files.enter_context(atomic_open(f"{self.base}.tar")))
        return self

    def __exit__(self, *exc) -> None:
        self._files.__exit__(*exc)  # after a commit, nothing is left open

    def add(self, results: Iterable[ScoredSample]) -> None:
        """Scored samples in shard order: the kept ones into the tar now, every one as a scores row."""
        for r in results:
            row = _row(r)
            self.score_rows.append(row | {"kept": r.kept})
            if not r.kept:
                continue
            doc = {
                "caption": r.caption,
                "candidates": row["candidates"],
                "source_json": r.sample.meta,
                "provenance": self.provenance,
            }
            for member, data in sample_members(r.sample, r.caption, doc):
                self.tar.add(member, data)
            self.kept_rows.append(row | ({"image": r.sample.image} if self.parquet_image_bytes else {}))

    def commit(self, stats: ShardStats) -> dict:
        """Check, then make the shard visible: tar, Parquet files, stats, the done marker last."""
        stats.check()
        kept, total = len(self.kept_rows), len(self.score_rows)
        if kept != stats.kept or total != stats.kept + stats.dropped:
            raise AssertionError(
                f"{self.name}: results ({kept} kept of {total}) disagree with stats "
                f"(kept={stats.kept}, dropped={stats.dropped})"
            )
        self.tar.finish()
        self._files.close()  # the tar: renamed into place, or its upload completed
        schema = KEPT_SCHEMA_WITH_IMAGE if self.parquet_image_bytes else KEPT_SCHEMA
        _write_parquet(f"{self.base}.parquet", self.kept_rows, schema)
        _write_parquet(f"{self.base}.scores.parquet", self.score_rows, SCORES_SCHEMA)
        write_json(f"{self.base}.stats.json", dataclasses.asdict(stats) | {"provenance": self.provenance})
        files = [f"{self.name}{ext}" for ext in (".tar", ".parquet", ".scores.parquet", ".stats.json")]
        done = {
            "shard": stats.shard,
            "files": {f: self.fs.size(posixpath.join(self.root, f)) for f in files},
            "provenance": self.provenance,
            "input_version": stats.input_version,  # what a rerun compares (data.versions)
        }
        write_json(f"{self.base}.done", done)
        return done


def write_round_shard(
    out_dir: str,
    name: str,
    results: list[ScoredSample],
    stats: ShardStats,
    provenance: dict,
    parquet_image_bytes: bool = False,
) -> dict:
    """Write one input shard's round outputs from all its results at once; return the done marker."""
    with RoundShardWriter(out_dir, name, provenance, parquet_image_bytes) as out:
        out.add(results)
        return out.commit(stats)
