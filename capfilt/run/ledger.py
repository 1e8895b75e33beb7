"""The run ledger: what a run folder holds, what is left to do, and whether a rerun may continue it.

``OUT/manifest.json`` records the input shards, the config, the model hashes and the seed. A rerun
with the same config and models continues the run: shards whose done marker exists are skipped (the
writer puts the marker last, so a marker means the shard's files are complete), and new shards in its
list join the run (a nightly rerun over a grown list), unless they would rename an old shard's outputs. A rerun with a
different config or different models refuses, because mixing two runs' shards in one folder would make
the folder lie about how it was made. With ``new_run=True`` it clears the folder's previous outputs
(every file of the old manifest's shards, the summary) and starts over in the same folder: OUT always
holds exactly one run, so the folder name can be handed to the next stage without a subfolder lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from fsspec.core import url_to_fs

from capfilt.config import Config, ConfigError, config_from_dict
from capfilt.data import specs, versions, writer
from capfilt.data.sample import ShardStats
from capfilt.data.signing import unsigned
from capfilt.data.writer import write_json
from capfilt.errors import UserError
from capfilt.run import card
from capfilt.stages.calibrate import CALIBRATION

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
IDENTITY = ("config", "models", "seed")  # what must match for a rerun to continue a run
THRESHOLD = "config.filter.threshold"  # in the identity; set by the calibration when there is one


class RunMismatchError(UserError, RuntimeError):
    """A rerun whose config or models differ from the run already in the folder."""


class NotARun(UserError, FileNotFoundError):
    """A folder without a run's manifest."""


def make_manifest(shards: list[str], cfg: Config, models: dict[str, str]) -> dict[str, Any]:
    return {"shards": list(shards), "config": cfg.to_dict(), "models": dict(models), "seed": cfg.run.seed}


def _join(out: str, name: str) -> str:
    return out.rstrip("/") + "/" + name


def read_json(url: str) -> dict[str, Any] | None:
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rt") as f:
        return json.load(f)


def read_manifest(out: str) -> dict[str, Any]:
    manifest = read_json(_join(out, MANIFEST))
    if manifest is None:
        raise NotARun(f"{out}: no {MANIFEST}; not a capfilt run folder")
    return manifest


def differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted paths where two manifests' identities differ, e.g. ``config.caption.top_p``, with the
    values; the paths in ``ignore`` are not compared."""

    def walk(a: Any, b: Any, where: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in walk(a.get(k), b.get(k), f"{where}.{k}")]
        return [] if a == b else [f"{where.lstrip('.')}: {a!r} → {b!r}"]

    old = {k: old.get(k) for k in IDENTITY} | {"config": with_defaults(old.get("config"))}
    diff = walk(old, {k: new.get(k) for k in IDENTITY}, "")
    return [d for d in diff if _path(d) not in ignore]


def with_defaults(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A manifest's config with every key added to capfilt since it was written at its default, which is
    how that run behaved (a new key's default keeps the old behaviour): so a rerun after an upgrade
    continues the run. As it is if it no longer parses (a key since removed), so that shows as a
    difference."""
    if config is None:
        return None
    try:
        return config_from_dict(config).to_dict()
    except ConfigError:
        return config


def _path(difference: str) -> str:
    """The dotted path of one of ``differences``' lines."""
    return difference.split(": ", 1)[0]


def mismatch(out: str, diff: list[str], manifest: dict[str, Any]) -> RunMismatchError:
    """The refusal of a rerun whose identity differs by ``diff``, saying what to do."""
    calibrated = manifest["config"]["filter"]["calibration"] != "none"
    hint = (
        "\nThe threshold is calibrated on --human: pass the human shards the run used (its "
        f"{CALIBRATION} names them)."
        if calibrated and any(_path(d) == THRESHOLD for d in diff)
        else ""
    )
    return RunMismatchError(
        f"{out} holds a run made with another config or models:\n  "
        + "\n  ".join(diff[:20])
        + hint
        + "\nUse another --out, or pass --new-run to clear that run and start over."
    )


