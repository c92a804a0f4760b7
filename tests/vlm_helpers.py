"""Tiny vision-language models with their processors, and hand-made image batches, shared by several test rooms."""

from __future__ import annotations

from typing import Any

import torch
from _templating_helpers import byte_tokenizer
from tiny_models import IMAGE_TOKEN, VISION_END, VISION_START, tiny_vlm

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def qwen2_vl_image_batch(offsets: tuple[int, ...], seqlen: int = 20) -> dict[str, torch.Tensor]:
    """One image (grid 1x4x4 patches → 4 merged tokens) per sample, at different offsets."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 240, (len(offsets), seqlen), generator=gen)
    for row, off in enumerate(offsets):
        ids[row, off] = VISION_START
        ids[row, off + 1: off + 5] = IMAGE_TOKEN
        ids[row, off + 5] = VISION_END
    pixels = torch.randn(16 * len(offsets), 3 * 2 * 14 * 14, generator=gen)
    grid = torch.tensor([[1, 4, 4]] * len(offsets))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


def _qwen_vl_with_processor(model_type: str, processor_cls: Any) -> tuple[Any, Any, Any]:
    """A tiny Qwen2-VL-family model with a byte tokenizer carrying its vision tokens, and its processor."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = byte_tokenizer(specials)
    model = tiny_vlm(model_type, vocab_size=len(tok))
    cfg = model.config
    cfg.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    cfg.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    cfg.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    cfg.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
    proc = processor_cls(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                         tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                         chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return model, tok, proc


def qwen2_vl_with_processor():
    from transformers import Qwen2VLProcessor

    return _qwen_vl_with_processor("qwen2_vl", Qwen2VLProcessor)


def _llama_text(vocab: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab, max_position_embeddings=1024, **TINY, **extra)


def llava_parts() -> tuple[Any, Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = byte_tokenizer(["<image>"], bos="<s>", add_bos=True)
    ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", **_llama_text(len(tok))),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
    )
    return tok, proc, LlavaForConditionalGeneration(cfg).eval()


def idefics3_parts() -> tuple[Any, Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    tok = byte_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>"])
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(ip, tok, image_seq_len=4)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **_llama_text(len(tok))),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return tok, proc, Idefics3ForConditionalGeneration(cfg).eval()


def gemma3_parts() -> tuple[Any, Any, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
    tok = byte_tokenizer(specials, bos="<bos>", add_bos=True, extra={"extra_special_tokens": {
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}})
    ip = Gemma3ImageProcessor(size={"height": 28, "width": 28})
    proc = Gemma3Processor(ip, tok, image_seq_length=4)
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=1024, head_dim=16, sliding_window=64, **TINY),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    return tok, proc, Gemma3ForConditionalGeneration(cfg).eval()


def mllama_parts() -> tuple[Any, Any, Any]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    specials = ["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
    tok = byte_tokenizer(specials, bos="<|begin_of_text|>", add_bos=True)
    ip = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2)
    proc = MllamaProcessor(ip, tok)
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                           image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
                           vision_output_dim=64, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, cross_attention_layers=[1], max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    return tok, proc, MllamaForConditionalGeneration(cfg).eval()


def qwen2_5_vl_with_processor(window_size: int = 56):
    """A tiny Qwen2.5-VL (one window-attention block, one full-attention block; windows of 4x4
    patches) with its processor: images of 8x8 patches or more get several windows."""
    from transformers import Qwen2_5_VLProcessor

    model, tok, proc = _qwen_vl_with_processor("qwen2_5_vl", Qwen2_5_VLProcessor)
    model.config.vision_config.window_size = model.model.visual.window_size = window_size
    return model, tok, proc
