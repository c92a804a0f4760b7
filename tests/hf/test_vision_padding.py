"""Padding cannot leak: image-text samples of different lengths padded into one batch of 4 give the
same block loss and gradients as the 4 samples captured one at a time without padding, averaged
(weighted by their real positions, as the block loss is a mean over real positions), for the text
decoder of each family and for Qwen2-VL's packed vision blocks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from vlm_helpers import gemma3_parts, idefics3_parts, llava_parts, qwen2_vl_with_processor

from signround.adapters.hf.capture import capture_inputs
from signround.adapters.hf.pure import as_pure
from signround.rounding import BlockInputs, masked_mse
from signround.templating import calibration_batches, conversation_calibration, embedded_dataset, load_template
from signround.templating.collate import pad_samples


def _qwen2_vl() -> tuple[Any, Any, Any]:
    model, tok, proc = qwen2_vl_with_processor()
    return tok, proc, model


CASES = [("qwen2_vl", _qwen2_vl, "model.language_model.layers"), ("qwen2_vl", _qwen2_vl, "model.visual.blocks"),
         ("llava", llava_parts, "model.language_model.layers"), ("idefics3", idefics3_parts, "model.text_model.layers"),
         ("gemma3", gemma3_parts, "model.language_model.layers")]


def _loss_and_grads(block: torch.nn.Module, call: Any, inputs: BlockInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked MSE of the block with perturbed Linear weights against its full-precision output."""
    fn, weights = as_pure(block, call.layout)
    gen = torch.Generator().manual_seed(0)
    moved = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).requires_grad_() for k, v in weights.items()
             if k.endswith(".weight") and v.dim() == 2}
    with torch.no_grad():
        target = fn(weights, inputs)
    loss = masked_mse(fn({**weights, **moved}, inputs), target, inputs.loss_mask)
    grads = torch.autograd.grad(loss, list(moved.values()))
    return loss.detach(), dict(zip(moved, grads))


def _real(inputs: BlockInputs) -> int:
    return int(inputs.hidden.shape[1]) if inputs.loss_mask is None else int(inputs.loss_mask.sum())


@pytest.mark.parametrize(("family", "build", "prefix"), CASES, ids=[f"{f}-{p.split('.')[1]}" for f, _, p in CASES])
def test_a_padded_batch_equals_its_samples_one_at_a_time(family, build, prefix):
    torch.manual_seed(0)
    tok, proc, model = build()
    calib = conversation_calibration(embedded_dataset(), load_template(None, family), tokenizer=tok, processor=proc,
                                     seqlen=512, nsamples=4, seed=3)
    samples = list(calib.samples)
    lengths = [s["input_ids"].shape[-1] for s in samples]
    assert len(set(lengths)) > 1 and sum("pixel_values" in s for s in samples) >= 2  # padding and images
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    (batch,) = calibration_batches(pad_samples(samples, pad), 4, pad_token_id=pad, flat_keys=calib.flat_keys)
    block = model.get_submodule(prefix)[0]
    cap = capture_inputs(model, [batch], prefix)
    assert cap.loss_mask is not None  # something is padded
    loss, grads = _loss_and_grads(block, cap.calls[0], cap.block_inputs(0))

    alone = [capture_inputs(model, [calibration_batches([s], 1, pad_token_id=pad, flat_keys=calib.flat_keys)[0]],
                            prefix) for s in samples if prefix.endswith("layers") or "pixel_values" in s]
    parts = [(_real(c.block_inputs(0)), *_loss_and_grads(block, c.calls[0], c.block_inputs(0))) for c in alone]
    if prefix.endswith("layers"):
        assert cap.num_samples == 4 and [n for n, *_ in parts] == lengths
    total = sum(n for n, *_ in parts)
    torch.testing.assert_close(loss, sum(n * l for n, l, _ in parts) / total, rtol=1e-4, atol=1e-9)
    for k, g in grads.items():
        torch.testing.assert_close(g, sum(n * gs[k] for n, _, gs in parts) / total, rtol=1e-3, atol=1e-8)
