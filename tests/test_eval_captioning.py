"""Captioning metrics by hand, and the whole eval report on a tiny demo world with a tiny model."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import load_config
from capfilt.data.synth import write_world
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
