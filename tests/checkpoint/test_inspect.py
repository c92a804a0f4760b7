"""`signround inspect` reads every packing's shapes and every per-layer rule the loader reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import rtn_state
from safetensors.torch import save_file
from tiny_models import tiny_text_model
from torch import nn

from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.inspect import inspect_checkpoint
from signround.adapters.checkpoint.loader import load_quantized
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.rounding import QuantSpec

CASES = {  # id: (format, spec, packing)
    "w4-asym-awq": ("auto_round", QuantSpec(4, 32, False), "auto_round:auto_awq"),  # qweight [in, out/8]
    "w4-sym": ("auto_round", QuantSpec(4, 32, True), "auto_round:auto_gptq"),
    "w3-asym-native": ("auto_round", QuantSpec(3, 32, False), "auto_round"),
    "w2-gptq": ("auto_gptq", QuantSpec(2, 64, True), "auto_gptq"),
}


@pytest.mark.parametrize("case", CASES)
def test_features_of_every_packing(tmp_path: Path, case: str) -> None:
    fmt, spec, packing = CASES[case]
    model = tiny_text_model("llama")
    results = rtn_state(model, spec)
    info = inspect_checkpoint(save_quantized(model, results, tmp_path / case, format=fmt, inplace=False))
    assert set(info["layers"]) == set(results)
    for name, layer in info["layers"].items():
        module = model.get_submodule(name)
        assert (layer["in_features"], layer["out_features"]) == (module.in_features, module.out_features), name
        assert (layer["bits"], layer["group_size"], layer["sym"]) == (spec.bits, spec.group_size, spec.sym)
    assert info["packing_format"] == (None if fmt == "auto_gptq" else packing)
    assert info.get("packing") == packing  # the packing the loader reads it with (a new field)


def test_mixed_bit_auto_gptq_checkpoint(tmp_path: Path) -> None:
    """Per-layer grids travel in GPTQ `dynamic`: inspect and the loader both read them."""
    model = tiny_text_model("llama")
    spec, wide = QuantSpec(4, 32, True), QuantSpec(8, 64, True)
    o_proj, kept = "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"
    results = rtn_state(model, spec, skip=[kept], override={o_proj: wide})
    out = save_quantized(model, results, tmp_path / "gptq", format="auto_gptq", inplace=False)
    info = inspect_checkpoint(out)
    assert info["layers"][o_proj] == {"bits": 8, "group_size": 64, "sym": True, "in_features": 64,
                                      "out_features": 64, "groups": 1}
    assert info["bits_histogram"] == {"4": len(results) - 1, "8": 1}
    assert info["kept_fp_by_config"] == [kept]
    loaded = load_quantized(out)
    assert {n: m.spec for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == {
        n: r.spec for n, r in results.items()}
    assert isinstance(loaded.get_submodule(kept), nn.Linear)


def _write_checkpoint(path: Path, qc: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _gptq_layer(prefix: str, in_f: int, out_f: int, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    groups = in_f // group_size
    return {f"{prefix}.qweight": torch.zeros(in_f * bits // 32, out_f, dtype=torch.int32),
            f"{prefix}.qzeros": torch.zeros(groups, out_f * bits // 32, dtype=torch.int32),
            f"{prefix}.scales": torch.zeros(groups, out_f, dtype=torch.float16),
            f"{prefix}.g_idx": torch.zeros(in_f, dtype=torch.int32)}


def test_gptqmodel_dynamic_regexes(tmp_path: Path) -> None:
    """A GPTQModel-style config: `+:` regex overrides and a `-:` excluded layer."""
    qc = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 32, "sym": True,
          "dynamic": {r"+:.*\.o_proj$": {"bits": 8, "group_size": 64}, r"-:^model\.layers\.0\.mlp\.down_proj$": {}}}
    tensors = {**_gptq_layer("model.layers.0.self_attn.o_proj", 128, 64, 8, 64),
               **_gptq_layer("model.layers.0.self_attn.q_proj", 64, 96, 4, 32),
               "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 128, dtype=torch.float16),
               "model.embed_tokens.weight": torch.zeros(256, 64, dtype=torch.float16)}
    info = inspect_checkpoint(_write_checkpoint(tmp_path / "gptqmodel", qc, tensors))
    assert info["layers"] == {
        "model.layers.0.self_attn.o_proj": {"bits": 8, "group_size": 64, "sym": True, "in_features": 128,
                                            "out_features": 64, "groups": 2},
        "model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 32, "sym": True, "in_features": 64,
                                            "out_features": 96, "groups": 2},
    }
    assert info["bits_histogram"] == {"8": 1, "4": 1}
    assert info["kept_fp_by_config"] == ["model.layers.0.mlp.down_proj"]
    assert info["full_precision_2d_weights"] == ["model.embed_tokens", "model.layers.0.mlp.down_proj"]