def check_rerun(
    out: str, manifest: dict[str, Any], ignore: tuple[str, ...] = (), new_run: bool = False
) -> tuple[dict[str, Any] | None, list[str]]:
    """Refuse, before any model is loaded, a rerun whose identity differs from the run in ``out``
    outside ``ignore`` (the threshold, before calibration has set it), unless ``new_run`` (which clears
    that run). Returns the folder's manifest (None: no run there yet) and the differences."""
    old = read_json(_join(out, MANIFEST))
    diff = differences(old, manifest, ignore) if old is not None else []
    if diff and not new_run:
        raise mismatch(out, diff, manifest)
    return old, diff


def location(url: str) -> tuple[str, str]:
    """Where a URL points, comparable between spellings: (protocol, path), local paths resolved."""
    fs, path = url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        path = os.path.realpath(path)
    return protocol, path.rstrip("/")


def check_out_folder(out: str, inputs: list[str]) -> None:
    """Refuse an output folder that holds input shards: each shard's outputs are named after it
    (``NAME.tar``), so they would replace the inputs, and a glob over the folder would read one run's
    outputs as the next one's inputs."""
    where = location(out)
    here = {f for f in {posixpath.dirname(u) for u in inputs} if location(f) == where}
    first = next((u for u in inputs if posixpath.dirname(u) in here), None)
    if first is not None:
        raise UserError(
            f"--out {out} holds the input shards ({first}); its outputs would replace them. "
            "Write the run to a folder of its own"
        )


def clear_shard(out: str, name: str) -> None:
    """Remove a shard's outputs, its done marker first: a clear cut short leaves the shard uncommitted.
    Each file by its name, not a glob: ``web.*`` would also match the outputs of a shard ``web.part2``."""
    fs, root = url_to_fs(out)
    for suffix in [".done"] + [s for s in writer.ROUND_SUFFIXES if s != ".done"]:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(posixpath.join(root, name + suffix))


def clear_run(out: str, old: dict[str, Any]) -> None:
    """Remove every output of a previous run: its shards' files, the summary, the calibration scores (of
    its filter, not the next run's), the card, the manifest."""
    fs, root = url_to_fs(out)
    for name in shard_names(old["shards"]).values():
        clear_shard(out, name)
    for name in (SUMMARY, CALIBRATION, card.README, card.DATASET_INFO, card.SIZES, MANIFEST):
        if fs.exists(posixpath.join(root, name)):
            fs.rm(posixpath.join(root, name))


def open_run(out: str, manifest: dict[str, Any], new_run: bool = False) -> None:
    """Start or continue the run in ``out``; refuse a rerun with another config or models."""
    fs, root = url_to_fs(out)
    writer.make_folder(fs, root)
    old = read_json(_join(out, MANIFEST))
    if old is not None:
        diff = differences(old, manifest)
        if diff and not new_run:
            raise mismatch(out, diff, manifest)
        if diff:
            clear_run(out, old)
        else:  # same run, maybe more shards (a nightly rerun over new downloads): remember them all
            manifest = {**manifest, "shards": grown_shards(out, old["shards"], manifest["shards"])}
    write_json(_join(out, MANIFEST), manifest)


def grown_shards(out: str, old: list[str], given: list[str]) -> list[str]:
    """The shards a rerun covers: the folder's earlier ones, then the new ones it is given. A given shard
    the run lists as a ``file://`` URL (written before capfilt kept one spelling) keeps the run's
    spelling, so its outputs keep their names; a shard the run lists with a signature is listed without
    (``signing.unsigned``). Refused if a new shard's file name would rename an earlier shard's outputs."""
    spelled = {specs.canonical(u): u for u in old if u.startswith(specs.LOCAL_PROTOCOLS)}
    ids = {u: unsigned(u) for u in old}  # a run from before capfilt left signatures out lists them
    grown = list(dict.fromkeys(list(ids.values()) + [spelled.get(u, u) for u in given]))
    now = shard_names(grown)
    renamed = sorted(ids[u] for u, n in shard_names(old).items() if now[ids[u]] != n)
    if renamed:
        raise RunMismatchError(
            f"{out}: the new shards share file names with {renamed[:5]} (at other URLs), "
            "which would rename their outputs; use another --out"
        )
    return grown


def shard_names(shards: list[str]) -> dict[str, str]:
    """Input URL → output NAME, unique over the run's whole shard list."""
    return {u: writer.output_name(u, shards) for u in shards}


FILES_PER_READ = 1000


