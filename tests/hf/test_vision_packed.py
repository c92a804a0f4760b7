"""Packed vision towers (Qwen2-VL, Qwen2.5-VL): capture splits every forward's packed patch sequence
into one sample per image, and the block called on those samples computes exactly what the model's
own packed call computed, real patches only, padding in a segment of its own."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, VISION_END, VISION_START, vlm_config
from transformers import AutoModelForImageTextToText
from vlm_helpers import qwen2_vl_image_batch

from signround.adapters.hf.capture import capture_inputs
from signround.adapters.hf.pure import as_pure
from signround.adapters.hf.vision import PackedLayout


def _model(family: str):
    torch.manual_seed(0)
    cfg = vlm_config(family)
    cfg.vision_config.window_size = 56  # windows of 4x4 patches: an 8x8 image has 4 of them
    return AutoModelForImageTextToText.from_config(cfg).eval()


def _big_image_batch() -> dict[str, torch.Tensor]:
    """One sample with one image of 8x8 patches (16 merged tokens)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 240, (1, 40), generator=gen)
    ids[0, 1], ids[0, 2:18], ids[0, 18] = VISION_START, IMAGE_TOKEN, VISION_END
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(64, 1176, generator=gen),
            "image_grid_thw": torch.tensor([[1, 8, 8]]), "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_units_reproduce_the_packed_block_outputs(family):
    model = _model(family)
    batches = [qwen2_vl_image_batch((1, 6), seqlen=40), _big_image_batch()]  # 2 + 1 images, 16/16/64 patches
    cap = capture_inputs(model, batches, "model.visual.blocks")
    assert cap.hidden.shape == (3, 64, 32)
    assert cap.loss_mask is not None and cap.loss_mask.sum(1).tolist() == [16, 16, 64]
    assert all(isinstance(c.layout, PackedLayout) for c in cap.calls)
    starts = [int(c.per_sample[c.layout.starts][2].sum()) for c in cap.calls]
    assert starts == ([1, 1] if family == "qwen2_vl" else [4, 1])  # 2.5-VL: block 0 windowed, block 1 full

    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(o.detach()))
             for i, b in enumerate(model.model.visual.blocks)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    x = cap.hidden
    for i, block in enumerate(model.model.visual.blocks):
        fn, weights = as_pure(block, cap.calls[i].layout)
        with torch.no_grad():
            y = fn(weights, cap.block_inputs(i, x))
        assert y.shape == x.shape
        torch.testing.assert_close(y[cap.loss_mask.bool()], torch.cat(seen[i]), rtol=0, atol=1e-6)
        # any mini-batch of units gives each unit's rows unchanged (padding never reaches a real patch)
        one = fn(weights, cap.block_inputs(i, x).select(torch.tensor([2, 0])))
        torch.testing.assert_close(one[0][:64], y[2], rtol=0, atol=1e-6)
        torch.testing.assert_close(one[1][:16], y[0][:16], rtol=0, atol=1e-6)
        x = y
