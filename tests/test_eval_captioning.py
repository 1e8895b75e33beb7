"""Captioning metrics by hand, and the whole eval report on a tiny demo world with a tiny model."""

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import load_config
from capfilt.data.synth import write_world
from capfilt.data.writer import write_tar
from capfilt.eval.captioning import attribute_accuracy, caption_scores
from capfilt.eval.report import evaluate_all
from capfilt.model.tokenizer import count_words
from capfilt.train.finetune import finetune
from capfilt.train.pretrain import fresh_med


def test_caption_scores_by_hand():
    refs = [["a small red square on a gray background"], ["two big blue circles below a green cross"]]
    exact = caption_scores(["A small red square on a gray background.", refs[1][0]], refs)
    assert exact["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert exact["cider"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D's ×10, disjoint references
    wrong = caption_scores(["purple", "orange"], refs)
    assert wrong["bleu4"] < 1e-6 and wrong["cider"] == 0.0


def test_attribute_accuracy_by_hand(tmp_path):
    scene = {
        "background": {"color": "gray", "texture": "solid"},
        "relation": None,
        "objects": [{"shape": "square", "color": "red", "size": "small", "x": 0.5, "y": 0.5, "r": 0.1}],
    }
    pq.write_table(pa.table({"key": ["k"], "scene": [json.dumps(scene)]}), tmp_path / "truth.parquet")
    truth = str(tmp_path / "truth.parquet")
    assert (
        attribute_accuracy(
            ["a red square", "a blue square", "a small square on a gray background", "nothing at all"],
            ["k"] * 4,
            truth,
        )
        == 0.5
    )


def test_evaluate_all_on_a_tiny_world(tmp_path):
    cfg = load_config("tiny", ["finetune.steps=2"])
    write_world(str(tmp_path / "world"), cfg.synth)
    w = tmp_path / "world"
    fresh_med(
        cfg, count_words(["a red square", "a small blue circle to the left of a cross"]), tmp_path / "med"
    )
    finetune(cfg, tmp_path / "med", [str(w / "human-000000.tar")], tmp_path / "ft")
    m = evaluate_all(
        cfg,
        [str(w / "test-000000.tar")],
        captioner=tmp_path / "ft" / "captioner",
        filter_=tmp_path / "ft" / "filter",
        truth=str(w / "truth.parquet"),
        out=tmp_path / "eval.json",
    )
    assert m["test"]["images"] == cfg.synth.n_test
    assert m["retrieval"]["texts"] == 5 * cfg.synth.n_test
    assert 0 <= m["retrieval"]["tr@1"] <= m["retrieval"]["tr@5"] <= m["retrieval"]["tr@10"] <= 100
    assert {"bleu4", "cider", "attribute_accuracy", "examples"} <= set(m["captioning"])
    assert json.loads((tmp_path / "eval.json").read_text())["retrieval"] == m["retrieval"]
    assert m["retrieval"]["k"] == 16  # BLIP's COCO protocol reranks 256: the command line takes --rerank-k
    args = ["eval", str(w / "test-000000.tar"), "--filter", str(tmp_path / "ft" / "filter"), "-c", "tiny"]
    wide = CliRunner().invoke(app, [*args, "--rerank-k", "80"])  # every text of the 16 images
    assert wide.exit_code == 0, wide.output
    assert json.loads(wide.stdout)["retrieval"]["k"] == 80
    # the split as img2dataset writes COCO: one sample per caption, an image's samples across two shards
    split = one_sample_per_caption(
        str(w / "test-000000.tar"), [str(tmp_path / f"coco-{i}.tar") for i in (0, 1)]
    )
    coco = evaluate_all(
        cfg, split, captioner=tmp_path / "ft" / "captioner", filter_=tmp_path / "ft" / "filter"
    )
    assert coco["test"] == {
        "images": cfg.synth.n_test,
        "joined": 4 * cfg.synth.n_test,
        "rejected": {},
        "ended_early": {},
    }
    assert coco["retrieval"] == m["retrieval"]
    assert coco["captioning"]["cider"] == m["captioning"]["cider"]
    # as CLIP_benchmark writes it: a sample per image, its captions one per line of its txt, no json
    lines = evaluate_all(
        cfg,
        [captions_as_lines(str(w / "test-000000.tar"), str(tmp_path / "lines.tar"))],
        captioner=tmp_path / "ft" / "captioner",
        filter_=tmp_path / "ft" / "filter",
    )
    assert lines["retrieval"] == m["retrieval"] and lines["captioning"]["cider"] == m["captioning"]["cider"]
    # finetuned on the human split written either way, both models are the ones finetuned on it as it
    # is: the same pairs in the same order, and a picture's captions positives of each other as before
    for name, human in (
        ("coco", one_sample_per_caption(str(w / "human-000000.tar"), [str(tmp_path / "coco-human.tar")])),
        ("lines", [captions_as_lines(str(w / "human-000000.tar"), str(tmp_path / "lines-human.tar"))]),
    ):
        finetune(cfg, tmp_path / "med", human, tmp_path / f"ft-{name}")
        for role in ("captioner", "filter"):
            weights = [
                (tmp_path / ft / role / "model.safetensors").read_bytes() for ft in ("ft", f"ft-{name}")
            ]
            assert weights[0] == weights[1], (name, role)


def captions_as_lines(src: str, dst: str) -> str:
    """``src``'s samples as CLIP_benchmark writes a retrieval set: the image and a txt of its captions,
    one per line."""
    files = tar_files(src)
    keys = sorted(name[: -len(".json")] for name in files if name.endswith(".json"))
    captions = {key: "\n".join(json.loads(files[f"{key}.json"])["captions"]) for key in keys}
    write_tar(
        dst,
        [
            m
            for key in keys
            for m in ((f"{key}.jpg", files[f"{key}.jpg"]), (f"{key}.txt", captions[key].encode()))
        ],
    )
    return dst


def one_sample_per_caption(src: str, dsts: list[str]) -> list[str]:
    """``src``'s samples written as img2dataset writes COCO (a sample per caption: the image, a txt and a
    json with the caption and url), cut into ``dsts`` inside an image's runs. An image's first sample keeps
    its key: the captioner's draws are seeded by key."""
    files = tar_files(src)
    rows = []
    for name in sorted(files):
        if name.endswith(".json"):
            key = name[: -len(".json")]
            for i, caption in enumerate(json.loads(files[name])["captions"]):
                meta = {"caption": caption, "url": f"http://images.example/{key}.jpg"}
                rows.append((key if i == 0 else f"{key}-{i}", files[f"{key}.jpg"], caption, meta))
    cuts = [0, *(len(rows) * i // len(dsts) + 2 for i in range(1, len(dsts))), len(rows)]
    for dst, part in zip(dsts, (rows[a:b] for a, b in zip(cuts, cuts[1:]))):
        write_tar(
            dst,
            [
                m
                for key, jpg, caption, meta in part
                for m in (
                    (f"{key}.jpg", jpg),
                    (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps(meta).encode()),
                )
            ],
        )
    return dsts


def tar_files(src: str) -> dict[str, bytes]:
    with tarfile.open(src) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
