"""Typed, validated configuration.

A config is plain data: nested dataclasses loaded from YAML (``configs/NAME.yaml``) with optional
``section.key=value`` overrides. A wrong key or a wrong type is a clear error naming the valid choices,
never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from capfilt.data.sample import CAPTION_FROM, IMAGE_EXTS
from capfilt.errors import UserError

_HERE = Path(__file__).resolve().parent
# the named configs: inside the package when installed from a wheel (pyproject), else the checkout's configs/
CONFIG_DIR = next((d for d in (_HERE / "configs", _HERE.parent / "configs") if d.is_dir()), _HERE / "configs")


class ConfigError(ValueError, UserError):
    """A config that does not match the schema."""


def _check(ok: bool, key: str, rule: str, value: object) -> None:
    """A value out of its range is a ConfigError at load time, not a round that rejects every sample (a
    num_captions of 0) or silently keeps none (a threshold above 1), nor a training run that fails at its
    first step."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _at_least(section: object, prefix: str, keys: tuple[str, ...], low: int = 1) -> None:
    for key in keys:
        _check(getattr(section, key) >= low, f"{prefix}.{key}", f">= {low}", getattr(section, key))


def _caption_source(source: str) -> bool:
    """A ``run.caption_from`` entry: ``json.KEY``, or a member extension that names no image nor the json."""
    if source.startswith("json."):
        return len(source) > len("json.")
    return bool(source) and source == source.lower() and source not in (*IMAGE_EXTS, "json")


def _multiple(value: int, key: str, of: int, of_key: str) -> None:
    _check(value >= 1 and value % of == 0, key, f"a positive multiple of {of_key} ({of})", value)


@dataclass
class ModelConfig:
    """The MED's dimensions and the ITC/ITM/LM hyper-parameters (BLIP_REFERENCE.md, 'MED', 'Losses')."""

    image_size: int = 224  # pretraining resolution; finetune.image_size is used from finetuning on
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    vision_ln_eps: float = 1e-6  # reference ViT; transformers defaults to 1e-5
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    text_dropout: float = 0.1  # transformers defaults to 0.0
    vocab_size: int = 30524  # target size when training a tokenizer; a checkpoint's tokenizer wins
    max_text_len: int = 35
    embed_dim: int = 256  # ITC projection width
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4
    temp: float = 0.07
    label_smoothing: float = 0.1
    # Pairs with identical caption text are positives of each other in ITC and never ITM negatives (web
    # corpora repeat "image", "click to enlarge"; human splits "a dog on a couch"), in pretraining and,
    # beside the image ids, in the filter's finetuning. False is BLIP's reference.
    same_text_positives: bool = False
    # One more ITM negative per pair, not in BLIP: its caption with one word replaced by a word that
    # another caption of the batch has in the same slot (losses.swap_one_token), so that ITM must check
    # each word (one-wrong-attribute noise). Measured on the demo: no gain in attribute recall.
    itm_swap_negatives: bool = False
    # Pretraining's start, as the reference's (BLIP never trains its ViT or BERT from scratch): a pretrained
    # ViT (timm layout, e.g. timm/deit_base_patch16_224.fb_in1k, or an HF ViT) and an HF BERT (e.g.
    # google-bert/bert-base-uncased, whose tokenizer then replaces a trained one), each a folder or a
    # cached hub id. "": a seeded random start (the demo: no pretrained model of its size exists).
    vision_init: str = ""
    text_init: str = ""

    def __post_init__(self):
        _at_least(self, "model", ("patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp",
                                  "text_width", "text_layers", "text_heads", "text_ffn", "vocab_size",
                                  "max_text_len", "embed_dim", "queue_size"))  # fmt: skip
        _multiple(self.image_size, "model.image_size", self.patch_size, "model.patch_size")
        _multiple(self.vision_width, "model.vision_width", self.vision_heads, "model.vision_heads")
        _multiple(self.text_width, "model.text_width", self.text_heads, "model.text_heads")
        _check(0.0 < self.momentum < 1.0, "model.momentum", "in (0, 1)", self.momentum)
        _check(0.0 <= self.alpha <= 1.0, "model.alpha", "in [0, 1]", self.alpha)
        _check(self.temp > 0, "model.temp", "> 0", self.temp)
        for key in ("text_dropout", "label_smoothing"):
            _check(0.0 <= getattr(self, key) < 1.0, f"model.{key}", "in [0, 1)", getattr(self, key))


