"""parse_quantization_config(build_quantization_config(plan)) gives back every layer's grid."""

from __future__ import annotations

import json

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from signround.adapters.checkpoint.config import build_quantization_config, parse_quantization_config
from signround.adapters.checkpoint.formats import CONFIG_FORMATS, EXPORT_FORMATS, choose_packing
from signround.rounding import QuantSpec

KEEP = "keep in full precision"
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
MODULE_PREFIX, CKPT_PREFIX = "model.language_model.layers", "model.layers"  # Qwen2-VL under transformers 5

grids = st.builds(QuantSpec, bits=st.integers(2, 8), group_size=st.sampled_from([-1, 32, 64, 128]),
                  sym=st.booleans())
layer_names = st.builds(lambda i, m: f"{CKPT_PREFIX}.{i}.{m}", st.integers(0, 23), st.sampled_from(MODULES))
# per layer: None = the global grid, a QuantSpec = an override, KEEP = kept in full precision
plans = st.dictionaries(layer_names, st.one_of(st.none(), grids, st.just(KEEP)), max_size=30)


@given(fmt=st.sampled_from(CONFIG_FORMATS), spec=grids, layers=plans, lm_head=st.one_of(st.none(), grids),
       renamed=st.booleans())
@settings(deadline=None)  # the first compressed_tensors example imports that package
def test_parse_gives_back_every_layer(fmt: str, spec: QuantSpec, layers: dict, lm_head: QuantSpec | None,
                                      renamed: bool) -> None:
    # renamed: module names differ from checkpoint names (the loader asks with both)
    module_prefix = MODULE_PREFIX if renamed else CKPT_PREFIX

    def names(ckpt: str) -> tuple[str, str]:
        return (module_prefix + ckpt[len(CKPT_PREFIX):] if ckpt.startswith(CKPT_PREFIX + ".") else ckpt), ckpt

    quantized = {n: (spec if c is None else c) for n, c in layers.items() if c is not KEEP}
    if lm_head is not None:
        quantized["lm_head"] = lm_head  # outside the blocks
    kept = [n for n, c in layers.items() if c is KEEP]
    assume(quantized)  # export refuses a plan without quantized layers
    qc = build_quantization_config(fmt, spec, {names(n)[0]: s for n, s in quantized.items()},
                                   [names(n)[0] for n in kept], [module_prefix], [CKPT_PREFIX])
    qc = json.loads(json.dumps(qc))  # what a reader gets from config.json
    packing, plan = parse_quantization_config(qc)
    assert qc["quant_method"] == EXPORT_FORMATS[fmt].quant_method
    assert packing == choose_packing(fmt, spec, quantized.values())
    assert {n: plan.spec(*names(n)) for n in quantized} == quantized
    assert {n: plan.spec(*names(n)) for n in kept} == {n: None for n in kept}


def test_auto_gptq_dynamic_carries_whole_grids() -> None:
    """Mixed-bit auto_gptq: `"+:^name$": {bits, group_size, sym, data_type}` (this raised AttributeError)."""
    spec = QuantSpec(4, 32, True)
    qc = build_quantization_config("auto_gptq", spec, {"model.layers.0.mlp.up_proj": QuantSpec(8, 32, True),
                                                       "model.layers.0.mlp.gate_proj": spec},
                                   ["model.layers.0.mlp.down_proj"], ["model.layers"], ["model.layers"])
    assert qc["dynamic"] == {
        r"+:^model\.layers\.0\.mlp\.up_proj$": {"bits": 8, "group_size": 32, "sym": True, "data_type": "int"},
        r"-:^model\.layers\.0\.mlp\.down_proj$": {},
    }
    assert qc["checkpoint_format"] == "gptq" and qc["lm_head"] is False
