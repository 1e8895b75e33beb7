"""Read one WebDataset shard into ``Sample``s and ``Reject``s, owning every error.

We parse the tar ourselves (a 512-byte header loop) instead of using webdataset's iterators: their
handlers sleep on each error and a truncated tar raises and loses the rest of the shard. Here a bad
sample becomes a ``Reject`` with a reason, and a truncated shard keeps every sample before the cut.

Truncation (a shard cut short by a killed writer or an interrupted copy) is reported two ways:
- the sample being read at the cut, if one had started, is yielded as ``Reject(reason="truncated")``;
- ``ShardReader.truncated`` is True after iteration (so is ``ShardStats.truncated`` once copied there).
A tar that ends without its end-of-archive zero blocks counts as truncated: tarfile, GNU tar and
webdataset always write them, and a writer killed between two members leaves exactly that shape.
Any other I/O error (network, permissions) propagates: the shard is the unit of retry.

Grouping follows webdataset: key = member path up to the first dot of its basename (folders stay in
the key), extension = the rest, lower-cased. Members without an extension, hidden files and
non-file members (folders, links) are not sample members and are skipped. Unlike webdataset, a key's
files need not stand together: a shard whose keys are apart (a tar of a folder written without
``--sort=name`` lists its files in the folder's hash order) is read again, grouped (``read_shard``),
instead of each part becoming a sample of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import fsspec

from capfilt.data import versions
from capfilt.data.sample import CAPTION_FROM, IMAGE_EXTS, SHARD_SUFFIXES, Reject, Sample, shard_compression
from capfilt.data.signing import unsigned
from capfilt.errors import UserError

BLOCK = 512
T = TypeVar("T")
_FILE_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE}


class _Truncated(Exception):
    """The stream ended inside the archive; ``name`` is the member being read, when its header was."""

    def __init__(self, detail: str, name: str | None = None):
        super().__init__(detail)
        self.name = name


def split_key(name: str) -> tuple[str, str] | None:
    """``"a/b/0001.seg.jpg"`` → ``("a/b/0001", "seg.jpg")``; None when the name has no extension."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return posixpath.join(folder, stem), ext.lower()