@dataclass
class TrainConfig:
    """One training stage (pretrain or finetune): optimiser, schedule, augmentation, checkpoints."""

    image_size: int = 224
    batch_size: int = 32
    epochs: int = 20
    steps: int = 0  # > 0: stop after this many optimiser steps (overrides epochs for the schedule)
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    alpha_ramp_epochs: int = 2  # 2 for pretraining, 1 for finetuning
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    checkpoint_every: int = 1000
    shuffle_buffer: int = 1000
    seed: int = 0
    workers: int = 1  # > 1: data-parallel with Ray Train
    # Where Ray puts the workers: PACK fills a node first (fastest collectives), SPREAD one per node while
    # nodes last. Both fall back to the nodes left when one is lost (the STRICT_ kinds would not).
    placement: Literal["PACK", "SPREAD"] = "PACK"
    bf16: bool = True  # autocast on GPU only
    # > 0: each text pass runs in chunks of this many rows of similar length, each padded only to its own
    # longest text (MED.by_length): the demo's 64 makes a step 5-10 % faster on 2 CPU threads. 0: one pass
    # padded to the batch's longest, as the reference does (and a GPU, where it is unmeasured).
    text_chunk: int = 0
    prompt: str = "a picture of "  # captioner finetuning prefix, masked out of the LM loss
    # Finetuning only: the captioner and the filter keep the pretrained ViT (not trained), so they hold the
    # same one and a round encodes each image once for both: 1.37x the models' rate on an H100
    # (docs/BENCHMARKS.md). BLIP finetunes the ViT too; what freezing it costs is in docs/RESULTS.md.
    freeze_vision: bool = False


def _check_stage(section: str, stage: TrainConfig, model: ModelConfig) -> None:
    def need(ok: bool, key: str, rule: str) -> None:
        _check(ok, f"{section}.{key}", rule, getattr(stage, key))

    _at_least(stage, section, ("batch_size", "checkpoint_every", "workers"))
    _multiple(stage.image_size, f"{section}.image_size", model.patch_size, "model.patch_size")
    need(stage.epochs >= 1 or stage.steps >= 1, "epochs", ">= 1 when steps is 0")
    need(stage.lr > 0 and 0 <= stage.min_lr <= stage.lr, "lr", "> 0 and >= min_lr")
    need(stage.grad_clip > 0, "grad_clip", "> 0 (the gradient norm's bound)")
    need(
        section == "finetune" or not stage.freeze_vision,
        "freeze_vision",
        "false (pretraining learns the ViT)",
    )
    need(
        0 < stage.crop_scale[0] <= stage.crop_scale[1] <= 1, "crop_scale", "[low, high], 0 < low <= high <= 1"
    )
    batch = stage.batch_size * stage.workers  # each step enqueues the global batch's ITC features
    _check(model.queue_size % batch == 0, "model.queue_size", f"a multiple of {section}'s global batch ({batch})",
           model.queue_size)  # fmt: skip


@dataclass
class CaptionConfig:
    """Synthetic caption generation (BLIP_REFERENCE.md, 'Generation')."""

    method: Literal["nucleus", "beam"] = "nucleus"
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    num_beams: int = 3
    min_length: int = 5
    max_length: int = 20
    num_captions: int = 1
    prompt: str = "a picture of "

    def __post_init__(self):
        _check(0.0 < self.top_p <= 1.0, "caption.top_p", "in (0, 1]", self.top_p)
        _check(self.repetition_penalty > 0, "caption.repetition_penalty", "> 0", self.repetition_penalty)
        _at_least(self, "caption", ("num_beams", "num_captions"))
        _check(
            0 <= self.min_length <= self.max_length,
            "caption.min_length",
            "in [0, max_length]",
            self.min_length,
        )


@dataclass
class FilterConfig:
    """The ITM filter and the selection policy."""

    threshold: float = 0.5  # the value BLIP's authors used; with calibration it is set from the human split
    batch_size: int = 64
    # "keep": the ITM score that keeps keep_share of the human pairs; "f1": the best F1 of human pairs
    # against mismatched human pairs (stages/calibrate.py). "none" uses ``threshold`` as it is.
    calibration: Literal["none", "keep", "f1"] = "none"
    keep_share: float = 0.95
    calibration_samples: int = 1000  # human pairs scored to calibrate
    # Also record each candidate's ITC similarity. BLIP's filter decides on ITM alone; ITC costs one
    # unimodal text pass per candidate: 5 % of the filter at BLIP-base size on a GPU, about 40 % at
    # the demo's size on a CPU. false writes null ITC.
    itc: bool = True

    def __post_init__(self):
        _check(
            0.0 <= self.threshold <= 1.0, "filter.threshold", "in [0, 1] (an ITM probability)", self.threshold
        )
        _at_least(self, "filter", ("batch_size",))
        _at_least(self, "filter", ("calibration_samples",), low=2)
        _check(0.0 < self.keep_share <= 1.0, "filter.keep_share", "in (0, 1]", self.keep_share)


