"""Interop with the reference package (skipped when `auto-round` is not installed).

1. transformers loads our checkpoints through its AutoRound integration; logits match our loader.
2. Our loader reads checkpoints that auto-round itself wrote (RTN, iters=0) on a tiny model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import logits, rtn_state, tiny_tokenizer
from tiny_models import tiny_text_model, tiny_vlm

from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.loader import load_quantized
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.rounding import QuantSpec, quantize_weight

pytest.importorskip("auto_round", reason="the auto-round package (test extra) is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = {
    "qwen2-w4-sym": ("qwen2", QuantSpec(4, 32, True)),
    "qwen2-w3-asym-native": ("qwen2", QuantSpec(3, 32, False)),
    "llama-w3-sym": ("llama", QuantSpec(3, 32, True)),
    "llama-w2-asym": ("llama", QuantSpec(2, 64, False)),
    "llama-w8-sym": ("llama", QuantSpec(8, 32, True)),
    "qwen2_vl-w4-sym": ("qwen2_vl", QuantSpec(4, 32, True)),
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_our_checkpoint(tmp_path: Path, case: str) -> None:
    import transformers

    family, spec = CASES[case]
    model = tiny_vlm(family) if family == "qwen2_vl" else tiny_text_model(family)
    out = save_quantized(model, rtn_state(model, spec), tmp_path / case, tokenizer=tiny_tokenizer())
    ours = load_quantized(out)
    cls = getattr(transformers, type(ours).__name__)
    theirs = cls.from_pretrained(str(out), device_map="cpu", local_files_only=True).eval()
    converted = [m for m in theirs.modules() if "QuantLinear" in type(m).__name__ and type(m) is not QuantLinear]
    assert len(converted) == sum(isinstance(m, QuantLinear) for m in ours.modules())
    # auto-round's torch kernels dequantize in fp16 (we do it in fp32): equal up to that rounding
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=2e-3)
    torch.testing.assert_close(logits(ours), logits(model), rtol=0, atol=1e-4)


def _autoround_checkpoint(model: torch.nn.Module, out: Path, spec: QuantSpec) -> Path:
    from auto_round import AutoRound

    ar = AutoRound(model, tokenizer=tiny_tokenizer(), bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                   iters=0, disable_opt_rtn=True)
    ar.quantize_and_save(str(out), format="auto_round")
    found = [p.parent for p in out.rglob("config.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(("spec", "packing"), [
    (QuantSpec(4, 32, True), "auto_round:auto_gptq"),
    (QuantSpec(3, 32, True), "auto_round:auto_gptq"),
    (QuantSpec(4, 32, False), "auto_round:auto_awq"),  # 0.16.1 writes 4-bit asym in the AWQ layout
    (QuantSpec(2, 32, False), "auto_round"),
], ids=str)
def test_we_load_autoround_checkpoint(tmp_path: Path, spec: QuantSpec, packing: str) -> None:
    model = tiny_text_model("llama").to(torch.bfloat16)  # auto-round's RTN runs in the model dtype
    original = copy.deepcopy(model)
    path = _autoround_checkpoint(model, tmp_path / "ar", spec)
    loaded = load_quantized(path)
    assert loaded.config.quantization_config["packing_format"] == packing
    packed = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 14
    for name, ql in packed.items():
        w = original.get_submodule(name).weight.detach()
        mine = ql.quantized_weight()
        deq = ql.dequantize(torch.float32)
        # every element within one step of the original weight (half a step, or one where the full-range
        # sym grid clamps the short side); a wrong unpacking would be off by several steps
        gs = spec.group_size
        step = mine.scale.float().abs().repeat_interleave(gs, dim=1)
        assert bool(((deq - w.float()).abs() <= 1.01 * step).all()), name
        if spec.sym:  # sym RTN: same grid as ours, bit for bit
            ref = quantize_weight(w, spec)
            assert torch.equal(mine.codes, ref.codes) and torch.equal(mine.scale, ref.scale), name
    ids = torch.tensor([[5, 17, 33, 42]])
    with torch.no_grad():
        tokens = loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 7)


def test_autoround_sym_checkpoint_matches_transformers(tmp_path: Path) -> None:
    import transformers

    model = tiny_text_model("llama").to(torch.bfloat16)
    path = _autoround_checkpoint(model, tmp_path / "ar", QuantSpec(4, 32, True))
    ours = load_quantized(path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(path), device_map="cpu", local_files_only=True)
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), rtol=0, atol=2e-2)


def test_our_4bit_asym_checkpoint_has_autorounds_layout(tmp_path: Path) -> None:
    """4-bit asym goes out as auto-round 0.16 writes it (`auto_round:auto_awq`, the asym layout vLLM
    loads): same packing_format, tensor names, shapes and dtypes. (transformers cannot run either
    tool's AWQ checkpoint on the CPU: auto-round 0.16.1's CPU fallback for it fails.)"""
    from safetensors import safe_open

    spec = QuantSpec(4, 32, False)
    model = tiny_text_model("llama").to(torch.bfloat16)
    theirs = _autoround_checkpoint(copy.deepcopy(model), tmp_path / "ar", spec)
    state = rtn_state(model, spec)  # the model now holds its on-grid weights
    expected = logits(copy.deepcopy(model).float())
    ours = save_quantized(model, state, tmp_path / "ours", tokenizer=tiny_tokenizer())

    def tensors(path: Path) -> dict[str, tuple]:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                out.update({k: (tuple(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype()) for k in st.keys()})
        return out

    import json
    qc = {p: json.loads((p / "config.json").read_text())["quantization_config"] for p in (theirs, ours)}
    assert qc[ours]["packing_format"] == qc[theirs]["packing_format"] == "auto_round:auto_awq"
    mine, ref = tensors(ours), tensors(theirs)
    quant = {k for k in ref if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales")}
    assert quant and {k: mine.get(k) for k in quant} == {k: ref[k] for k in quant}
    # and our own loader reads it back to the weights we quantized
    loaded = load_quantized(ours)
    torch.testing.assert_close(logits(loaded.float()), expected, rtol=0, atol=5e-3)  # fp16 scales