# What a decompressing reader raises where its stream is cut (a download that stopped) or corrupt: the
# shard ends there, as a plain tar that is cut does. A network error is none of these: it fails the shard,
# which is tried again, instead of ending it early.
_CUT_STREAM = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _read_upto(f, n: int) -> bytes:
    """Read n bytes, fewer only at end of stream (some file objects return short reads early)."""
    chunks, left = [], n
    while left > 0:
        try:
            chunk = f.read(left)
        except _CUT_STREAM as err:
            raise _Truncated(
                f"the compressed stream is cut or corrupt ({type(err).__name__}: {err})"
            ) from None
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_exact(f, n: int) -> bytes:
    data = _read_upto(f, n)
    if len(data) != n:
        raise _Truncated(f"wanted {n} bytes, got {len(data)}")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse a pax extended header: records of ``"LEN key=value\\n"``."""
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def parse_header(block: bytes) -> tuple[str, int, bytes]:
    """``(name, size, type)`` of a 512-byte tar header, as ``tarfile.TarInfo.frombuf`` reads them.

    Why: frombuf decodes all fifteen fields of every header, about half of reading a 1,000-sample shard
    on the project's machine. A regular file's ustar header without a name prefix (what tarfile,
    webdataset and GNU tar write for short names) whose unsigned checksum holds needs only three
    of them; any other header (pax, GNU, links, base-256 sizes, a bad checksum) goes through frombuf,
    which also raises on a corrupt one.
    """
    if block[156:157] == b"0" and block[345] == 0 and block[124] not in (0o200, 0o377):
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            chksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            pass
        else:
            if chksum == 256 + sum(block) - sum(block[148:156]):
                return block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size, b"0"
    info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    return info.name, info.size, info.type


_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
# Files found beside shards: img2dataset's Parquet next to each tar, a dataset downloaded as a zip.
_OTHER_FILES = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a zip archive"}


def _not_a_tar(start: bytes) -> str:
    """Why a shard is no tar, from its first bytes: empty, compressed under a plain name, or anything else."""
    if not start:
        return "an empty file"
    codec = next((c for magic, c in _MAGIC.items() if start.startswith(magic)), None)
    if codec:
        ending = next(s for s, c in SHARD_SUFFIXES.items() if c == codec)
        return f"not a tar archive but {codec}-compressed: name it with {ending} (the name says the codec)"
    kind = next((k for magic, k in _OTHER_FILES.items() if start.startswith(magic)), None)
    return f"not a tar archive{f' but {kind}' if kind else ''}: it starts with {start[:40]!r}"


def iter_members(f) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` for each regular file; raise ``_Truncated`` where the stream is cut.

    Handles ustar, GNU long names (``L``) and pax headers (``x``), which Python's tarfile writes for
    long or non-ASCII names; other member types are skipped.
    """
    long_name, first = None, True
    while True:
        header = _read_upto(f, BLOCK)
        if len(header) != BLOCK:  # a first block cut before ustar's magic is no tar (an empty file too)
            if first and header[257:262] != b"ustar":
                raise _Truncated(_not_a_tar(header))
            raise _Truncated("no end-of-archive marker" if not header else "cut inside a header")
        if header == bytes(BLOCK):
            return
        try:
            name, size, kind = parse_header(header)
        except tarfile.HeaderError as err:  # as the first block: an error page saved as a shard, say
            raise _Truncated(_not_a_tar(header) if first else f"corrupt tar header: {err}") from err
        first = False
        name = long_name or name
        try:
            data = _read_exact(f, size)  # payloads of skipped types are read and dropped too
            _read_exact(f, -size % BLOCK)
        except _Truncated as err:
            raise _Truncated(f"cut inside {name}: {err}", name if kind in _FILE_TYPES else None) from None
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":
            long_name = _pax_records(data).get("path", long_name)
        else:
            long_name = None
            if kind in _FILE_TYPES:
                yield name, data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _caption(
    key: str, url: str, members: dict[str, bytes], meta: dict, caption_from: tuple[str, ...]
) -> str | Reject:
    """The web caption: the first source of ``caption_from`` (``run.caption_from``) the sample has, a
    member or a json key; "" when it has none or it is blank: such an image is still captioned. Only a
    caption that is there but unreadable is a Reject."""
    for source in caption_from:
        if source.startswith("json."):
            field = source.removeprefix("json.")
            text = meta.get(field)
            if text is None:
                continue
            if not isinstance(text, str):
                return Reject(key, url, "bad_text", f"json {field} is {text!r}")
            return text.strip()
        if source in members:
            try:
                return members[source].decode("utf-8").strip()
            except UnicodeDecodeError as err:
                return Reject(key, url, "bad_text", f"{source} is not UTF-8: {err}")
    return ""


def _dotted_hint(key: str, members: dict[str, bytes]) -> str:
    """Why an image named ``img.0001.jpg`` is not found: its key is ``img``, its extension ``0001.jpg``."""
    dotted = sorted(ext for ext in members if "." in ext and ext.rsplit(".", 1)[1] in IMAGE_EXTS)
    if not dotted:
        return ""
    return (
        f"; a key ends at the first dot of a file name, as in webdataset, so {key}.{dotted[0]} is key "
        f"{key!r} with extension {dotted[0]!r}: rename the files without dots in the key"
    )


def make_sample(
    key: str, url: str, members: dict[str, bytes], caption_from: tuple[str, ...] = CAPTION_FROM
) -> Sample | Reject:
    """Build a Sample from one key's members (its web caption from ``caption_from``), or the Reject that
    says why it cannot be one."""
    if key.startswith("/") or ".." in key.split("/"):  # the outputs' member names are the keys: no tar-slip
        return Reject(
            key, url, "unsafe_key", f"{key!r} would extract outside the folder a user extracts into"
        )
    image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
    if image_ext is None:
        return Reject(key, url, "missing_image", f"members: {sorted(members)}{_dotted_hint(key, members)}")
    if not members[image_ext]:
        return Reject(key, url, "empty_image", f"{key}.{image_ext} has 0 bytes")
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"], parse_constant=_no_constant)
        except ValueError as err:
            return Reject(key, url, "bad_json", str(err))
        if not isinstance(meta, dict):
            return Reject(key, url, "bad_json", f"json is a {type(meta).__name__}, not an object")
    caption = _caption(key, url, members, meta, caption_from)
    if isinstance(caption, Reject):
        return caption
    extra = {ext: data for ext, data in members.items() if ext not in (image_ext, "txt", "json")}
    return Sample(key, url, members[image_ext], image_ext, caption, meta, extra)


