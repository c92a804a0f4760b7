"""Tiny random Hugging Face models built from configs (no downloads), shared by the engine tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

VOCAB = 256
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}
QWEN2_VL_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253

TEXT_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "mistral", "phi3")
VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "gemma3", "mllama")


def text_config(model_type: str, **overrides: Any) -> Any:
    kw = dict(TEXT)
    if model_type in ("qwen3", "gemma3_text"):
        kw["head_dim"] = 16
    if model_type == "gemma3_text":  # one sliding and one full-attention layer: different masks per block
        kw.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    kw.update(overrides)
    if "layer_types" in kw and len(kw["layer_types"]) != kw["num_hidden_layers"]:
        kw["layer_types"] = (kw["layer_types"] * kw["num_hidden_layers"])[: kw["num_hidden_layers"]]
    return AutoConfig.for_model(model_type, **kw)


def tiny_text_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(text_config(model_type, **overrides)).eval()


def save_tiny_text_model(directory: Any, model_type: str = "llama") -> Any:
    """A tiny text model and its byte-level tokenizer saved as a model directory (for the CLI)."""
    from _templating_helpers import byte_tokenizer

    tok = byte_tokenizer([])
    tiny_text_model(model_type, vocab_size=len(tok)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def vlm_config(model_type: str, **text_overrides: Any) -> Any:
    text = {**TEXT, **text_overrides}
    kw: dict[str, Any]
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        vision = dict(QWEN2_VL_VISION)
        if model_type == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1])
        kw = dict(text_config=dict(text, rope_scaling=MROPE), vision_config=vision, image_token_id=IMAGE_TOKEN,
                  video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    elif model_type == "llava":
        kw = dict(text_config=dict(text, model_type="llama"),
                  vision_config=dict(VISION, model_type="clip_vision_model", image_size=28, patch_size=14),
                  image_token_index=IMAGE_TOKEN)
    elif model_type == "idefics3":
        kw = dict(text_config=dict(text, model_type="llama"), vision_config=dict(VISION, image_size=28, patch_size=14),
                  image_token_id=IMAGE_TOKEN, scale_factor=1)
    elif model_type == "gemma3":
        kw = dict(text_config=dict(text, head_dim=16), vision_config=dict(VISION, image_size=28, patch_size=14),
                  mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=251, eoi_token_index=252)
    elif model_type == "mllama":
        kw = dict(text_config=dict(text, cross_attention_layers=[1]),
                  vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                     num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                                     intermediate_layers_indices=[0], max_num_tiles=4),
                  image_token_index=IMAGE_TOKEN)
    else:
        raise ValueError(model_type)
    return AutoConfig.for_model(model_type, **kw)


def tiny_vlm(model_type: str, seed: int = 0, **text_overrides: Any) -> Any:
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(vlm_config(model_type, **text_overrides)).eval()


def random_batches(n_batches: int, batch_size: int, seqlen: int, seed: int = 1) -> list[torch.Tensor]:
    """Token-id batches avoiding the special/image ids."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 240, (batch_size, seqlen), generator=gen) for _ in range(n_batches)]
