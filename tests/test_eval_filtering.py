"""Filter metrics on hand-checkable fixtures: raw scores, and a round's scores.parquet against truth or
a team's own labels."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import load_config
from capfilt.data.writer import SCORES_SCHEMA
from capfilt.eval.filtering import drop_metrics, roc_auc, round_metrics
from capfilt.eval.report import evaluate_all


def test_roc_auc_by_hand():
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    # positives 0.5, 0.3; negatives 0.5, 0.1: pairs (0.5>0.5 tie=.5, 0.5>0.1=1, 0.3<0.5=0, 0.3>0.1=1) → 2.5/4
    assert roc_auc([0.5, 0.3, 0.5, 0.1], [1, 1, 0, 0]) == 0.625
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_drop_metrics_by_hand():
    itm = [0.1, 0.2, 0.9, 0.4, 0.8, 0.7]
    noisy = [1, 1, 1, 0, 0, 0]
    m = drop_metrics(itm, noisy, threshold=0.5)
    # dropped: 0.1, 0.2, 0.4 → tp 2, fp 1; noisy 3 → recall 2/3
    assert m["dropped"] == 3 and m["base_rate"] == 0.5
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # -itm ranks noisy [0.1, 0.2, 0.9] vs clean [0.4, 0.8, 0.7]: 0.1 and 0.2 beat all three; 0.9 beats none
    assert m["roc_auc"] == pytest.approx(6 / 9)


@pytest.fixture
def round_scores(tmp_path):
    """A round folder whose web captions a, b, c, d have ITM 0.1, 0.9, 0.3, 0.8."""
    rows = [("a", 0.1), ("b", 0.9), ("c", 0.3), ("d", 0.8)]
    table = pa.Table.from_pylist(
        [
            {
                "key": k,
                "shard": "web-000000.tar",
                "caption": "w" if s >= 0.5 else "s",
                "candidates": [
                    {"text": "w", "source": "web", "itm": s, "itc": 0.0, "kept": s >= 0.5},
                    {"text": "s", "source": "synthetic", "itm": 0.99, "itc": 0.0, "kept": True},
                ],
                "image_ext": "jpg",
                "meta_json": "{}",
                "kept": True,
            }
            for k, s in rows
        ],
        schema=SCORES_SCHEMA,  # the writer's own contract, so a schema change breaks this test
    )
    (tmp_path / "run").mkdir()
    pq.write_table(table, tmp_path / "run" / "web-000000.scores.parquet")
    (tmp_path / "run" / "summary.json").write_text(
        json.dumps({"threshold": 0.5})
    )  # what the run selected with
    return tmp_path / "run"


def test_round_metrics_from_parquet(tmp_path, round_scores):
    pq.write_table(
        pa.table(
            {
                "key": ["a", "b", "c", "d", "e", "h"],
                "split": ["web"] * 5 + ["human"],
                "noisy": [True, False, True, True, True, False],
                "noise_type": ["shuffled", None, "swapped_color", "shuffled", "shuffled", None],
                "clean_caption": ["x"] * 6,
            }
        ),
        tmp_path / "truth.parquet",
    )
    m = round_metrics(round_scores, tmp_path / "truth.parquet")
    assert m["n"] == 4 and m["missing"] == 1  # "e" was never scored; "h" is not web
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["recall_by_noise_type"] == {"shuffled": 0.5, "swapped_color": 1.0}


def test_a_teams_own_labels_score_a_round_and_no_labels_skip_it(tmp_path, round_scores):
    """Labels with only ``key`` and ``noisy`` (no split, noise_type or scene) are enough; none is fine."""
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "noisy": [True, False, False]}), tmp_path / "labels.parquet"
    )
    m = round_metrics(round_scores, tmp_path / "labels.parquet")
    assert m["n"] == 3 and m["precision"] == 0.5 and m["recall"] == 1.0 and m["recall_by_noise_type"] == {}
    cfg = load_config("tiny")
    assert evaluate_all(cfg, [], run_dir=round_scores) == {}
    assert evaluate_all(cfg, [], run_dir=round_scores, truth=tmp_path / "labels.parquet")["filtering"] == m
    with pytest.raises(ValueError, match="lacks \\['noisy'\\]"):
        pq.write_table(pa.table({"key": ["a"]}), tmp_path / "bad.parquet")
        round_metrics(round_scores, tmp_path / "bad.parquet")


def test_an_undefined_metric_is_null_in_the_json_a_user_pipes(tmp_path, round_scores):
    """Labels of one class leave ROC-AUC undefined. Python wrote it NaN, which is not JSON: `capfilt eval
    ... | jq` and eval.json's other readers refused the whole output. It is null now, on stdout and in
    the file."""
    from typer.testing import CliRunner

    from capfilt.cli import app

    pq.write_table(pa.table({"key": ["a", "b"], "noisy": [False, False]}), tmp_path / "clean.parquet")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--run", str(round_scores), "--labels", str(tmp_path / "clean.parquet"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    for metrics in (strict(result.stdout), strict(out.read_text())):
        assert metrics["filtering"]["roc_auc"] is None and metrics["filtering"]["n"] == 2
