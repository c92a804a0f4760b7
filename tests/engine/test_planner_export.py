"""The planner's "export" phase (issue 16): save_quantized of a model held in RAM holds every packed
layer beside the model, plus one layer's recovery and packing temporaries; a streamed run writes each
block as it finishes and has no such phase. The measured side is tests/hf/test_in_ram_memory.py."""

from __future__ import annotations

import pytest

from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.files import iter_tensors
from signround.adapters.engine.loop import quantize_model
from signround.adapters.engine.planner import EXPORT_TRANSIENT, ModelShape, Settings, estimate
from signround.adapters.hf.blocks import select_layers
from signround.rounding import QuantSpec, Recipe
from tiny_models import random_batches, tiny_text_model

PREFIXES = ["model.layers"]


@pytest.mark.parametrize("bits", [4, 3])
def test_packed_bytes_are_what_the_export_writes_for_the_quantized_layers(tmp_path, bits: int) -> None:
    spec = QuantSpec(bits=bits, group_size=32)
    model = tiny_text_model("llama", num_hidden_layers=2)
    shape = ModelShape.of(model, PREFIXES, select_layers(model, PREFIXES, spec))
    _, report = quantize_model(model, None, spec, Recipe(iters=0, nsamples=2, seqlen=8, batch_size=2))
    save_quantized(model, report.layers, tmp_path / "out", block_name_to_quantize=PREFIXES)
    written = sum(t.numel() * t.element_size() for k, t in iter_tensors(tmp_path / "out")
                  if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales"))
    assert shape.packed_bytes == pytest.approx(written, rel=0.01)


def test_an_in_ram_export_is_a_phase_of_the_host_peak() -> None:
    model = tiny_text_model("llama", num_hidden_layers=32, hidden_size=256, intermediate_size=1024)
    spec = QuantSpec(bits=4, group_size=128)
    shape = ModelShape.of(model, PREFIXES, select_layers(model, PREFIXES, spec))
    few = Recipe(iters=2, nsamples=2, seqlen=8, batch_size=2)  # tiny cache, many blocks: the export is larger
    for device in ("cuda", "cpu"):
        host = estimate(shape, few, Settings("host", False, 2, 1), device_type=device, baseline=2**28).host
        assert host.phase == "export"
        assert host.parts["packed layers of the export"] == shape.packed_bytes
        assert host.parts["export transient (one layer's codes and packing)"] == EXPORT_TRANSIENT * shape.largest_layer
        assert host.total == 2**28 + shape.model_bytes + shape.packed_bytes + EXPORT_TRANSIENT * shape.largest_layer
    # a streamed run packs each block as it goes (the 2 blocks it holds): no export phase
    streamed = estimate(shape, few, Settings("host", True, 2, 1), device_type="cuda", baseline=2**28).host
    assert streamed.phase == "run" and not any("export" in k for k in streamed.parts)
    # a large calibration cache stays the larger phase on the host
    big = Recipe(iters=2, nsamples=512, seqlen=512, batch_size=8)
    assert estimate(shape, big, Settings("host", False, 8, 1), device_type="cuda").host.phase == "run"