def read_files(out: str, files: list[str]) -> Iterator[tuple[str, bytes]]:
    """(file, bytes) of each of ``files`` (names in ``out``) that exists, read a thousand at a time:
    concurrently on an object store (a rerun over 100,000 committed shards on S3 must not wait for
    their requests one after the other), and with at most a thousand files in memory. Any error but a
    missing file is raised: a store's hiccup must not make a committed shard look uncommitted."""
    fs, root = url_to_fs(out)
    for i in range(0, len(files), FILES_PER_READ):
        chunk = [posixpath.join(root, f) for f in files[i : i + FILES_PER_READ]]
        literal = [p for p in chunk if not set("*?[") & set(p)]  # fsspec's cat would glob the others
        found = fs.cat(literal, on_error="return", start=0) if literal else {}  # a range: s3fs asks no size
        for path in sorted(set(chunk) - set(literal)):
            try:
                found[path] = fs.cat_file(path)
            except FileNotFoundError as err:
                found[path] = err
        for path, data in found.items():
            if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                raise data
            if not isinstance(data, Exception):
                yield posixpath.basename(path), data


def committed(out: str, names: dict[str, str]) -> dict[str, dict[str, str]]:
    """url → the input version recorded by its done marker, for each committed shard of ``names`` ({} if
    the round that committed it recorded none)."""
    url_of = {f"{name}.done": url for url, name in names.items()}
    recorded = {url_of[f]: _input_version(data) for f, data in read_files(out, list(url_of))}
    return {url: recorded[url] for url in names if url in recorded}


def _input_version(marker: bytes) -> dict[str, str]:
    """The input version a done marker records; {} for one that does not (its presence alone commits)."""
    try:
        return json.loads(marker).get("input_version") or {}
    except (ValueError, AttributeError):
        return {}


def pending_shards(
    out: str, names: dict[str, str], shards: list[str], reads: dict[str, str] | None = None
) -> tuple[list[tuple[str, str]], list[str]]:
    """(url, name) of the ``shards`` to clean, in order: those without a done marker in ``out``, and those
    whose input changed since it was cleaned (its size or store version differs from the one its marker
    records); and the urls of the latter. ``reads``: url → the signed URL to ask for its version, for the
    shards that have one (``signing.read_urls``)."""
    reads = reads or {}
    done = committed(out, {u: names[u] for u in shards})
    asked = {reads.get(u, u): u for u, v in done.items() if v}
    now = {asked[r]: v for r, v in versions.current_versions(list(asked)).items()}
    changed = [u for u, v in done.items() if v and versions.changed(v, now[u])]
    return [(u, names[u]) for u in shards if u not in done or u in changed], changed


def gone_inputs(jobs: list[tuple[str, str]], given: list[str]) -> list[str]:
    """The pending shards that only earlier invocations named and whose input is gone: never cleaned,
    and nothing left to clean. A round leaves them out and says so, rather than fail on them every night
    until the folder is cleared (the shards this invocation names were checked when its spec expanded)."""
    named = set(given)
    return specs.missing([url for url, _ in jobs if url not in named])


def remove_stale_temps(out: str, names: list[str]) -> list[str]:
    """Delete the temp files that killed writers left behind for the shards ``names``; returns them.

    A shard's tar is written into its temp file while the shard is cleaned, so a killed worker can leave a
    large one. A round calls this before its workers start and after they are gone, when no live writer
    owns those files. Object stores hold no temp files (an unfinished upload is invisible), so they are
    not listed.
    """
    fs, root = url_to_fs(out)
    if writer.is_object_store(fs) or not fs.isdir(root):
        return []
    pending = set(names)
    stale = [p for p in fs.ls(root, detail=False) if writer.temp_owner(p) in pending]
    for path in stale:
        fs.rm(path)
    return stale


def read_stats(out: str, names: list[str]) -> Iterator[ShardStats]:
    """The committed shards' stats, as written next to them, read in batches (``read_files``)."""
    read = 0
    for _, raw in read_files(out, [f"{name}.stats.json" for name in names]):
        data, read = json.loads(raw), read + 1
        yield ShardStats(**{f.name: data[f.name] for f in dataclasses.fields(ShardStats) if f.name in data})
    if read != len(names):
        raise FileNotFoundError(
            f"{out}: {len(names) - read} of {len(names)} shards marked done have no stats.json"
        )
