"""The demo world: deterministic bytes, noise as configured, captions the parser can check."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from capfilt.config import SynthConfig
from capfilt.data.reader import iter_shard
from capfilt.data.synth import caption_accuracy, parse_caption, write_world


def _truth(world: str) -> list[dict]:
    return pq.read_table(f"{world}/truth.parquet").to_pylist()


def test_same_seed_same_bytes(tiny_world, tmp_path):
    write_world(str(tmp_path), SynthConfig(image_size=32, n_web=64, n_human=16, n_test=16, shard_size=32))
    files = sorted(p.name for p in Path(tiny_world).iterdir())
    assert files == [
        "human-000000.tar",
        "test-000000.tar",
        "truth.parquet",
        "web-000000.tar",
        "web-000001.tar",
    ]
    for name in files:
        assert (tmp_path / name).read_bytes() == (Path(tiny_world) / name).read_bytes(), name
    other = tmp_path / "seed1"
    write_world(str(other), SynthConfig(image_size=32, n_web=8, n_human=0, n_test=0, seed=1))
    assert (other / "web-000000.tar").read_bytes()[:20000] != (tmp_path / "web-000000.tar").read_bytes()[
        :20000
    ]


def test_shards_hold_no_truth_and_references_are_distinct(tiny_world):
    truth = {row["key"]: row for row in _truth(tiny_world)}
    seen = Counter()
    for split, refs in (("web", 1), ("human", 2), ("test", 5)):
        for url in sorted(Path(tiny_world).glob(f"{split}-*.tar")):
            for s in iter_shard(str(url)):
                seen[split] += 1
                assert s.key.startswith(f"{split}-") and s.image_ext == "jpg"
                assert set(s.meta) == ({"caption"} if split == "web" else {"caption", "captions"})
                assert s.meta["caption"] == s.caption
                if split != "web":
                    assert len(set(s.meta["captions"])) == refs and s.meta["captions"][0] == s.caption
                    assert all(
                        caption_accuracy(c, json.loads(truth[s.key]["scene"])) for c in s.meta["captions"]
                    )
    assert seen == {"web": 64, "human": 16, "test": 16} and len(truth) == 96


def test_noise_ratio_kinds_and_truth(tmp_path):
    write_world(str(tmp_path), SynthConfig(image_size=16, n_web=600, n_human=0, n_test=0, noise=0.4, seed=3))
    rows = _truth(str(tmp_path))
    captions = {s.key: s.caption for s in iter_shard(str(tmp_path / "web-000000.tar"))}
    assert abs(sum(r["noisy"] for r in rows) / len(rows) - 0.4) < 0.02
    kinds = Counter(r["noise_type"] for r in rows if r["noisy"])
    assert set(kinds) == {"swap", "attribute", "junk"} and min(kinds.values()) > 0.2 * sum(kinds.values())
    for r in rows:
        scene = json.loads(r["scene"])
        assert caption_accuracy(r["clean_caption"], scene)
        # a noisy caption is false of its image, a clean one is the clean caption
        assert caption_accuracy(captions[r["key"]], scene) == (not r["noisy"]), (r, captions[r["key"]])


def test_parse_caption_and_accuracy():
    facts = parse_caption("A large red circle to the right of a small blue square, on a gray background.")
    assert facts == {
        ("object", ("large", "red", "circle")),
        ("object", ("small", "blue", "square")),
        ("left_of", ("small", "blue", "square"), ("large", "red", "circle")),
        ("background", "gray"),
    }
    scene = {
        "background": {"color": "gray", "texture": "solid"},
        "relation": "left_of",
        "objects": [
            {"shape": "square", "color": "blue", "size": "small"},
            {"shape": "circle", "color": "red", "size": "large"},
        ],
    }
    assert caption_accuracy("a picture of a big red circle to the right of a blue square", scene)
    assert caption_accuracy("a red circle", scene)
    assert not caption_accuracy("a red circle to the left of a blue square", scene)
    assert not caption_accuracy("a small red circle", scene)
    assert not caption_accuracy("a red circle on a beige background", scene)
    assert not caption_accuracy("IMG_4032.jpg", scene)
