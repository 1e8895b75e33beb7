"""Typed configs: every shipped config loads; a wrong key or type is a clear error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from capfilt.config import CONFIG_DIR, ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads_and_round_trips(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert config_from_dict(cfg.to_dict()) == cfg


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['widht'\].*vision_width"):
        load_config("tiny", ["model.widht=3"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="model.patch_size: expected int"):
        load_config("tiny", ["model.patch_size=eight"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny", ["run.decoder=opencv"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("tiny", ["run.dtype=float16"])
    with pytest.raises(ConfigError, match="shards_in_flight must be >= 1"):
        load_config("tiny", ["run.shards_in_flight=0"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("caption.top_p=1.5", r"caption.top_p must be in \(0, 1\], got 1.5"),
        ("caption.num_captions=0", "caption.num_captions must be >= 1"),
        ("caption.min_length=30", r"caption.min_length must be in \[0, max_length\]"),
        ("filter.threshold=1.5", r"filter.threshold must be in \[0, 1\]"),
        ("filter.batch_size=0", "filter.batch_size must be >= 1"),
        ("run.batch_size=0", "run.batch_size must be >= 1"),
        ("run.actors=0", 'run.actors must be >= 1 or "auto"'),
        ("run.num_gpus_per_actor=-1", "run.num_gpus_per_actor must be >= 0"),
        ("model.text_heads=5", r"model.text_width must be a positive multiple of model.text_heads \(5\)"),
        ("model.momentum=1", r"model.momentum must be in \(0, 1\)"),
        ("finetune.image_size=30", r"finetune.image_size must be a positive multiple of model.patch_size"),
        ("pretrain.batch_size=7", r"model.queue_size must be a multiple of pretrain's global batch \(7\)"),
        ("pretrain.grad_clip=0", "pretrain.grad_clip must be > 0"),
        ("finetune.crop_scale=[0.9, 0.5]", "finetune.crop_scale must be"),
        ("synth.noise=1.2", r"synth.noise must be in \[0, 1\]"),
        ("run.caption_from=[]", r"run.caption_from must be a list of member extensions"),
        ("run.caption_from=[jpg]", r"\(not an image's or json\).*got \['jpg'\]"),
        ("run.caption_from=[json.]", r"json.KEY entries, got \['json.'\]"),
        ("run.caption_from=caption", r"run.caption_from: expected a list, got 'caption'"),
    ],
)
def test_a_value_out_of_its_range_is_an_error(override, message):
    """The round's values once ran: a round that rejected every sample, kept none, or batched a whole
    shard; the training values failed at the first step, after the data was read."""
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_a_list_of_any_length():
    assert load_config("tiny", ["run.caption_from=[caption, json.alt]"]).run.caption_from == (
        "caption",
        "json.alt",
    )
    assert load_config("tiny").to_dict()["run"]["caption_from"] == ["txt", "json.caption"]


def test_overrides_and_int_to_float():
    cfg = load_config("tiny", ["filter.threshold=1", "pretrain.crop_scale=[0.3, 1.0]"])
    assert cfg.filter.threshold == 1.0 and isinstance(cfg.filter.threshold, float)
    assert cfg.pretrain.crop_scale == (0.3, 1.0)


def test_base_overrides_only_what_it_names(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: blip-base\nmodel:\n  vision_layers: 24\n")
    cfg, base = load_config(child), load_config("blip-base")
    assert cfg.model.vision_layers == 24 and cfg.model.vision_width == base.model.vision_width
    assert cfg.name == "child"


def test_base_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-config")


def test_the_wheel_ships_every_module_and_named_config(tmp_path):
    """A `pip install` of the wheel (a cluster image, a team's index) gets what a checkout has: every
    module, and configs/ as capfilt/configs, so `-c blip-base` and the default `demo` load. Before, the
    wheel held no config, and every named one failed."""
    pytest.importorskip("setuptools")  # the build backend, used from this environment (no download)
    root, src = CONFIG_DIR.parent, tmp_path / "src"  # a copy: setuptools writes build/ into the tree
    for name in ("capfilt", "configs"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("capfilt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        names = set(z.namelist())
    modules = {str(p.relative_to(root)) for p in (root / "capfilt").rglob("*.py")}
    configs = {f"capfilt/configs/{p.name}" for p in CONFIG_DIR.glob("*.yaml")}
    assert modules | configs <= names, sorted((modules | configs) - names)
    probe = "from capfilt.config import CONFIG_DIR, load_config; print(CONFIG_DIR); load_config('blip-base')"
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip() == str(tmp_path / "site" / "capfilt" / "configs")
