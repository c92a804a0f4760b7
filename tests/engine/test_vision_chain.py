"""The quantized-input chain carries across towers: with the vision blocks quantized first, the text
decoder is tuned on the quantized vision tower's outputs (X_q) against targets from the
full-precision model (B_fp(X_fp), X_fp from the fp vision tower)."""

from __future__ import annotations

import copy

import torch
from tiny_models import IMAGE_TOKEN, tiny_vlm

from signround.adapters import quantize_model
from signround.adapters.hf.capture import capture_inputs
from signround.adapters.hf.pure import as_pure
from signround.rounding import QuantSpec, masked_mse, preset

TEXT = "model.language_model.layers"


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 240, (4, 12), generator=gen)
    ids[:, 1:5] = IMAGE_TOKEN  # (28/14)^2 = 4 image tokens
    return [{"input_ids": ids, "pixel_values": torch.randn(4, 3, 28, 28, generator=gen)}]


def _block0(model: torch.nn.Module, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of the first text block, its outputs on them)."""
    cap = capture_inputs(model, batches, TEXT)
    fn, weights = as_pure(model.get_submodule(TEXT)[0], cap.calls[0].layout)
    with torch.no_grad():
        return cap.hidden, fn(weights, cap.block_inputs(0))


def test_text_decoder_inputs_come_from_the_quantized_vision_tower_targets_from_the_fp_model():
    model = tiny_vlm("llava")
    fp = copy.deepcopy(model)
    batches = _batches()
    recipe = preset("default", iters=0, nsamples=4, batch_size=4)  # RTN scored on the data: deterministic
    model, report = quantize_model(model, batches, QuantSpec(bits=2, group_size=32), recipe, quant_nontext_module=True)
    assert report.block_name_to_quantize[0] == "model.vision_tower.encoder.layers"
    x_fp, target = _block0(fp, batches)
    x_q, out_q = _block0(model, batches)
    assert not torch.allclose(x_q, x_fp)  # the quantized vision tower changed the text decoder's inputs
    text0 = next(b for b in report.blocks if b.name == f"{TEXT}.0")
    expected = float(masked_mse(out_q, target))
    assert abs(text0.loss_rtn - expected) <= 1e-6 * expected
    _, target_from_q = _block0(_with_fp_text(model, fp), batches)  # targets on the quantized chain's inputs
    assert abs(text0.loss_rtn - float(masked_mse(out_q, target_from_q))) > 1e-3 * expected


def _with_fp_text(quantized: torch.nn.Module, fp: torch.nn.Module) -> torch.nn.Module:
    """The quantized model with the fp first text block (inputs X_q, fp block)."""
    mixed = copy.deepcopy(quantized)
    mixed.get_submodule(TEXT)[0].load_state_dict(fp.get_submodule(TEXT)[0].state_dict())
    return mixed


def test_vision_blocks_tune_on_the_images_of_batches_that_have_them():
    from tiny_models import random_batches
    from vlm_helpers import qwen2_vl_image_batch

    model = tiny_vlm("qwen2_vl")
    batches = [qwen2_vl_image_batch((1, 6)), *random_batches(1, 2, 20), qwen2_vl_image_batch((3,))]  # text-only batch
    seen = []
    model, report = quantize_model(model, batches, QuantSpec(bits=4, group_size=32), preset("default", iters=2),
                                   quant_nontext_module=True, on_block=seen.append)
    assert report.block_name_to_quantize == ("model.visual.blocks", "model.language_model.layers")
    assert [b.source for b in report.blocks] == ["tuned"] * 4 and len(seen) == 4
    cap = capture_inputs(model, batches, "model.visual.blocks")
    assert cap.num_samples == 3  # the three images; the text-only batch adds none
