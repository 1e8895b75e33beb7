"""Model references: what a user may pass as ``--captioner``, ``--filter`` or ``--tokenizer``.

A reference is a local folder, or an HF hub id ``org/name`` with an optional ``@revision`` (a branch,
tag or commit). Hub ids resolve through huggingface_hub's cache only (``HF_HOME``/``HF_HUB_CACHE``
say where it is): capfilt never downloads weights while it runs, so a run is reproducible and works
offline. Fill the cache once, on purpose, with ``hf download org/name``. Provenance records the id,
the commit the cache resolved to, and the weight hash.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from capfilt.errors import UserError

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class NotAModel(UserError, ValueError):
    """A reference that names no usable model: no such folder or cached hub id, or no safetensors."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: ``path`` holds the files; ``id`` is what the user named; ``revision`` is the
    hub commit (None for a local folder)."""

    path: Path
    id: str
    revision: str | None = None


def resolve_model(ref: str | Path) -> ModelRef:
    """A local folder, by its absolute path (a worker of a running Ray has another working folder);
    ``org/name[@revision]`` from the HF hub cache; else ``ModelNotFound``."""
    if Path(ref).is_dir():
        return ModelRef(Path(os.path.abspath(ref)), str(ref))
    repo_id, _, revision = str(ref).partition("@")
    if not _HUB_ID.fullmatch(repo_id):
        raise NotAModel(f"{ref}: no such folder; pass a model folder or an HF hub id org/name[@revision]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise NotAModel(
            f"{ref}: not a folder and not in the HF hub cache; download it once with "
            f"`hf download {repo_id}{' --revision ' + revision if revision else ''}` (or set HF_HOME)"
        ) from err
    return ModelRef(path, repo_id, path.name)


def weight_files(path: Path) -> list[Path]:
    """A model folder's safetensors files; a clear error for a pickle-only folder or an empty one."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("pytorch_model*.bin")):
            raise NotAModel(
                f"{path} holds only pytorch_model.bin (a pickle); capfilt loads safetensors only. Convert it "
                'once, on purpose: `python -c "import transformers as t; '
                f"t.AutoModel.from_pretrained('{path}').save_pretrained('{path}')\"` (writes model.safetensors)"
            )
        raise NotAModel(f"{path}: no model.safetensors; pass a captioner/filter folder (capfilt finetune's)")
    return files


def model_hash(path: str | Path) -> str:
    """sha256 over the safetensors weight file(s) and config.json: a model's identity for provenance."""
    path = Path(path)
    h = hashlib.sha256()
    for f in [*weight_files(path), path / "config.json"]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
