"""loss_weighting="modality": the text decoder's block loss is the mean over positions weighted by
modality (image-token positions by `image`, text by `text`); off by default."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import IMAGE_TOKEN, tiny_vlm

from signround import AutoRoundMLLM
from signround.adapters import quantize_model
from signround.adapters.hf.vision import ModalityWeights, check_loss_weighting
from signround.rounding import QuantSpec, preset

RTN_SCORED = preset("default", iters=0, nsamples=4, batch_size=4)  # RTN scored on the data: deterministic


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 240, (4, 12), generator=gen)
    ids[:, 1:5] = IMAGE_TOKEN  # 4 of 12 positions are image features
    return [{"input_ids": ids, "pixel_values": torch.randn(4, 3, 28, 28, generator=gen)}]


def _text0_loss(model: torch.nn.Module, weights: ModalityWeights | None) -> float:
    _, report = quantize_model(copy.deepcopy(model), _batches(), QuantSpec(bits=2, group_size=32), RTN_SCORED,
                               loss_weighting=weights)
    return next(b.loss_rtn for b in report.blocks if b.name == "model.language_model.layers.0")


def test_modality_weights_weigh_image_and_text_positions():
    model = tiny_vlm("llava")
    image, text = _text0_loss(model, ModalityWeights(1, 0)), _text0_loss(model, ModalityWeights(0, 1))
    n_image, n_text = 4 * 4, 4 * 8
    assert image != pytest.approx(text, rel=1e-3)
    weighted = _text0_loss(model, ModalityWeights(0.25, 1))
    assert weighted == pytest.approx((0.25 * n_image * image + n_text * text) / (0.25 * n_image + n_text), rel=1e-5)
    assert _text0_loss(model, ModalityWeights(1, 1)) == pytest.approx(_text0_loss(model, None), rel=1e-6)


def test_bad_modality_arguments_are_errors_before_tuning():
    with pytest.raises(ValueError, match="None .off. or 'modality'"):
        check_loss_weighting("mbq")
    with pytest.raises(ValueError, match="unknown key"):
        check_loss_weighting("modality", {"vision": 0.5})
    with pytest.raises(ValueError, match="finite number >= 0"):
        check_loss_weighting("modality", {"image": -1})
    with pytest.raises(ValueError, match="loss_weighting is off"):
        check_loss_weighting(None, {"image": 0.5})
    from vlm_helpers import qwen2_vl_with_processor

    model, tok, proc = qwen2_vl_with_processor()
    with pytest.raises(ValueError, match="needs image-text calibration"):
        AutoRoundMLLM(model, tok, processor=proc, loss_weighting="modality", iters=1, nsamples=2, seqlen=32,
                      progress=False)
    ar = AutoRoundMLLM(model, tok, processor=proc, loss_weighting="modality", modality_weights={"image": 0.2},
                       dataset="embedded", iters=1, nsamples=2, seqlen=256, group_size=32, progress=False)
    assert ar.config.loss_weighting == ModalityWeights(image=0.2, text=1.0)
    assert ar.settings()["loss_weighting"] == {"kind": "modality", "image": 0.2, "text": 1.0}
