"""The dataset card of a run folder: ``README.md`` for people, ``dataset_info.json`` for programs, and
``sizes.json`` (each tar's sample count) for open_clip's WebDataset loader.

A cleaned dataset goes to teams that never ran capfilt, so the folder explains itself: what its files
hold (tar members, Parquet schemas), how many samples went in and why each one that is missing is
missing, which models and threshold made it, the config, and how to load it with common readers.
Written from the run's manifest and summary at the end of every round, so it always matches them.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from capfilt.data import writer

README = "README.md"
DATASET_INFO = "dataset_info.json"
# open_clip's ``get_dataset_size`` reads {tar file name: samples} from the tars' folder, so that training on
# the folder needs no ``--train-num-samples``.
SIZES = "sizes.json"

THRESHOLD_MODES = {
    "fixed": "the config's `filter.threshold`, set by hand (BLIP's authors used 0.5)",
    "keep": "calibrated on the human split: the ITM score that keeps `filter.keep_share` of the human pairs",
    "f1": "calibrated on the human split: the best F1 of human pairs against mismatched human pairs",
}

TAR_MEMBERS = {
    "KEY.<jpg|jpeg|png|webp|gif|bmp>": "the original image bytes, never re-encoded",
    "KEY.txt": "the best kept caption",
    "KEY.json": (
        "caption, candidates (text, source web|synthetic, itm, itc, kept), "
        "source_json (the input json), provenance (models, seed, threshold, caption settings, config)"
    ),
    "KEY.<other>": "every other input member, carried through untouched",
}


def _schema(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def dataset_info(
    manifest: dict[str, Any],
    summary: dict[str, Any],
    provenance: dict[str, Any],
    kept: dict[str, int],
    input_sha256: dict[str, str],
) -> dict[str, Any]:
    """The machine-readable card; ``kept`` holds the committed shards' output NAMEs with the samples each
    kept, ``input_sha256`` the hashes their inputs had when they were cleaned, so a team can check which
    bytes the run cleaned."""
    names = list(kept)
    image_bytes = manifest["config"]["run"]["parquet_image_bytes"]
    mode = provenance.get("threshold_mode", "fixed")
    this = summary["this_invocation"]["shards"]
    return {
        "format": "capfilt round output: WebDataset tar + Parquet",
        "files": {
            "webdataset": [f"{n}.tar" for n in names],
            "parquet": [f"{n}.parquet" for n in names],
            "scores": [f"{n}.scores.parquet" for n in names],
        },
        "schema": {
            "tar_members": TAR_MEMBERS,
            "parquet": _schema(writer.KEPT_SCHEMA_WITH_IMAGE if image_bytes else writer.KEPT_SCHEMA),
            "scores_parquet": _schema(writer.SCORES_SCHEMA),
        },
        "counts": {
            "shards": summary["shards"],
            "shards_done": summary["shards_done"],
            "shards_processed_this_time": this,
            "shards_already_done": summary["shards_done"] - this,
            "failed_shards": sorted(summary["failed_shards"]),
            "gone_shards": summary.get("gone_shards", []),  # a selection carries its round's
            "in": summary["n_in"],
            "kept": summary["kept"],
            "kept_per_tar": {f"{n}.tar": kept[n] for n in names},
            "dropped": summary["dropped"],
            "rejected": summary["rejected"],
            "kept_captions_by_source": summary["kept_by_source"],
        },
        "models": provenance["models"],
        "threshold": {
            "value": provenance["threshold"],
            "mode": mode,
            "how": THRESHOLD_MODES.get(mode, f"mode {mode!r}: see the provenance in each sample's json"),
        },
        "seed": manifest["seed"],
        "inputs": manifest["shards"],
        "input_sha256": dict(sorted(input_sha256.items())),
        "config": manifest["config"],
    }


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def render_readme(info: dict[str, Any]) -> str:
    """The human card, with Hugging Face front matter so ``load_dataset(FOLDER)`` finds the tars."""
    c, t = info["counts"], info["threshold"]
    rejected = ", ".join(f"{k} {v}" for k, v in c["rejected"].items()) or "none"
    by_source = ", ".join(f"{k} {v}" for k, v in c["kept_captions_by_source"].items()) or "none"
    models = "\n".join(
        f"- **{role}**: `{json.dumps(m, sort_keys=True)}`" for role, m in info["models"].items()
    )
    parquet = "\n".join(f"- `{f['name']}`: `{f['type']}`" for f in info["schema"]["parquet"])
    members = "\n".join(f"- `{k}`: {v}" for k, v in info["schema"]["tar_members"].items())
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "*.tar"
---
# A CapFilt-cleaned image-text dataset

Made by capfilt (BLIP's CapFilt): every web image got synthetic captions from a captioner, every
caption (web and synthetic) was scored by an ITM filter, and captions scoring below the threshold were
dropped; a sample is kept when at least one of its captions is. `dataset_info.json` holds all of this
page as data.

## Counts
{
        _table(
            [
                ("samples in", c["in"]),
                ("kept", c["kept"]),
                ("dropped by the filter", c["dropped"]),
                ("rejected (unreadable)", rejected),
                ("kept captions by source", by_source),
                ("shards done / total", f"{c['shards_done']} / {c['shards']}"),
                (
                    "shards processed by the last run / already done",
                    f"{c['shards_processed_this_time']} / {c['shards_already_done']}",
                ),
                ("failed shards", len(c["failed_shards"])),
            ]
        )
    }

In = kept + dropped + rejected, always.

## Models and threshold
{models}

Threshold **{t["value"]}** ({t["mode"]}): {t["how"]}. Seed {info["seed"]}.

## Files
Per input shard `NAME`: `NAME.tar` (kept samples, WebDataset), `NAME.parquet` (kept rows),
`NAME.scores.parquet` (every scored sample, kept or dropped, with all candidate scores),
`NAME.stats.json` (counts and reject reasons), `NAME.done` (commit marker). `dataset_info.json`'s
`input_sha256` holds each input shard's SHA-256 as it was cleaned (`sha256sum`'s for a plain tar).
`sizes.json` holds each tar's sample count, where open_clip's WebDataset loader looks for it (no
`--train-num-samples` needed).

Tar members per sample:
{members}

`NAME.parquet` columns:
{parquet}

`NAME.scores.parquet` has the same columns (no image) plus `kept`.

## Loading
```python
import glob
tars, parquets = sorted(glob.glob("*.tar")), [p for p in sorted(glob.glob("*.parquet")) if not p.endswith(".scores.parquet")]

import datasets
ds = datasets.load_dataset("webdataset", data_files={{"train": tars}}, split="train")

import ray
ray.data.read_webdataset(tars).count(), ray.data.read_parquet(parquets).count()

import webdataset as wds
n = sum(1 for _ in wds.WebDataset(tars, shardshuffle=False))

from nvidia.dali import fn, pipeline_def
@pipeline_def(batch_size=32, num_threads=2, device_id=None)
def pipe():
    image, text = fn.readers.webdataset(paths=tars, ext=["jpg;jpeg;png;webp;gif;bmp", "txt"])
    return fn.decoders.image(image), text
```

## Config
```json
{json.dumps(info["config"], indent=1, sort_keys=True)}
```
"""


def write_card(out: str, info: dict[str, Any]) -> None:
    """Write ``README.md``, ``dataset_info.json`` and ``sizes.json`` into the run folder, atomically."""
    root = out.rstrip("/")
    writer.write_json(f"{root}/{DATASET_INFO}", info)
    writer.write_json(f"{root}/{SIZES}", info["counts"]["kept_per_tar"])
    with writer.atomic_open(f"{root}/{README}") as f:
        f.write(render_readme(info).encode())
