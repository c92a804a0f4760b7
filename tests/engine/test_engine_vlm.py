"""quantize_model on tiny VLMs: the text decoder by default, vision blocks on request."""

from __future__ import annotations

import torch
from tiny_models import IMAGE_TOKEN, random_batches, tiny_vlm
from vlm_helpers import qwen2_vl_image_batch

from signround.adapters import quantize_model
from signround.rounding import QuantSpec, preset

SPEC = QuantSpec(bits=4, group_size=32)
RECIPE = preset("default", iters=8, nsamples=8, batch_size=8)  # full batch: best-of includes RTN


def test_qwen2_vl_text_decoder_with_image_calibration() -> None:
    model = tiny_vlm("qwen2_vl")
    vision_before = model.model.visual.blocks[0].mlp.fc1.weight.clone()
    batches = [qwen2_vl_image_batch((1, 6)), qwen2_vl_image_batch((3, 9)), *random_batches(2, 2, 20)]
    model, report = quantize_model(model, batches, SPEC, RECIPE)
    assert report.block_name_to_quantize == ("model.language_model.layers",)
    assert len(report.layers) == 14 and all(n.startswith("model.language_model.layers.") for n in report.layers)
    assert all(b.loss_tuned <= b.loss_rtn for b in report.blocks)
    assert torch.equal(model.model.visual.blocks[0].mlp.fc1.weight, vision_before)


def test_llava_vision_blocks_when_asked() -> None:
    model = tiny_vlm("llava")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 240, (4, 12), generator=gen)
        ids[:, 1:5] = IMAGE_TOKEN  # (28/14)^2 = 4 image tokens
        batches.append({"input_ids": ids, "pixel_values": torch.randn(4, 3, 28, 28, generator=gen)})
    model, report = quantize_model(model, batches, SPEC, RECIPE, quant_nontext_module=True)
    assert report.block_name_to_quantize == ("model.vision_tower.encoder.layers", "model.language_model.layers")
    assert any(n.startswith("model.vision_tower.encoder.layers.0.") for n in report.layers)
    assert len(report.blocks) == 4 and all(b.loss_tuned is not None for b in report.blocks)


def test_mllama_text_only_skips_cross_attention_blocks() -> None:
    model = tiny_vlm("mllama")
    model, report = quantize_model(model, random_batches(2, 4, 16), SPEC, RECIPE)
    cross = [n for n in report.skipped if n.startswith("model.language_model.layers.1.")]
    assert cross and all("not called" in report.skipped[n] for n in cross)
    assert [b.source for b in report.blocks] == ["tuned", "not_called"]
    assert any(n.startswith("model.language_model.layers.0.") for n in report.layers)
