"""The vision tower of a VLM as llama.cpp's ``mmproj-*.gguf`` (its `clip` architecture, read by mtmd).

Written with the `gguf` package's `GGUFWriter`; names from `gguf.get_tensor_name_map(MMPROJ)` after
each family's state-dict names are put back to the checkpoint names that map knows (transformers 5
keeps ``model.vision_tower.…`` where the checkpoints say ``vision_tower.vision_model.…``); the keys
llama.cpp's converters write for the family (facts from `convert_hf_to_gguf.py` and the legacy
`tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`, checked against `tools/mtmd/clip.cpp`):

| model_type | projector | tensors changed on the way | keys beyond the common ones |
|---|---|---|---|
| idefics3 (SmolVLM) | ``idefics3`` | – | scale factor, gelu, longest edge |
| llava (CLIP tower) | ``mlp`` (legacy) | layers past the feature layer and post_layernorm dropped; linear_1/2 → mm.0/mm.2 | feature_layer, gelu or quick-gelu |
| gemma3 (SigLIP) | ``gemma3`` | SigLIP's pooling head dropped; mm_soft_emb_norm + 1 (Gemma3RMSNorm) | gelu, scale factor when not 4 |
| qwen2_vl | ``qwen2vl_merger`` | qkv split into q/k/v; the Conv3D patch embedding into two Conv2D (``v.patch_embd.weight``, ``.weight.1``) | – |
| qwen2_5_vl | ``qwen2.5vl_merger`` | as qwen2_vl | silu, n_wa_pattern |

Weights are F16 and norms/biases F32; the patch/position embeddings F32 where the converter forces it
(idefics3, gemma3; also llava here), the Qwen patch embeddings F16 (as its converter writes them).
A vision layer that SignRound quantized (``quant_nontext_module``) is written as its dequantized
grid in F16 (fp16 rounding of the grid values; the tower's k-quant or q4 forms are not written).
What llama.cpp cannot run as the model does is refused (`mmproj_problems`), not written differently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from torch import nn

Renamed = Iterator[tuple[str, np.ndarray]]  # (a name gguf's MMPROJ map knows, or a gguf name), array


@attrs.frozen
class VisionFamily:
    """Where a VLM family keeps its parts, what llama.cpp calls its projector, and what its mmproj needs.

    text_prefix: the text decoder's state-dict prefix (renamed to ``model.`` for the text GGUF).
    vision_prefixes: the tower's and connector's prefixes (the mmproj file). renames: state-dict
    prefix → the checkpoint's (what gguf's MMPROJ map knows). processor: the transformers image
    processor whose defaults stand in when none is given. keys(writer, config, image processor):
    the family's hyper-parameter keys. tensors(name, array, config): the tensors one state-dict
    entry becomes (split, shifted, dropped). f32: gguf names kept F32 although 2-D or more.
    problems(config): why llama.cpp would not compute what the model computes ([] when it would).
    note: what the export warns (a known llama.cpp difference the file cannot fix).
    """

    projector: str
    text_prefix: str
    vision_prefixes: tuple[str, ...]
    renames: tuple[tuple[str, str], ...]
    processor: str
    keys: Callable[[Any, Any, Any], None]
    tensors: Callable[[str, np.ndarray, Any], Renamed]
    f32: Callable[[str], bool]
    problems: Callable[[Any], list[str]]
    note: str = ""


def _same(name: str, t: np.ndarray, cfg: Any) -> Renamed:
    yield name, t


def _none(cfg: Any) -> list[str]:
    return []


def _tower(writer: Any, vcfg: Any, *, blocks: int | None = None, width: str = "hidden_size",
           ffn: str = "intermediate_size", heads: str = "num_attention_heads", image_size: int | None = None) -> None:
    writer.add_vision_image_size(int(image_size or vcfg.image_size))
    writer.add_vision_embedding_length(int(getattr(vcfg, width)))
    writer.add_vision_feed_forward_length(int(getattr(vcfg, ffn)))
    writer.add_vision_block_count(int(blocks if blocks is not None else vcfg.num_hidden_layers))
    writer.add_vision_head_count(int(getattr(vcfg, heads)))


# --- idefics3 / SmolVLM (convert_hf_to_gguf.py SmolVLMModel) -------------------------------------------------

def _idefics3_keys(writer: Any, cfg: Any, ip: Any) -> None:
    vcfg = cfg.vision_config
    _tower(writer, vcfg)
    writer.add_vision_attention_layernorm_eps(float(vcfg.layer_norm_eps))
    writer.add_vision_projector_scale_factor(int(cfg.scale_factor))
    writer.add_vision_use_gelu(True)  # SigLIP's gelu_pytorch_tanh, as llama.cpp's converter says
    writer.add_vision_preproc_image_size(int((getattr(ip, "size", None) or {}).get("longest_edge", vcfg.image_size)))


# --- LLaVA with a CLIP tower (legacy convert_image_encoder_to_gguf.py; clip.cpp's llava graph) ---------------

def _feature_layers(cfg: Any) -> list[int]:
    """HF's vision_feature_layer (hidden_states index: 0 = the embeddings, i = after layer i) made
    non-negative, as the legacy converter writes ``clip.vision.feature_layer``."""
    layers = cfg.vision_feature_layer
    n = cfg.vision_config.num_hidden_layers
    return [v if v >= 0 else n + 1 + v for v in ([layers] if isinstance(layers, int) else list(layers))]


def _llava_problems(cfg: Any) -> list[str]:
    out = []
    vcfg = cfg.vision_config
    if vcfg.model_type != "clip_vision_model":
        out.append(f"LLaVA with a {vcfg.model_type} tower: llama.cpp's `mlp` projector runs a CLIP tower only")
    if cfg.vision_feature_select_strategy != "default":
        out.append(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: llama.cpp's llava "
                   "graph always drops the CLS token ('default')")
    if vcfg.hidden_act not in ("gelu", "quick_gelu"):
        out.append(f"vision hidden_act {vcfg.hidden_act!r}: llama.cpp's clip has gelu and quick-gelu")
    if cfg.projector_hidden_act != "gelu" or not getattr(cfg, "multimodal_projector_bias", True):
        out.append("llama.cpp's `mlp` projector is Linear + bias, gelu, Linear + bias; this model's is "
                   f"{cfg.projector_hidden_act} (bias {getattr(cfg, 'multimodal_projector_bias', True)})")
    layers = _feature_layers(cfg)
    if any(not 0 < v <= vcfg.num_hidden_layers for v in layers):
        out.append(f"vision_feature_layer {cfg.vision_feature_layer}: llama.cpp's clip takes layer outputs "
                   f"1..{vcfg.num_hidden_layers} (0 marks an unset entry there)")
    elif layers != sorted(set(layers)):
        out.append(f"vision_feature_layer {cfg.vision_feature_layer}: llama.cpp concatenates the feature layers "
                   "in depth order, transformers in the listed one")
    return out


def _llava_keys(writer: Any, cfg: Any, ip: Any) -> None:
    vcfg = cfg.vision_config
    layers = _feature_layers(cfg)
    _tower(writer, vcfg, blocks=max(layers))  # layers past the deepest feature layer are not written
    writer.add_vision_attention_layernorm_eps(float(vcfg.layer_norm_eps))
    writer.add_array("clip.vision.feature_layer", layers)  # the legacy converter's key (clip.cpp KEY_FEATURE_LAYERS)
    if vcfg.hidden_act == "gelu":
        writer.add_vision_use_gelu(True)  # else clip.cpp's default, quick-gelu (OpenAI CLIP's)


def _llava_tensors(name: str, t: np.ndarray, cfg: Any) -> Renamed:
    deepest = max(_feature_layers(cfg))
    if name.startswith("vision_tower.vision_model.post_layernorm."):
        return  # HF's LLaVA reads hidden_states, before the post-layernorm (the legacy converter drops it)
    if name.startswith("vision_tower.vision_model.encoder.layers."):
        if int(name.split(".")[4]) >= deepest:
            return
    for hf, ours in (("multi_modal_projector.linear_1.", "mm.0."), ("multi_modal_projector.linear_2.", "mm.2.")):
        if name.startswith(hf):  # clip.cpp's TN_LLAVA_PROJ "mm.%d.%s" (0 and 2: LLaVA's Sequential indices)
            yield ours + name[len(hf):], t
            return
    yield name, t


# --- Gemma 3 (convert_hf_to_gguf.py Gemma3VisionModel) -------------------------------------------------------

def _gemma3_side(cfg: Any) -> tuple[int, int]:
    patches = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return patches, int(round(cfg.mm_tokens_per_image ** 0.5))


def _gemma3_problems(cfg: Any) -> list[str]:
    patches, side = _gemma3_side(cfg)
    out = []
    if side * side != cfg.mm_tokens_per_image or patches % side:
        out.append(f"mm_tokens_per_image {cfg.mm_tokens_per_image} is no square that divides the {patches} × "
                   f"{patches} patches: llama.cpp pools by one integer factor")
    if cfg.vision_config.hidden_act != "gelu_pytorch_tanh":
        out.append(f"vision hidden_act {cfg.vision_config.hidden_act!r}: llama.cpp's gemma3 tower uses tanh-gelu")
    return out


def _gemma3_keys(writer: Any, cfg: Any, ip: Any) -> None:
    vcfg = cfg.vision_config
    _tower(writer, vcfg)
    writer.add_vision_attention_layernorm_eps(float(vcfg.layer_norm_eps))
    writer.add_vision_use_gelu(True)
    patches, side = _gemma3_side(cfg)
    if patches // side != 4:  # clip.cpp's default pooling factor; the converter writes others only
        writer.add_vision_projector_scale_factor(patches // side)


def _gemma3_tensors(name: str, t: np.ndarray, cfg: Any) -> Renamed:
    if name.startswith("vision_tower.vision_model.head."):
        return  # SigLIP's pooling head: Gemma 3 does not run it
    if name == "multi_modal_projector.mm_input_projection_weight":
        yield "multi_modal_projector.mm_input_projection.weight", t  # [vision, text] as stored: clip.cpp transposes
        return
    if name == "multi_modal_projector.mm_soft_emb_norm.weight":
        t = t + 1  # Gemma3RMSNorm scales by 1 + w; clip.cpp by w
    yield name, t


# --- Qwen2-VL / Qwen2.5-VL (convert_hf_to_gguf.py Qwen2VLVisionModel) ----------------------------------------

def _qwen_problems(cfg: Any) -> list[str]:
    vcfg = cfg.vision_config
    out = []
    if vcfg.spatial_merge_size != 2 or vcfg.temporal_patch_size != 2:
        out.append(f"spatial_merge_size {vcfg.spatial_merge_size}, temporal_patch_size {vcfg.temporal_patch_size}: "
                   "llama.cpp's qwen2vl graph merges 2 × 2 patches and its converter splits 2 frames")
    if cfg.model_type == "qwen2_5_vl":
        full = list(vcfg.fullatt_block_indexes)
        n = full[0] + 1 if full else 0
        if not full or full != [i for i in range(vcfg.depth) if (i + 1) % n == 0]:
            out.append(f"fullatt_block_indexes {full}: llama.cpp runs full attention at every n-th block "
                       "(n_wa_pattern) to the last")
        if vcfg.window_size != 112:
            out.append(f"window_size {vcfg.window_size}: llama.cpp's qwen2.5vl windows are 112 pixels")
        if vcfg.hidden_act != "silu":
            out.append(f"vision hidden_act {vcfg.hidden_act!r}: llama.cpp's qwen2.5vl tower uses silu")
    elif vcfg.hidden_act != "quick_gelu":
        out.append(f"vision hidden_act {vcfg.hidden_act!r}: llama.cpp's qwen2vl tower uses quick-gelu")
    return out


def _qwen_keys(writer: Any, cfg: Any, ip: Any) -> None:
    vcfg = cfg.vision_config
    image_size = getattr(vcfg, "image_size", None) or 560  # the converter's default (not in Qwen's config)
    if cfg.model_type == "qwen2_vl":  # the converter writes hidden_size (the merger's output) as n_ff here
        _tower(writer, vcfg, blocks=vcfg.depth, width="embed_dim", ffn="hidden_size", heads="num_heads",
               image_size=image_size)
    else:
        _tower(writer, vcfg, blocks=vcfg.depth, heads="num_heads", image_size=image_size)
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(vcfg.fullatt_block_indexes[0] + 1)
    writer.add_vision_attention_layernorm_eps(1e-6)  # transformers' Qwen2-VL / 2.5-VL vision norms: eps=1e-6


def _qwen_tensors(name: str, t: np.ndarray, cfg: Any) -> Renamed:
    if ".attn.qkv." in name:
        for i, part in enumerate(("q", "k", "v")):
            yield name.replace(".qkv.", f".{part}."), np.split(t, 3, axis=0)[i]
    elif name == "visual.patch_embed.proj.weight":  # Conv3D over 2 frames -> two Conv2D, summed by clip.cpp
        yield "v.patch_embd.weight", t[:, :, 0]
        yield "v.patch_embd.weight.1", t[:, :, 1]
    else:
        yield name, t


def _embeddings_f32(name: str) -> bool:
    return name.startswith(("v.patch_embd.", "v.position_embd.", "v.class_embd"))


_TOWER = ("model.vision_tower.", "vision_tower.vision_model.")
_LLAVA_NOTE = ("llama.cpp's llava graph (llama-cpp-python 0.3.36; ggml-org/llama.cpp#25814, fix in #25844) puts the "
               "CLS embedding after the patches, so its image embeddings differ from transformers' for this file "
               "(spec/format.md, mmproj)")
_QWEN = dict(text_prefix="model.language_model.", vision_prefixes=("model.visual.",),
             renames=(("model.visual.", "visual."),), processor="Qwen2VLImageProcessor", keys=_qwen_keys,
             tensors=_qwen_tensors, f32=lambda name: name.startswith("v.position_embd."), problems=_qwen_problems)
#: model_type -> layout; llama.cpp's mtmd reads these projectors (gguf.VisionProjectorType; "mlp" is legacy)
VISION_FAMILIES: Mapping[str, VisionFamily] = {
    "idefics3": VisionFamily("idefics3", "model.text_model.", ("model.vision_model.", "model.connector."), (),
                             "Idefics3ImageProcessor", _idefics3_keys, _same, _embeddings_f32, _none),
    "llava": VisionFamily("mlp", "model.language_model.", ("model.vision_tower.", "model.multi_modal_projector."),
                          (_TOWER, ("model.multi_modal_projector.", "multi_modal_projector.")),
                          "CLIPImageProcessor", _llava_keys, _llava_tensors, _embeddings_f32, _llava_problems,
                          _LLAVA_NOTE),
    "gemma3": VisionFamily("gemma3", "model.language_model.", ("model.vision_tower.", "model.multi_modal_projector."),
                           (_TOWER, ("model.multi_modal_projector.", "multi_modal_projector.")),
                           "Gemma3ImageProcessor", _gemma3_keys, _gemma3_tensors, _embeddings_f32, _gemma3_problems),
    "qwen2_vl": VisionFamily("qwen2vl_merger", **_QWEN),
    "qwen2_5_vl": VisionFamily("qwen2.5vl_merger", **_QWEN),
}


def mmproj_problems(model: nn.Module, family: VisionFamily) -> list[str]:
    """Why llama.cpp's mtmd would not compute this model's image embeddings from its mmproj ([]: it would)."""
    vcfg = model.config.vision_config
    width = getattr(vcfg, "embed_dim", None) or vcfg.hidden_size
    mlp = int(width * vcfg.mlp_ratio) if model.config.model_type == "qwen2_vl" else vcfg.intermediate_size
    same = [f"the vision MLP is as wide as the tower ({width}): llama.cpp's clip then takes ffn_up for ffn_down "
            "(its fix for old files) and computes something else"] if mlp == width else []
    return same + family.problems(model.config)


def _image_processor(image_processor: Any, family: VisionFamily, name: str) -> Any:
    if image_processor is not None:
        return image_processor
    import transformers

    default = getattr(transformers, family.processor)()
    warnings.warn(f"{name}: no processor given, so the image mean/std are {family.processor}'s defaults "
                  f"({default.image_mean}, {default.image_std}); pass processor= so llama.cpp normalizes "
                  "images as the model was trained", stacklevel=5)
    return default


def write_mmproj(model: nn.Module, path: Path, family: VisionFamily, image_processor: Any = None) -> Path:
    """Write `model`'s vision tower and connector to `path` (``mmproj-*.gguf``); ValueError (nothing
    written) when llama.cpp would compute something else (`mmproj_problems`)."""
    import gguf

    cfg = model.config
    problems = mmproj_problems(model, family)
    if problems:
        raise ValueError(f"{path.name}: llama.cpp's {family.projector!r} projector cannot run this "
                         f"{cfg.model_type} as transformers does: " + "; ".join(problems))
    vcfg = cfg.vision_config
    if family.note:
        warnings.warn(f"{path.name}: {family.note}", stacklevel=5)
    ip = _image_processor(image_processor, family, path.name)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(family.projector)
    writer.add_vision_projection_dim(cfg.get_text_config().hidden_size)
    writer.add_vision_patch_size(vcfg.patch_size)
    writer.add_vision_image_mean(list(ip.image_mean))
    writer.add_vision_image_std(list(ip.image_std))
    family.keys(writer, cfg, ip)
    blocks = getattr(vcfg, "num_hidden_layers", None) or vcfg.depth
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(blocks, 3))  # projector indices (mm.2) too
    for key, tensor in model.state_dict().items():
        if not key.startswith(family.vision_prefixes):
            continue
        name = next((ckpt + key[len(ours):] for ours, ckpt in family.renames if key.startswith(ours)), key)
        for src, t in family.tensors(name, tensor.detach().float().numpy(), cfg):
            target = src if src.startswith(("v.", "mm.")) else names.get_name(src, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise NotImplementedError(f"{key}: no mmproj tensor name for it (gguf's MMPROJ map, as {src})")
            writer.add_tensor(target, t.astype(np.float16 if t.ndim >= 2 and not family.f32(target) else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
