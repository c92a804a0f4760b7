"""Every VLM family end to end through the facade: quantize on text and on image-text, save an
auto_round checkpoint, reload it with our loader, and generate."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from signround import AutoRoundMLLM, load_quantized
from vlm_helpers import gemma3_parts, idefics3_parts, llava_parts, mllama_parts, qwen2_vl_with_processor

SMALL = dict(iters=3, nsamples=4, batch_size=2, progress=False)


def _qwen2_vl() -> tuple[Any, Any, Any]:
    model, tok, proc = qwen2_vl_with_processor()
    return tok, proc, model


FAMILIES = [("qwen2_vl", _qwen2_vl), ("llava", llava_parts), ("idefics3", idefics3_parts), ("gemma3", gemma3_parts),
            ("mllama", mllama_parts)]


@pytest.mark.parametrize("dataset", [None, "embedded"], ids=["text", "image-text"])
@pytest.mark.parametrize(("family", "build"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_quantize_save_reload_generate(family, build, dataset, tmp_path):
    torch.manual_seed(0)
    tok, proc, model = build()
    ar = AutoRoundMLLM(model, tok, processor=proc, group_size=32, dataset=dataset,
                       **{**SMALL, "seqlen": 64 if dataset is None else 512})
    if dataset is not None:
        assert any("pixel_values" in b for b in ar.calibration())
    report = ar.quantize()
    assert report.layers, "no layer was quantized"
    out = ar.save_quantized(tmp_path / family, inplace=False)
    reloaded = load_quantized(out)
    ids = tok("a red circle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)
        a = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        b = reloaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert a.shape[1] == ids.shape[1] + 3 and torch.equal(a, b)
