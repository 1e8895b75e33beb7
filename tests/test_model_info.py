"""model-info: parameter counts from the meta device, checked against BLIP_REFERENCE.md's figures."""

import pytest
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import load_config
from capfilt.model.info import count


@pytest.mark.parametrize("name,expected", [("blip-base", 224e6), ("blip-large", 446e6)])
def test_paper_sizes(name, expected):
    c = count(load_config(name).model)
    assert abs(c.captioner - expected) / expected < 0.01
    assert abs(c.filter - expected) / expected < 0.01
    assert c.med > c.captioner  # the MED adds the encoder-only heads and the decoder-free text path
    assert c.momentum > 0


def test_exported_counts_match_the_hf_models(tmp_path):
    from capfilt.model.hf import export_captioner, export_filter, load_captioner, load_filter
    from capfilt.model.testing import tiny_med

    med, tok = tiny_med()
    c = count(med.cfg, med.vocab_size)
    export_captioner(med, tok, tmp_path / "cap")
    export_filter(med, tok, tmp_path / "filt")
    assert load_captioner(tmp_path / "cap")[0].num_parameters() == c.captioner
    assert load_filter(tmp_path / "filt")[0].num_parameters() == c.filter


def test_cli_model_info():
    result = CliRunner().invoke(app, ["model-info", "--config", "blip-base"])
    assert result.exit_code == 0, result.output
    assert "captioner (export)" in result.output and "223.7M" in result.output
