"""Bad input for vision quantization, each a clear error before any tuning: no images, a run with no
vision block list, a sample whose rendered text does not hold one image token per image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import random_batches, tiny_vlm
from vlm_helpers import qwen2_vl_with_processor

import signround
from signround import AutoRoundMLLM
from signround.adapters import quantize_model
from signround.rounding import QuantSpec, preset
from signround.templating import DatasetError

SMALL = dict(iters=2, nsamples=4, batch_size=2, seqlen=256, group_size=32, progress=False)


def test_vision_quantization_without_images_is_refused(tmp_path):
    model, tok, proc = qwen2_vl_with_processor()
    text = tmp_path / "calib.txt"
    text.write_text("a red circle on a white page\n" * 50)
    with pytest.raises(ValueError, match="needs image-text data"):
        AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True, dataset=str(text), **SMALL)
    # the engine, given text batches for a vision list, says so before tuning the first block
    tuned = []
    with pytest.raises(ValueError, match="no calibration batch has images for the vision blocks .model.visual.blocks."):
        quantize_model(tiny_vlm("qwen2_vl"), random_batches(1, 2, 16), QuantSpec(4, 32), preset("default", iters=2),
                       quant_nontext_module=True, on_block=tuned.append)
    assert not tuned


def test_image_count_must_match_the_rendered_image_tokens(tmp_path):
    model, tok, proc = qwen2_vl_with_processor()
    preset_file = json.loads((Path(signround.__file__).parent / "templates" / "qwen2_vl.json").read_text())
    preset_file["replace_tokens"] = ["<image>\n", "", "<image>", ""]  # a template that drops the images
    template = tmp_path / "no_images.json"
    template.write_text(json.dumps(preset_file))
    ar = AutoRoundMLLM(model, tok, processor=proc, dataset="embedded", template=str(template), **SMALL)
    with pytest.raises(DatasetError, match=r"has 1 image\(s\) but its rendered text has 0 '<\|image_pad\|>'"):
        ar.calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DatasetError):
        ar.quantize()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_modality_loss_and_its_bad_weights(tmp_path):
    from typer.testing import CliRunner

    from signround.cli import app

    model, tok, proc = qwen2_vl_with_processor()
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    args = ["quantize", str(tmp_path / "m"), "--dry-run", "--group-size", "32", "--dataset", "embedded",
            "--quant-nontext-module", "--loss-weighting", "modality"]
    res = CliRunner().invoke(app, [*args, "--modality-weights", "image=0.3"])
    assert res.exit_code == 0, res.output
    assert "loss_weighting" in res.output and "0.3" in res.output
    res = CliRunner().invoke(app, [*args, "--modality-weights", "image:0.3"])
    assert res.exit_code != 0 and "expected NAME=NUMBER" in res.output
    res = CliRunner().invoke(app, [*args, "--modality-weights", "pixels=1"])
    assert res.exit_code != 0 and "unknown key" in res.output


def test_a_target_that_does_not_serve_the_family_is_refused():
    from vlm_helpers import mllama_parts

    tok, proc, model = mllama_parts()
    with pytest.raises(ValueError, match="target 'vllm': vLLM 0.33 no longer serves MllamaForConditionalGeneration"):
        AutoRoundMLLM(model, tok, processor=proc, target="vllm", **SMALL)
    AutoRoundMLLM(model, tok, processor=proc, target="transformers", **SMALL)  # served there
