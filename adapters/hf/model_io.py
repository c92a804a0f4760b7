"""Loading a Hugging Face model, its tokenizer and processor from a local directory (never the Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs
import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}


@attrs.frozen
class LoadedModel:
    """A model with what processes its inputs; `processor` is None for text-only models."""

    model: Any
    tokenizer: Any
    processor: Optional[Any]
    is_multimodal: bool
    path: Path


def parse_dtype(name: str) -> Optional[torch.dtype]:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def is_multimodal_config(config: Any) -> bool:
    """A config with a vision (or audio) sub-config belongs to a multimodal model."""
    return any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))


def load_model(path: str | Path, *, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False,
               stream: bool = False) -> LoadedModel:
    """Load model + tokenizer (+ processor for VLMs) from a local Hugging Face directory.

    Only local files are read (`local_files_only=True`): a path that is not a model directory is an
    error that says so, never a silent download attempt. stream=True: the model is a skeleton
    without weights (`hf.streaming.skeleton`), read from the directory's safetensors when quantized
    with `stream_from_disk=True`.
    """
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model path {str(p)!r} is not a directory; pass a local Hugging Face model "
                                "directory (with config.json and weights) — downloads are not attempted")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{str(p)!r} has no config.json, so it is not a Hugging Face model directory")
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(p, **kw)
    except ValueError as err:
        raise ValueError(f"cannot read the model config in {str(p)!r}: {err}") from err
    multimodal = is_multimodal_config(config)
    load_kw = dict(kw, dtype=dtype if dtype is not None else "auto")
    if stream:
        from signround.adapters.hf.streaming import skeleton

        model = skeleton(p, dtype=dtype, trust_remote_code=trust_remote_code)
    elif multimodal:
        model = AutoModelForImageTextToText.from_pretrained(p, **load_kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(p, **load_kw)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(p, **kw)
    processor = None
    if multimodal:
        try:
            processor = AutoProcessor.from_pretrained(p, **kw)
        except (OSError, ValueError, TypeError):
            processor = None  # text-only calibration still works; image data will ask for a processor
    return LoadedModel(model=model, tokenizer=tokenizer, processor=processor, is_multimodal=multimodal, path=p)
