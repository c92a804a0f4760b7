"""The vision tower of a VLM as llama.cpp's ``mmproj-*.gguf`` (its `clip` architecture, read by mtmd).

Written with the `gguf` package's `GGUFWriter`, names from `gguf.get_tensor_name_map(MMPROJ)`, the
keys its converter writes for the family (`convert_hf_to_gguf.py`'s `SmolVLMModel` for Idefics3 /
SmolVLM: projector ``idefics3``, scale factor, gelu, eps, image size, mean/std). Weights are F16,
embeddings (patch and position) F32 as the converter forces, norms and biases F32. A vision layer
that SignRound quantized (``quant_nontext_module``) is written as its dequantized grid in F16
(fp16 rounding of the grid values; the tower's k-quant or q4 forms are not written).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from torch import nn


@attrs.frozen
class VisionFamily:
    """Where a VLM family keeps its parts, and what llama.cpp calls its projector.

    text_prefix: the text decoder's state-dict prefix (renamed to ``model.`` for the text GGUF).
    vision_prefixes: the tower's and connector's prefixes (the mmproj file)."""

    projector: str
    text_prefix: str
    vision_prefixes: tuple[str, ...]


#: model_type -> layout; llama.cpp's mtmd reads these projectors (gguf.VisionProjectorType)
VISION_FAMILIES: Mapping[str, VisionFamily] = {
    "idefics3": VisionFamily("idefics3", "model.text_model.", ("model.vision_model.", "model.connector.")),
}


def _processor_values(vcfg: Any, image_processor: Any, name: str) -> tuple[list[float], list[float], int]:
    if image_processor is None:
        from transformers import Idefics3ImageProcessor

        image_processor = Idefics3ImageProcessor()
        warnings.warn(f"{name}: no processor given, so the image mean/std and size are Idefics3ImageProcessor's "
                      f"defaults ({image_processor.image_mean}, {image_processor.image_std}); pass processor= so "
                      "llama.cpp normalizes images as the model was trained", stacklevel=5)
    size = (getattr(image_processor, "size", None) or {}).get("longest_edge", vcfg.image_size)
    return list(image_processor.image_mean), list(image_processor.image_std), int(size)


def write_mmproj(model: nn.Module, path: Path, family: VisionFamily, image_processor: Any = None) -> Path:
    """Write `model`'s vision tower and connector to `path` (``mmproj-*.gguf``)."""
    import gguf

    cfg = model.config
    vcfg = cfg.vision_config
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(family.projector)
    writer.add_vision_projection_dim(cfg.get_text_config().hidden_size)
    writer.add_vision_image_size(vcfg.image_size)
    writer.add_vision_patch_size(vcfg.patch_size)
    writer.add_vision_embedding_length(vcfg.hidden_size)
    writer.add_vision_feed_forward_length(vcfg.intermediate_size)
    writer.add_vision_block_count(vcfg.num_hidden_layers)
    writer.add_vision_head_count(vcfg.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(float(vcfg.layer_norm_eps))
    writer.add_vision_projector_scale_factor(int(cfg.scale_factor))
    writer.add_vision_use_gelu(True)  # SigLIP's gelu_pytorch_tanh, as llama.cpp's converter says
    mean, std, size = _processor_values(vcfg, image_processor, path.name)
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    writer.add_vision_preproc_image_size(size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vcfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if not key.startswith(family.vision_prefixes):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise NotImplementedError(f"{key}: no mmproj tensor name for it (gguf's MMPROJ map)")
        t = tensor.detach().float().numpy()
        embedding = ".embeddings." in key  # the converter keeps patch/position embeddings F32
        writer.add_tensor(target, t.astype(np.float16 if t.ndim >= 2 and not embedding else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