class _Hashed:
    """A file object that hashes what is read through it: the shard's fingerprint without a second read
    (SHA-256 runs at 1.3 GB/s on one of the project machine's cores)."""

    def __init__(self, f, hash_):
        self.f, self.hash = f, hash_

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


@dataclass
class _Run:
    """One key's files that stand together in the shard; ``cut``: why the shard ended inside them."""

    key: str
    members: dict[str, bytes]
    duplicate: str = ""  # an extension the run holds twice
    cut: str = ""


class NotInKeyOrder(UserError):
    """A shard whose files of one key stand apart, among other keys' (a tar of a folder written without
    ``--sort=name``, or ``tar -cf s.tar *.jpg *.txt``): read as a stream, its samples would come in parts.
    ``read_shard`` reads such a shard again, grouped by key."""


class ShardReader:
    """Iterate one shard's samples and rejects; after iteration, ``truncated`` tells if it was cut and,
    with ``fingerprint``, ``sha256`` is the hash of the bytes read and ``version`` the file's version
    when reading began (what a round records: ``capfilt select`` checks the hash, a rerun the version;
    the other readers, training's every epoch among them, do not pay for them).

    The shard streams: each sample is yielded once the next key begins, which is right when every key's
    files stand together (webdataset's and img2dataset's writers, ``tar --sort=name``). A key whose files
    turn up again after other keys' raises ``NotInKeyOrder``; ``grouped=True`` reads such a shard whole
    first, its files spooled to a temporary file, and yields each key's files together, in the order the
    keys first appear (``read_shard`` does both).

    >>> reader = ShardReader("s3://bucket/web-000003.tar")
    >>> for item in reader: ...
    >>> reader.truncated
    """

    def __init__(
        self,
        url: str,
        fingerprint: bool = False,
        caption_from: tuple[str, ...] = CAPTION_FROM,
        grouped: bool = False,
        **storage_options,
    ):
        self.url, self.fingerprint, self.caption_from = url, fingerprint, caption_from
        self.grouped = grouped
        self.shard = unsigned(url)  # what its samples and rejects name: never a signature (data.signing)
        self.storage_options = storage_options
        self.truncated = False
        self.truncation_detail = ""
        self._hash = None
        self.version: dict[str, str] = {}

    @property
    def ended_early(self) -> dict[str, str]:
        """After iteration, ``{shard: why}`` if it ended before its end-of-archive marker (cut, or no tar
        at all), else {}: what eval and training name, as a round does."""
        return {self.shard: self.truncation_detail} if self.truncated else {}

    @property
    def sha256(self) -> str:
        """With ``fingerprint``, the hash of the bytes read so far; after iteration, of the whole file
        (``sha256sum``'s), or of its decompressed bytes when it is compressed. Else ""."""
        return self._hash.hexdigest() if self._hash is not None else ""

    def __iter__(self) -> Iterator[Sample | Reject]:
        self.truncated, self.truncation_detail = False, ""
        self._hash = hashlib.sha256() if self.fingerprint else None
        self.version = versions.version(self.url, **self.storage_options) if self.fingerprint else {}
        compression = shard_compression(self.url)
        with fsspec.open(self.url, "rb", compression=compression, **self.storage_options) as f:
            if self._hash is not None:
                f = _Hashed(f, self._hash)
            runs = self._runs(f)
            yield from self._grouped(runs) if self.grouped else self._streamed(runs)

    def _runs(self, f) -> Iterator[_Run]:
        """The shard's runs of files with one key, in order; a run the shard was cut inside comes last,
        with its ``cut`` (whatever it held, its sample is not whole)."""
        key, members, duplicate = None, {}, ""
        stream = iter_members(f)
        while True:
            try:
                name, data = next(stream)
            except StopIteration:  # the end-of-archive marker
                try:
                    while self._hash is not None and _read_upto(f, 1 << 20):  # the padding, hashed too
                        pass
                except _Truncated as err:  # every sample is whole: only the compressed file's end is cut
                    self.truncated, self.truncation_detail = True, str(err)
                break
            except _Truncated as err:
                self.truncated, self.truncation_detail = True, str(err)
                parts = split_key(err.name) if err.name else None
                if parts and parts[0] != key:  # the cut member starts a new sample
                    if key is not None:
                        yield _Run(key, members, duplicate)
                    key, members = parts[0], {}
                if key is not None:
                    yield _Run(key, members, cut=str(err))
                return
            parts = split_key(name)
            if parts is None:
                continue
            new_key, ext = parts
            if new_key != key:
                if key is not None:
                    yield _Run(key, members, duplicate)
                key, members, duplicate = new_key, {}, ""
            if ext in members:
                duplicate = duplicate or f"{new_key}.{ext} appears twice"
            members[ext] = data
        if key is not None:
            yield _Run(key, members, duplicate)

    def _streamed(self, runs: Iterator[_Run]) -> Iterator[Sample | Reject]:
        seen: dict[str, frozenset[str]] = {}  # key → the extensions its first run had
        shapes: dict[frozenset[str], frozenset[str]] = {}  # one set per shape of sample, not one per key
        for run in runs:
            if run.cut:
                yield Reject(run.key, self.shard, "truncated", run.cut)
                continue
            exts = frozenset(run.members)
            first = seen.get(run.key)
            if first is None:
                seen[run.key] = shapes.setdefault(exts, exts)
            elif not first & exts:  # not the sample again: the rest of it
                raise NotInKeyOrder(
                    f"{self.shard} is not in key order: {run.key}'s {', '.join(sorted(exts))} come after "
                    f"other keys' files, apart from its {', '.join(sorted(first))} (tar --sort=name writes a "
                    "shard in key order)"
                )
            duplicate = f"{run.key} reappears after other keys" if first is not None else run.duplicate
            yield self._sample(run.key, run.members, duplicate)

    def _grouped(self, runs: Iterator[_Run]) -> Iterator[Sample | Reject]:
        """Each key's runs as one sample, in the order the keys first appear. A run that holds an extension
        its key already has is that sample again (a ``duplicate_key``, as when streaming); a key the shard
        was cut inside is ``truncated``. The files wait in a spool on local disk, not in memory."""
        items: list[Reject | tuple[str, dict[str, tuple[int, int]], str]] = []
        first: dict[str, int] = {}  # key → its item
        with tempfile.TemporaryFile() as spool:
            for run in runs:
                i = first.get(run.key)
                if run.cut:
                    cut = Reject(run.key, self.shard, "truncated", run.cut)
                    if i is None:
                        items.append(cut)
                    else:  # its files before the cut are not all of it
                        items[i] = cut
                    continue
                if i is not None and items[i][1].keys() & run.members.keys():  # the sample again
                    items.append(
                        Reject(run.key, self.shard, "duplicate_key", f"{run.key} reappears after other keys")
                    )
                    continue
                placed = {}
                for ext, data in run.members.items():
                    placed[ext] = (spool.tell(), len(data))
                    spool.write(data)
                if i is None:
                    first[run.key] = len(items)
                    items.append((run.key, placed, run.duplicate))
                else:  # the rest of it
                    items[i][1].update(placed)
            for item in items:
                if isinstance(item, Reject):
                    yield item
                    continue
                key, placed, duplicate = item
                members = {}
                for ext, (offset, size) in placed.items():
                    spool.seek(offset)
                    members[ext] = spool.read(size)
                yield self._sample(key, members, duplicate)

    def _sample(self, key: str, members: dict[str, bytes], duplicate: str) -> Sample | Reject:
        if duplicate:
            return Reject(key, self.shard, "duplicate_key", duplicate)
        return make_sample(key, self.shard, members, self.caption_from)


def read_shard(url: str, consume: Callable[[ShardReader], T], **kwargs) -> T:
    """``consume(reader)`` of the shard as it streams; for a shard not in key order (``NotInKeyOrder``),
    ``consume`` of it again, grouped by key. ``consume`` must leave nothing behind when it raises: its
    first call may have seen part of the shard (``reader.grouped`` tells the second call)."""
    try:
        return consume(ShardReader(url, **kwargs))
    except NotInKeyOrder:
        return consume(ShardReader(url, grouped=True, **kwargs))


def iter_shard(url: str, **storage_options) -> Iterator[Sample | Reject]:
    """Samples and rejects of one shard, streamed (``NotInKeyOrder`` for one whose keys are apart: use
    ``read_shard`` to read any); use ``ShardReader`` when you need to know about truncation."""
    return iter(ShardReader(url, **storage_options))
