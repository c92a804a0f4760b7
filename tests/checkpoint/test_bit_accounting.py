"""Bits per weight: what `layer_tensors` prices before tuning is what `inspect` reads from the headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_helpers import rtn_state
from tiny_models import tiny_text_model

from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.inspect import inspect_checkpoint, layer_tensors, stored_bits
from signround.rounding import QuantSpec

CASES = {  # id: (format, global grid, override of two layers)
    "sym-mixed": ("auto_round", QuantSpec(4, 32, True), QuantSpec(2, 64, True)),
    "asym-awq": ("auto_round", QuantSpec(4, 32, False), QuantSpec(4, 64, False)),
    "asym-native": ("auto_round", QuantSpec(3, 32, False), QuantSpec(7, 64, False)),
    "gptq-g_idx": ("auto_gptq", QuantSpec(4, 32, True), QuantSpec(3, -1, True)),
    "compressed-asym": ("compressed_tensors", QuantSpec(4, 32, False), QuantSpec(2, 64, True)),
}


@pytest.mark.parametrize("case", CASES)
def test_priced_bits_are_the_stored_bits(tmp_path: Path, case: str) -> None:
    pytest.importorskip("compressed_tensors") if case.startswith("compressed") else None
    fmt, spec, other = CASES[case]
    model = tiny_text_model("llama")
    changed = {"model.layers.0.self_attn.q_proj": other, "model.layers.1.mlp.down_proj": other}
    results = rtn_state(model, spec, override=changed)
    info = inspect_checkpoint(save_quantized(model, results, tmp_path / case, format=fmt, inplace=False))
    total = weights = 0
    for name, r in results.items():
        m = model.get_submodule(name)
        priced = stored_bits(layer_tensors(fmt, r.spec, m.in_features, m.out_features).values())
        assert info["layer_bits"][name]["stored_bits"] == priced, name
        total += priced
        weights += m.in_features * m.out_features
    assert info["average_bits"] == pytest.approx(total / weights, rel=1e-12)


def test_worked_example_w4g128_sym() -> None:
    """[4096, 4096] at W4 g128 sym: 4 bits of code, a 16-bit scale and a 4-bit zero per 128 weights."""
    bits = stored_bits(layer_tensors("auto_round", QuantSpec(4, 128, True), 4096, 4096).values())
    assert bits / 4096**2 == 4 + (16 + 4) / 128
