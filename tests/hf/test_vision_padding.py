"""Padding cannot leak: image-text samples of different lengths padded into one batch of 4 give the
same block loss and gradients as the 4 samples captured one at a time without padding, averaged
(weighted by their real positions, as the block loss is a mean over real positions), for the text
decoder of each family and for Qwen2-VL's packed vision blocks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from vlm_helpers import gemma3_parts, idefics3_parts, llava_parts, mllama_parts, qwen2_vl_with_processor

from signround.adapters.hf.capture import capture_inputs
from signround.adapters.hf.pure import as_pure
from signround.rounding import BlockInputs, masked_mse
from signround.templating import calibration_batches, conversation_calibration, embedded_dataset, load_template
from signround.templating.collate import pad_samples
from signround.templating.processors import SEQUENCE_KEYS


def _qwen2_vl() -> tuple[Any, Any, Any]:
    model, tok, proc = qwen2_vl_with_processor()
    return tok, proc, model


def _mllama() -> tuple[Any, Any, Any]:
    tok, proc, model = mllama_parts()
    with torch.no_grad():  # open the cross-attention gates (0 at init: the layer would be the identity)
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    return tok, proc, model


# (family, builder, block list, block index): Mllama's block 1 is its cross-attention layer
CASES = [("qwen2_vl", _qwen2_vl, "model.language_model.layers", 0), ("qwen2_vl", _qwen2_vl, "model.visual.blocks", 0),
         ("llava", llava_parts, "model.language_model.layers", 0),
         ("idefics3", idefics3_parts, "model.text_model.layers", 0),
         ("gemma3", gemma3_parts, "model.language_model.layers", 0),
         ("mllama", _mllama, "model.language_model.layers", 1),
         ("mllama", _mllama, "model.vision_model.transformer.layers", 0),
         ("mllama", _mllama, "model.vision_model.global_transformer.layers", 0)]


def _trimmed(sample: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """A padded sample cut back to its own length (Mllama keeps its padded image slots)."""
    return {k: (v[:, :length] if k in SEQUENCE_KEYS else v) for k, v in sample.items()}


def _has_image(sample: dict[str, torch.Tensor]) -> bool:
    ratio = sample.get("aspect_ratio_mask")
    return "pixel_values" in sample if ratio is None else bool(ratio.any())


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


def _inputs_of(cap: Any, index: int, model: Any, prefix: str) -> torch.Tensor:
    """The inputs of block `index`: block 0's captured inputs run through the blocks before it."""
    x = cap.hidden
    for i in range(index):
        fn, weights = as_pure(model.get_submodule(prefix)[i], cap.calls[i].layout)
        with torch.no_grad():
            x = fn(weights, cap.block_inputs(i, x))
    return x


def _real(inputs: BlockInputs) -> int:
    return int(inputs.hidden.shape[1]) if inputs.loss_mask is None else int(inputs.loss_mask.sum())


@pytest.mark.parametrize(("family", "build", "prefix", "index"), CASES,
                         ids=[f"{f}-{p.split('.')[-2]}-{i}" for f, _, p, i in CASES])
def test_a_padded_batch_equals_its_samples_one_at_a_time(family, build, prefix, index):
    torch.manual_seed(0)
    tok, proc, model = build()
    calib = conversation_calibration(embedded_dataset(), load_template(None, family), tokenizer=tok, processor=proc,
                                     seqlen=512, nsamples=4, seed=3)
    samples = list(calib.samples)
    lengths = [s["input_ids"].shape[-1] for s in samples]
    assert len(set(lengths)) > 1 and sum("pixel_values" in s for s in samples) >= 2  # padding and images
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    padded = pad_samples(samples, pad, calib.padded_keys)
    (batch,) = calibration_batches(padded, 4, pad_token_id=pad, flat_keys=calib.flat_keys)
    block = model.get_submodule(prefix)[index]
    cap = capture_inputs(model, [batch], prefix)
    assert cap.loss_mask is not None  # something is padded
    loss, grads = _loss_and_grads(block, cap.calls[index], cap.block_inputs(index, _inputs_of(cap, index, model, prefix)))

    text = "vision" not in prefix and "visual" not in prefix
    alone = [capture_inputs(model, calibration_batches([_trimmed(p, n)], 1, pad_token_id=pad, flat_keys=calib.flat_keys),
                            prefix) for p, n, s in zip(padded, lengths, samples) if text or _has_image(s)]
    parts = [(_real(c.block_inputs(index)),
              *_loss_and_grads(block, c.calls[index], c.block_inputs(index, _inputs_of(c, index, model, prefix))))
             for c in alone]
    if text:
        assert cap.num_samples == 4 and [n for n, *_ in parts] == lengths
    total = sum(n for n, *_ in parts)
    torch.testing.assert_close(loss, sum(n * l for n, l, _ in parts) / total, rtol=1e-4, atol=1e-9)
    for k, g in grads.items():
        torch.testing.assert_close(g, sum(n * gs[k] for n, _, gs in parts) / total, rtol=1e-3, atol=1e-8)
