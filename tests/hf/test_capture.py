"""Input capture: replaying every block from captured inputs reproduces the model's own forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batches, tiny_text_model, tiny_vlm
from vlm_helpers import qwen2_vl_image_batch

from signround.adapters import as_pure, capture_inputs, find_block_lists
from signround.adapters.hf.blocks import blocks_of


def _replay(model, captured):
    """Hidden states after each block, computed block by block from the captured inputs."""
    h, outs = captured.hidden, []
    for i, block in enumerate(blocks_of(model, captured.prefix)):
        fn, weights = as_pure(block, captured.calls[i].layout)
        h = fn(weights, captured.block_inputs(i, h))
        outs.append(h)
    return outs


def _reference(model, batches):
    """model's own per-layer hidden states (all batches concatenated)."""
    per_batch = []
    for b in batches:
        kw = {"input_ids": b} if isinstance(b, torch.Tensor) else dict(b)
        with torch.no_grad():
            per_batch.append(model(**kw, output_hidden_states=True, use_cache=False).hidden_states)
    return [torch.cat([hs[i] for hs in per_batch]) for i in range(len(per_batch[0]))]


def _check_replay(model, batches, atol=1e-5):
    prefix = find_block_lists(model)[0]
    captured = capture_inputs(model, batches, prefix)
    ref = _reference(model, batches)
    outs = _replay(model, captured)
    torch.testing.assert_close(captured.hidden, ref[0], atol=atol, rtol=0)
    for i in range(len(outs) - 1):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(outs[i], ref[i + 1], atol=atol, rtol=0)
    return captured


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_replay_matches_the_model(model_type: str) -> None:
    model = tiny_text_model(model_type, num_hidden_layers=3)
    captured = _check_replay(model, random_batches(3, 2, 16))
    assert captured.num_samples == 6 and captured.loss_mask is None
    assert all(c is not None for c in captured.calls)


def test_gemma3_blocks_get_their_own_masks_and_rotary_tables() -> None:
    model = tiny_text_model("gemma3_text", num_hidden_layers=2)
    captured = capture_inputs(model, random_batches(2, 2, 16), "model.layers")
    first, second = (c.layout.kwargs for c in captured.calls)
    assert first["position_embeddings"] != second["position_embeddings"]  # local vs global rope


def test_padding_gives_per_sample_masks_and_a_loss_mask() -> None:
    model = tiny_text_model("llama", num_hidden_layers=3)
    ids = random_batches(2, 2, 12)
    batches = []
    for b, pad in zip(ids, (3, 5)):
        mask = torch.ones_like(b)
        mask[1, :pad] = 0  # left padding on the second sample
        batches.append({"input_ids": b, "attention_mask": mask})
    captured = _check_replay(model, batches)
    assert captured.loss_mask is not None and captured.loss_mask.shape == (4, 12)
    assert captured.loss_mask[1, :3].sum() == 0 and captured.loss_mask[0].all()
    assert any(k.startswith("attention_mask") for k in captured.calls[0].per_sample)


def test_nsamples_truncates() -> None:
    model = tiny_text_model("llama")
    captured = capture_inputs(model, random_batches(4, 3, 8), "model.layers", nsamples=5)
    assert captured.num_samples == 5
    assert all(v.shape[0] == 5 for c in captured.calls for v in c.per_sample.values())


def test_capture_restores_the_blocks() -> None:
    model = tiny_text_model("llama")
    ids = random_batches(1, 2, 8)[0]
    before = model(input_ids=ids).logits
    capture_inputs(model, [ids], "model.layers")
    assert all("forward" not in b.__dict__ for b in model.model.layers)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_mismatched_seqlen_is_a_clear_error() -> None:
    model = tiny_text_model("llama")
    with pytest.raises(ValueError, match="same seqlen"):
        capture_inputs(model, [torch.randint(3, 200, (1, 8)), torch.randint(3, 200, (1, 9))], "model.layers")


def test_qwen2_vl_text_only() -> None:
    model = tiny_vlm("qwen2_vl", num_hidden_layers=3)
    captured = _check_replay(model, random_batches(2, 2, 16))
    assert captured.prefix == "model.language_model.layers"
    assert not captured.calls[0].per_sample  # text-only: positions are the same for every sample


def test_qwen2_vl_with_images_has_per_sample_mrope_positions() -> None:
    model = tiny_vlm("qwen2_vl", num_hidden_layers=3)
    batches = [qwen2_vl_image_batch((1, 6)), qwen2_vl_image_batch((3, 9))]
    captured = _check_replay(model, batches)
    layout = captured.calls[0].layout.kwargs
    cos = layout["position_embeddings"][0]
    assert cos.batch_dim is not None  # image positions differ per sample: the rotary tables are per sample
    assert captured.calls[0].per_sample[cos.key].shape[0] == 4
    # a mixed set: image batches and a text-only batch
    _check_replay(model, [*batches, random_batches(1, 2, 20)[0]])


def test_seqlen_equal_to_batch_size_and_uneven_batches() -> None:
    model = tiny_text_model("llama", num_hidden_layers=3)
    _check_replay(model, random_batches(2, 8, 8))  # rotary tables [1, L, D] with L == batch size
    ids = random_batches(1, 4, 10)[0]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    batches = [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]
    captured = _check_replay(model, batches)
    assert captured.num_samples == 4


def test_a_block_call_keeps_no_reference_to_its_batch():
    """Rebuilding a block call must not put the mini-batch into a reference cycle: on a GPU every
    batch would stay allocated until Python's cyclic collector happens to run (seen: 2 GiB of
    8B-sized batches alive at the peak)."""
    import gc
    import weakref

    model = tiny_text_model("llama")
    cap = capture_inputs(model, random_batches(2, 4, 16), "model.layers")
    fn, weights = as_pure(model.model.layers[0], cap.calls[0].layout)
    batch = cap.block_inputs(0).select(torch.arange(4))
    ref = weakref.ref(batch.hidden)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            y = fn(weights, batch)
        del batch, y
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()
