"""Checkpoints: the MED folder (resume, warm start) and the HF exports the CapFilt round loads.

All safetensors, never pickle (DESIGN.md, 'Checkpoints'):

- ``save_med``/``load_med``: ``config.json`` (our ModelConfig, vocab size, special ids, meta),
  ``model.safetensors`` (every shared tensor once, re-tied on load by building the MED), tokenizer files.
  Holds the momentum copies and queues too, so training resumes exactly.
- ``export_captioner`` → a ``BlipForConditionalGeneration`` folder; ``export_filter`` → a
  ``BlipForImageTextRetrieval`` folder with ``config.capfilt = {"itm_first_token", "itc_temp"}``.
- ``load_captioner``/``load_filter``: our exports and Salesforce's published BLIP checkpoints (which lack
  ``config.capfilt``: their ITM scores with ``[CLS]`` first, BLIP_REFERENCE.md) as transformers' classes,
  for beam search, the batched HF baseline and tests. A round's workers load the same folders with
  ``capfilt.model.blip``, which does not import transformers. Both take a model reference (a folder or an
  HF hub id, ``hub.resolve_model``) and log one line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from capfilt.config import ModelConfig, from_dict, to_dict
from capfilt.model.blip import captioner_info, filter_info
from capfilt.model.hub import resolve_model, weight_files
from capfilt.model.med import MED

# One log line per model load and progress only from the driver: no "Loading weights"/"Writing model
# shards" bars from transformers in every actor and training worker.
hf_logging.disable_progress_bar()

MED_FORMAT = "capfilt-med/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


# ---- MED checkpoints ------------------------------------------------------------------------------


def unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor once, under its first name (encoder before decoder)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def readable_weights(folder: Path, *files: Path) -> None:
    """Give the folder's ``*.safetensors`` (and ``files``) the mode its ``config.json`` got from the umask.
    safetensors (0.8.1 on) writes through a temp file created 0600 whatever the umask (safetensors#782), so
    a model handed to another team, or read by workers running as another user, was its writer's alone."""
    mode = (folder / CONFIG).stat().st_mode & 0o777
    for weights in [*folder.glob("*.safetensors"), *files]:
        weights.chmod(mode)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_med(
    med: MED, tokenizer: PreTrainedTokenizerBase, path: str | Path, meta: dict | None = None
) -> Path:
    """Write a MED checkpoint folder; each file is replaced atomically, config.json last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in unique_state(med).items()}
    tmp = path / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS)
    tokenizer.save_pretrained(str(path))
    config = {
        "format": MED_FORMAT,
        "model": to_dict(med.cfg),
        "vocab_size": med.vocab_size,
        "special_ids": med.special_ids,
        "meta": meta or {},
    }
    _atomic_write_bytes(path / CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    readable_weights(path)
    return path


def load_med(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MED, PreTrainedTokenizerBase, dict]:
    """Rebuild the MED (ties come from its structure), load every tensor, return (med, tokenizer, meta)."""
    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != MED_FORMAT:
        raise ValueError(f"{path} is not a capfilt MED checkpoint (format {config.get('format')!r})")
    cfg = from_dict(ModelConfig, config["model"], "model")
    med = MED(cfg, config["vocab_size"], config["special_ids"])
    expected = unique_state(med)
    state = load_file(str(path / WEIGHTS))
    # A checkpoint from before the caption-id queue (2026-11-28) has none: it starts empty, as a fresh
    # MED's does, and fills as training goes on.
    state.setdefault("text_idx_queue", expected["text_idx_queue"].clone())
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path / WEIGHTS} does not match the MED: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    with torch.no_grad():
        for name, t in expected.items():
            if t.shape != state[name].shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != {tuple(t.shape)}")
            t.copy_(state[name])
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return med.to(device), tokenizer, config.get("meta", {})


# ---- HF exports ------------------------------------------------------------------------------------


def blip_config(med: MED, capfilt: dict[str, Any] | None = None) -> BlipConfig:
    """A BlipConfig whose text/vision configs are the MED's (dims, dropout, label smoothing, special ids)."""
    config = BlipConfig(
        text_config=med.text_encoder.config.to_dict(),
        vision_config=med.vision.config.to_dict(),
        image_text_hidden_size=med.cfg.embed_dim,
        label_smoothing=med.cfg.label_smoothing,
    )
    if capfilt is not None:
        config.capfilt = capfilt
    return config


def export_captioner(med: MED, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """``BlipForConditionalGeneration`` folder: vision_model ← MED ViT, text_decoder ← MED decoder."""
    path = Path(path)
    model = BlipForConditionalGeneration(blip_config(med, {"role": "captioner"}))
    model.vision_model.load_state_dict(med.vision.state_dict())
    model.text_decoder.load_state_dict(med.text_decoder.state_dict())
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    readable_weights(path)
    return path


def export_filter(
    med: MED, tokenizer: PreTrainedTokenizerBase, path: str | Path, itm_first_token: str = "[ENC]"
) -> Path:
    """``BlipForImageTextRetrieval`` folder (vision_model, text_encoder, vision_proj, text_proj, itm_head).

    ``config.capfilt`` records the ITM first token (our MED is trained with [ENC]; transformers'
    forward feeds the ids as given) and the ITC temperature (the HF model has none).
    """
    path = Path(path)
    if itm_first_token not in tokenizer.get_vocab():
        raise ValueError(f"tokenizer has no {itm_first_token} token")
    capfilt = {"role": "filter", "itm_first_token": itm_first_token, "itc_temp": float(med.temp.detach())}
    model = BlipForImageTextRetrieval(blip_config(med, capfilt))
    model.vision_model.load_state_dict(med.vision.state_dict())
    model.text_encoder.load_state_dict(med.text_encoder.state_dict())
    model.vision_proj.load_state_dict(med.vision_proj.state_dict())
    model.text_proj.load_state_dict(med.text_proj.state_dict())
    model.itm_head.load_state_dict(med.itm_head.state_dict())
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    readable_weights(path)
    return path


# ---- transformers' classes for ours and Salesforce's (training checks, beam search, the HF baseline) -----


def _load(
    cls: type, ref: str | Path, device: str | torch.device, dtype: torch.dtype
) -> tuple[Any, PreTrainedTokenizerBase, Path]:
    """Resolve ``ref``, load the model in eval mode in ``dtype`` and its tokenizer, and log one line."""
    path = resolve_model(ref).path
    weight_files(path)
    model = cls.from_pretrained(str(path), use_safetensors=True).to(device, dtype).eval()
    print(f"[model] loaded {cls.__name__} from {ref} on {device}", file=sys.stderr, flush=True)
    return model, AutoTokenizer.from_pretrained(str(path)), path


def load_captioner(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BlipForConditionalGeneration, PreTrainedTokenizerBase, dict]:
    """A captioner folder (ours or Salesforce's) as transformers' class → (model in eval mode, tokenizer,
    ``blip.captioner_info``). The round loads the same folder with ``capfilt.model.blip``."""
    model, tokenizer, path = _load(BlipForConditionalGeneration, path, device, dtype)
    return model, tokenizer, captioner_info(model.config.to_dict())


def load_filter(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BlipForImageTextRetrieval, PreTrainedTokenizerBase, dict]:
    """A filter folder (ours or Salesforce's) as transformers' class → (model in eval mode, tokenizer,
    ``blip.filter_info``)."""
    model, tokenizer, path = _load(BlipForImageTextRetrieval, path, device, dtype)
    return model, tokenizer, filter_info(model.config.to_dict(), tokenizer.get_vocab(), path)
