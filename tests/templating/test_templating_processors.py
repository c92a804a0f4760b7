"""Processors and collation on tiny configs: the tensors they produce go through a model forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from _templating_helpers import byte_tokenizer, needs_qwen, qwen_tokenizer
from signround.templating import (
    ConversationDataset,
    ConversationSample,
    ImageTokensCut,
    ProcessorError,
    Turn,
    bound_image,
    calibration_batches,
    collate,
    conversation_calibration,
    embedded_dataset,
    get_processor,
    list_processors,
    load_template,
    register_processor,
    render,
)
from signround.templating.processors import PROCESSORS, renumber_phi3_images
from vlm_helpers import TINY, gemma3_parts, idefics3_parts, llava_parts, mllama_parts


def _mixed_dataset(n_image: int = 3) -> ConversationDataset:
    """Image samples of different sizes, a two-image sample, and a text-only one."""
    emb = embedded_dataset()
    image = [s for s in emb.samples if s.images][:n_image]
    two = ConversationSample("two", (Turn("user", "<image>\n<image>\nCompare them."), Turn("assistant", "Both are drawings.")),
                             (image[0].images[0], image[1].images[0]))
    text = [s for s in emb.samples if not s.images][:1]
    return ConversationDataset((*image, two, *text), "mixed")


def _forward_all(model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    for b in batches:
        with torch.no_grad():
            out = model(**b)
        assert out.logits.shape[:2] == b["input_ids"].shape
        assert torch.isfinite(out.logits).all()


def test_registry_builtins_and_user_registration() -> None:
    assert {"basic", "hf", "qwen2_vl", "llava", "mllama", "gemma3", "idefics3", "phi3_v"} <= set(list_processors())
    with pytest.raises(ProcessorError, match="unknown processor 'nope'"):
        get_processor("nope")

    @register_processor("test_upper", overwrite=True)
    def upper(text, images, *, tokenizer, processor, seqlen, truncation, max_pixels):  # type: ignore[no-untyped-def]
        return {"input_ids": torch.tensor([[ord(c) for c in text.upper()]])}

    try:
        assert get_processor("test_upper")("ab")["input_ids"].tolist() == [[65, 66]]
        with pytest.raises(ValueError, match="already registered"):
            register_processor("test_upper")(upper)
    finally:
        PROCESSORS.pop("test_upper")


def test_basic_is_text_only_and_truncates() -> None:
    tok = byte_tokenizer([])
    basic = get_processor("basic")
    out = basic("hello world", tokenizer=tok, seqlen=5)
    assert out["input_ids"].shape == (1, 5) and out["attention_mask"].shape == (1, 5)
    assert basic("hello world", tokenizer=tok, seqlen=5, truncation=False)["input_ids"].shape == (1, 11)
    with pytest.raises(ProcessorError, match="text-only"):
        basic("x", [Image.new("RGB", (8, 8))], tokenizer=tok)
    with pytest.raises(ProcessorError, match="HF processor"):
        get_processor("qwen2_vl")("x", [Image.new("RGB", (8, 8))], tokenizer=tok)


def test_bound_image_limits_pixels_and_keeps_aspect() -> None:
    im = Image.new("RGB", (2000, 1000))
    out = bound_image(im, 100_000)
    assert out.size[0] * out.size[1] <= 100_000 and abs(out.size[0] / out.size[1] - 2) < 0.02
    small = Image.new("RGB", (10, 10))
    assert bound_image(small, 100_000) is small


def test_collate_pads_and_concatenates() -> None:
    a = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.ones(4, 6), "grid": torch.tensor([[1, 2, 2]])}
    b = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    out = collate([a, b], pad_token_id=0, flat_keys=("pixel_values", "grid"))
    assert out["input_ids"].tolist() == [[1, 2, 3], [7, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["pixel_values"].shape == (4, 6) and out["grid"].shape == (1, 3)
    left = collate([a, b], pad_token_id=9, padding_side="left", flat_keys=("pixel_values", "grid"))
    assert left["input_ids"].tolist() == [[1, 2, 3], [9, 9, 7]] and left["attention_mask"].tolist()[1] == [0, 0, 1]
    # per-sample image tensors (idefics3/mllama style) are zero-padded in every dim
    c = {"input_ids": torch.tensor([[1]]), "pv": torch.ones(1, 2, 3)}
    d = {"input_ids": torch.tensor([[1]]), "pv": torch.ones(1, 1, 5)}
    pv = collate([c, d])["pv"]
    assert pv.shape == (2, 2, 5) and pv[0, :, 3:].abs().sum() == 0 and pv[1, 1].abs().sum() == 0
    # 1-D text samples are stacked
    t = collate([{"input_ids": torch.arange(4)}, {"input_ids": torch.arange(4)}])
    assert t["input_ids"].shape == (2, 4)


def test_truncation_never_cuts_an_image() -> None:
    tok = byte_tokenizer(["<image>"])
    img = tok.convert_tokens_to_ids("<image>")
    sample = {"input_ids": torch.tensor([[1, img, img, 2, 3, 4]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    from signround.templating import truncate

    assert truncate(sample, 4, [img])["input_ids"].tolist() == [[1, img, img, 2]]
    with pytest.raises(ImageTokensCut, match="seqlen=2"):
        truncate(sample, 2, [img])
    neg = {"input_ids": torch.tensor([[1, -1, -1, 5]])}
    with pytest.raises(ImageTokensCut):
        truncate(neg, 2, [], negative_is_image=True)


def test_phi3_v_renumbers_image_tags() -> None:
    t = load_template("phi3_v")
    text = render(t, [{"role": "user", "content": "<image>\n<image>\nCompare."}])
    assert renumber_phi3_images(text) == "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n"


# ------------------------------------------------------------------------------------- Qwen2-VL


@pytest.fixture(scope="module")
def qwen2_vl() -> tuple[Any, Any, Any]:
    from transformers import (
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor,
    )

    tok = qwen_tokenizer()
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, **TINY, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    )
    torch.manual_seed(0)
    return tok, proc, Qwen2VLForConditionalGeneration(cfg).eval()


@needs_qwen
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_qwen2_vl_batches_run_forward(qwen2_vl: tuple[Any, Any, Any], padding_side: str) -> None:
    tok, proc, model = qwen2_vl
    cal = conversation_calibration(_mixed_dataset(), load_template("qwen2_vl"), tokenizer=tok, processor=proc,
                                   seqlen=512, nsamples=5, seed=0, max_pixels=112 * 112)
    assert len(cal.samples) == 5 and not cal.dropped
    for s in cal.samples:
        ids = s["input_ids"][0]
        n_pad = int((ids == 151655).sum())
        if "image_grid_thw" in s:  # image-pad expansion: t*h*w/4 tokens per image
            assert n_pad == int(s["image_grid_thw"].prod(-1).sum()) // 4
            assert s["pixel_values"].shape[-1] == 1176
            # bounded to 112*112 pixels -> about (112/14)^2 = 64 patches; Qwen rounds sides to 28 px
            assert all(int(g.prod()) <= 2 * 64 for g in s["image_grid_thw"])
        else:
            assert n_pad == 0
    batches = cal.batches(3, pad_token_id=tok.pad_token_id, padding_side=padding_side)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2]
    _forward_all(model, batches)


@needs_qwen
def test_qwen2_vl_seeded_selection_and_image_drop(qwen2_vl: tuple[Any, Any, Any]) -> None:
    tok, proc, _ = qwen2_vl
    ds, tpl = _mixed_dataset(), load_template("qwen2_vl")
    a = conversation_calibration(ds, tpl, tokenizer=tok, processor=proc, seqlen=512, nsamples=3, seed=7, max_pixels=56 * 56)
    b = conversation_calibration(ds, tpl, tokenizer=tok, processor=proc, seqlen=512, nsamples=3, seed=7, max_pixels=56 * 56)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.samples, b.samples))
    # seqlen smaller than one image's tokens: image samples are dropped (and reported), text kept and cut
    with pytest.warns(UserWarning) as record:
        short = conversation_calibration(ds, tpl, tokenizer=tok, processor=proc, seqlen=20, nsamples=10, seed=7, max_pixels=112 * 112)
    messages = [str(w.message) for w in record]
    assert any("dropped 4 sample(s)" in m for m in messages) and any("only 1 of 10" in m for m in messages)
    assert len(short.samples) == 1 and len(short.dropped) == 4
    assert short.samples[0]["input_ids"].shape == (1, 20)
    assert all("seqlen=20" in reason for reason in short.dropped)


# ---------------------------------------------------------------------------- byte-vocab families


@pytest.mark.parametrize(("family", "build"), [("llava", llava_parts), ("idefics3", idefics3_parts), ("gemma3", gemma3_parts), ("mllama", mllama_parts)])
def test_family_processor_batches_run_forward(family: str, build: Any) -> None:
    torch.manual_seed(0)
    tok, proc, model = build()
    cal = conversation_calibration(_mixed_dataset(), load_template(family), tokenizer=tok, processor=proc,
                                   seqlen=2048, nsamples=5, seed=0)
    assert len(cal.samples) == 5
    batches = calibration_batches(cal.samples, 2, pad_token_id=tok.pad_token_id, flat_keys=cal.flat_keys)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    _forward_all(model, batches)
