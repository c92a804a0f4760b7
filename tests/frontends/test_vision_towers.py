"""quant_nontext_module end to end per family: the vision blocks are tuned on the calibration images
(better than RTN on average), the projector / merger stays in full precision, the checkpoint names
the vision blocks as the original checkpoint does, and the reloaded model generates with an image
exactly as the fake-quantized one."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from vlm_helpers import (gemma3_parts, idefics3_parts, llava_parts, mllama_parts, qwen2_5_vl_with_processor,
                         qwen2_vl_with_processor)

from signround import AutoRoundMLLM, load_quantized

SMALL = dict(iters=8, nsamples=8, batch_size=4, seqlen=256, group_size=32, progress=False)


def _image() -> Image.Image:
    gen = torch.Generator().manual_seed(7)
    return Image.fromarray((torch.rand(84, 112, 3, generator=gen) * 255).to(torch.uint8).numpy())


def _generate(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False)


PACKED = [("qwen2_vl", qwen2_vl_with_processor), ("qwen2_5_vl", qwen2_5_vl_with_processor)]


@pytest.mark.parametrize(("family", "build"), PACKED, ids=[f for f, _ in PACKED])
def test_packed_vision_blocks_quantize_reload_generate(family, build, tmp_path):
    torch.manual_seed(0)
    model, tok, proc = build()
    ar = AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True, **SMALL)
    report = ar.quantize()
    assert report.block_name_to_quantize == ("model.visual.blocks", "model.language_model.layers")
    vision = [b for b in report.blocks if b.name.startswith("model.visual.blocks.")]
    assert len(vision) == 2 and all(b.source == "tuned" for b in vision)
    assert sum(b.loss_tuned for b in vision) < sum(b.loss_rtn for b in vision)
    assert any(n.startswith("model.visual.blocks.0.attn.qkv") for n in report.layers)
    assert not any("merger" in n for n in report.layers)  # outside the blocks: full precision

    out = ar.save_quantized(tmp_path / family, inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "visual.blocks" in qc["block_name_to_quantize"].split(",")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "visual.blocks.0.attn.qkv.qweight" in keys and "visual.merger.mlp.0.weight" in keys
    assert not any(k.startswith("model.visual.") for k in keys)

    reloaded = load_quantized(out)
    inputs = proc(text=["<|vision_start|><|image_pad|><|vision_end|>a red circle"], images=[_image()],
                  return_tensors="pt")
    assert inputs["pixel_values"].shape[0] > 16
    a, b = _generate(model, dict(inputs)), _generate(reloaded, dict(inputs))
    assert a.shape[1] == inputs["input_ids"].shape[1] + 4 and torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits, rtol=0, atol=1e-4)


def _qwen2_vl_parts() -> tuple[Any, Any, Any]:
    model, tok, proc = qwen2_vl_with_processor()
    return tok, proc, model


INTEROP = [("qwen2_vl", _qwen2_vl_parts, "<|vision_start|><|image_pad|><|vision_end|>"),
           ("llava", llava_parts, "<image>"), ("gemma3", gemma3_parts, "<start_of_image>"),
           ("idefics3", idefics3_parts, "<image>")]


@pytest.mark.parametrize(("family", "build", "tag"), INTEROP, ids=[f for f, *_ in INTEROP])
def test_transformers_with_auto_round_loads_quantized_vision_blocks(family, build, tag, tmp_path):
    pytest.importorskip("auto_round", reason="the auto-round package (test extra) is not installed")
    import transformers

    torch.manual_seed(0)
    tok, proc, model = build()
    ar = AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True, **{**SMALL, "iters": 2, "seqlen": 512})
    report = ar.quantize()
    out = ar.save_quantized(tmp_path / "q", inplace=False)
    theirs = getattr(transformers, type(model).__name__).from_pretrained(str(out), device_map="cpu",
                                                                        local_files_only=True).eval()
    converted = {n for n, m in theirs.named_modules() if "QuantLinear" in type(m).__name__}
    vision = {n for n in report.layers if n.startswith(report.block_name_to_quantize[0] + ".")}
    assert vision and vision <= converted and converted == set(report.layers)
    inputs = proc(text=[f"{tag}a red circle"], images=[_image()], return_tensors="pt")
    half = {k: (v.to(theirs.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}  # auto-round: fp16
    with torch.no_grad():
        torch.testing.assert_close(theirs(**half).logits.float(), model(**inputs).logits, rtol=0, atol=2e-3)


def test_mllama_vision_encoder_and_cross_attention_quantize_reload_generate(tmp_path):
    torch.manual_seed(0)
    tok, proc, model = mllama_parts()
    with torch.no_grad():  # open the cross-attention and gated vision layers (tanh(0) = 0 at init)
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    ar = AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True, **{**SMALL, "seqlen": 512})
    report = ar.quantize()
    assert report.block_name_to_quantize == ("model.vision_model.transformer.layers",
                                             "model.vision_model.global_transformer.layers",
                                             "model.language_model.layers")
    assert all(b.source == "tuned" for b in report.blocks)  # the cross-attention layer (block 1) included
    assert "model.language_model.layers.1.cross_attn.q_proj" in report.layers
    vision = [b for b in report.blocks if b.name.startswith("model.vision_model.")]
    assert sum(b.loss_tuned for b in vision) < sum(b.loss_rtn for b in vision)
    cross = next(b for b in report.blocks if b.name == "model.language_model.layers.1")
    assert cross.loss_tuned < cross.loss_rtn
    assert not any("projector" in n for n in report.layers)

    out = ar.save_quantized(tmp_path / "mllama", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"vision_model.transformer.layers", "language_model.model.layers"} <= set(qc["block_name_to_quantize"].split(","))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"vision_model.transformer.layers.0.self_attn.q_proj.qweight",
            "language_model.model.layers.1.cross_attn.q_proj.qweight", "multi_modal_projector.weight"} <= keys
    reloaded = load_quantized(out)
    inputs = proc(text=["<|image|>a red circle"], images=[_image()], return_tensors="pt")
    a, b = _generate(model, dict(inputs)), _generate(reloaded, dict(inputs))
    assert a.shape[1] == inputs["input_ids"].shape[1] + 4 and torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits, rtol=0, atol=1e-4)


# (family, builder, vision list, its name in the original checkpoint, image tag): transformers 5 drops
# CLIP's / SigLIP's `vision_model.` level inside LLaVA and Gemma-3; their checkpoints keep it
OTHERS = [("llava", llava_parts, "model.vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers",
           "<image>"),
          ("idefics3", idefics3_parts, "model.vision_model.encoder.layers", "model.vision_model.encoder.layers",
           "<image>"),
          ("gemma3", gemma3_parts, "model.vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers",
           "<start_of_image>")]


@pytest.mark.parametrize(("family", "build", "vision", "saved", "tag"), OTHERS, ids=[f for f, *_ in OTHERS])
def test_vision_blocks_quantize_reload_generate(family, build, vision, saved, tag, tmp_path):
    torch.manual_seed(0)
    tok, proc, model = build()
    # one vision layer of larger random weights: 8 steps do not beat RTN there, 20 do
    ar = AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True, **{**SMALL, "seqlen": 512, "iters": 20})
    report = ar.quantize()
    assert report.block_name_to_quantize[0] == vision
    tuned = [b for b in report.blocks if b.name.startswith(vision + ".")]
    assert tuned and all(b.source == "tuned" for b in tuned)
    assert sum(b.loss_tuned for b in tuned) < sum(b.loss_rtn for b in tuned)
    assert any(n.startswith(vision + ".0.") for n in report.layers)
    out = ar.save_quantized(tmp_path / family, inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved in qc["block_name_to_quantize"].split(",")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f"{saved}.0.mlp.fc1.qweight" in set(f.keys())
    reloaded = load_quantized(out)
    inputs = proc(text=[f"{tag}a red circle"], images=[_image()], return_tensors="pt")
    a, b = _generate(model, dict(inputs)), _generate(reloaded, dict(inputs))
    assert a.shape[1] == inputs["input_ids"].shape[1] + 4 and torch.equal(a, b)
