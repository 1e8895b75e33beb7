"""A local working copy of a folder that may live on object storage (``s3://...``).

Training and Hugging Face models need real files, so a bootstrap whose ``--out`` is remote works in a
local scratch folder keyed by the URL and uploads what it finishes: each checkpoint as it is written,
each step's outputs before its marker. The remote folder is the truth and the scratch only a cache: a
rerun on a fresh machine pulls the remote folder (the newest checkpoint of each training job, not the
older ones) and goes on from there. For a local ``--out`` the working copy is the folder itself and
pull does nothing and push flushes to the disk.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from pathlib import Path

from fsspec.core import url_to_fs

from capfilt.data.writer import fsync_tree

SCRATCH_ENV = "CAPFILT_SCRATCH"  # where working copies of remote folders go (default ~/.cache/capfilt)
CHECKPOINT = re.compile(r"step-\d+")


def scratch_root() -> Path:
    return Path(os.environ.get(SCRATCH_ENV) or Path.home() / ".cache" / "capfilt")


class Mirror:
    """``local`` is where the work happens; ``url_of`` maps a path under it to its remote URL."""

    def __init__(self, url: str | Path):
        self.url = str(url).rstrip("/")
        fs, path = url_to_fs(self.url)
        self.remote = "file" not in ([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol)
        if self.remote:
            key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
            self.local = scratch_root() / "mirror" / key
        else:
            self.local = Path(path)

    def url_of(self, path: Path) -> str:
        if not self.remote:
            return str(path)
        rel = Path(path).relative_to(self.local).as_posix()
        return self.url if rel == "." else f"{self.url}/{rel}"

    def upload_url(self, path: Path) -> str:
        """Where what is written at ``path`` is uploaded as it is written; "" for a local folder."""
        return self.url_of(path) if self.remote else ""

    def pull(self, skip_dirs: tuple[str, ...], pointer: str) -> None:
        """Copy the remote folder over the working copy, but for folders named in ``skip_dirs`` (read
        remotely where they are used) and checkpoints that their folder's ``pointer`` file does not name."""
        if not self.remote:
            return
        fs, root = url_to_fs(self.url)
        if not fs.exists(root):
            return
        files = [p for p in fs.find(root) if p != root]
        rels = [posixpath.relpath(p, root) for p in files]
        latest = {
            posixpath.dirname(rel): fs.cat_file(p).decode().strip()
            for p, rel in zip(files, rels)
            if posixpath.basename(rel) == pointer
        }
        for p, rel in zip(files, rels):
            parts = rel.split("/")
            if any(d in skip_dirs for d in parts[:-1]) or any(
                CHECKPOINT.fullmatch(d) and latest.get("/".join(parts[:i])) != d
                for i, d in enumerate(parts[:-1])
            ):
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(p, str(dest))

    def push(self, path: Path) -> None:
        """Make a finished file or folder of the working copy last, before a marker says it is done: upload
        it, or, in a local folder, flush it to the disk (else a crash could leave a marker before it)."""
        if self.remote:
            put_tree(Path(path), self.url_of(path))
        else:
            fsync_tree(path)


def put_tree(path: Path, url: str) -> None:
    """Upload a file, or a folder's files, to ``url``. Left out: hidden (temporary) names, and training
    checkpoints inside the folder, which are uploaded as they are written."""
    fs, root = url_to_fs(url)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        parts = f.relative_to(path).parts if f != path else ()
        if not any(p.startswith(".") or CHECKPOINT.fullmatch(p) for p in parts):
            fs.put_file(str(f), posixpath.join(root, *parts))