@dataclass
class RunConfig:
    """One CapFilt round: decoding, batching and distribution."""

    image_size: int = 384
    batch_size: int = 32
    decoder: Literal["pillow", "dali"] = "pillow"
    decode_threads: int = 2
    max_pixels: int = 89_478_485  # Pillow's own bomb limit; larger images are rejected
    actors: int | Literal["auto"] = 1  # "auto": as many as the cluster's resources hold, growing with it
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    max_shard_retries: int = 3
    seed: int = 0
    parquet_image_bytes: bool = False
    # The captioner's and the filter's weights and activations: bfloat16 halves memory and is what a GPU's
    # tensor cores run fast; captions and scores then differ from float32's (resume stays byte-identical).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Shards one Ray actor works on at once, each with its own decoder; the models take one batch at a
    # time. With 2, one shard's first batches and its write overlap the other's model work: on a GPU the
    # models sat idle for a fifth of an actor's time at shard boundaries (docs/BENCHMARKS.md).
    shards_in_flight: int = 1
    # Leave the round's Ray actors running in the cluster (--address) with their models loaded, for the
    # next run with the same config and models: no imports or model loading at its start. They hold their
    # CPUs and GPUs until `capfilt actors --stop` (capfilt/run/ray_pool.py, 'Warm actors').
    keep_actors: bool = False
    # Where a sample's web caption is: the first of these that the sample has, a member's extension (txt,
    # caption...) or json.KEY, a string in its json member. A corpus that keeps its alt-text elsewhere
    # names it here; without one, its images are captioned from nothing but the captioner.
    caption_from: tuple[str, ...] = CAPTION_FROM

    def __post_init__(self):
        _at_least(
            self, "run", ("image_size", "batch_size", "decode_threads", "max_pixels", "shards_in_flight")
        )
        _check(
            bool(self.caption_from) and all(map(_caption_source, self.caption_from)),
            "run.caption_from",
            "a list of member extensions (not an image's or json) and json.KEY entries",
            list(self.caption_from),
        )
        _check(self.actors == "auto" or self.actors >= 1, "run.actors", '>= 1 or "auto"', self.actors)
        _check(self.num_cpus_per_actor > 0, "run.num_cpus_per_actor", "> 0", self.num_cpus_per_actor)
        _check(self.num_gpus_per_actor >= 0, "run.num_gpus_per_actor", ">= 0", self.num_gpus_per_actor)
        _at_least(self, "run", ("max_shard_retries",), low=0)


@dataclass
class SynthConfig:
    """The demo world: rendered scenes with templated captions and controlled alt-text noise."""

    image_size: int = 64
    n_web: int = 10000
    n_human: int = 1000
    n_test: int = 500
    noise: float = 0.4
    shard_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        _at_least(self, "synth", ("image_size", "shard_size"))
        _at_least(self, "synth", ("n_web", "n_human", "n_test"), low=0)  # 0: a world without that split
        _check(0.0 <= self.noise <= 1.0, "synth.noise", "in [0, 1]", self.noise)


@dataclass
class Config:
    """Everything one capfilt command needs."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    run: RunConfig = field(default_factory=RunConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self):
        for section in ("pretrain", "finetune"):  # against the model they train: a section alone cannot
            _check_stage(section, getattr(self, section), self.model)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow the lossless int→float widening only."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is tuple and typing.get_args(tp)[1:] == (...,):  # tuple[X, ...]: any length
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of one in ``configs/`` (``tiny``, ``demo``, ``blip-base``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config {str(name_or_path)!r}: not a file, and not one of {known}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; ``base: NAME`` starts from another config and overrides only what it names."""
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops through {[str(p) for p in seen]}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml(resolve_config_path(base), (*seen, path))
    parent.pop("name", None)
    return _merge(parent, data)


def load_config(name_or_path: str | Path = "demo", overrides: list[str] | None = None) -> Config:
    """Load a config by name or path, then apply ``section.key=value`` overrides."""
    path = resolve_config_path(name_or_path)
    data = _read_yaml(path)
    data["name"] = data.get("name", path.stem)
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return from_dict(Config, data, str(path.name))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``Config.to_dict`` (run manifests, checkpoints)."""
    return from_dict(Config, data)
