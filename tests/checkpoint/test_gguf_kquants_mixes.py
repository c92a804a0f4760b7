"""GGUF k-quants Q3_K and Q5_K, and the files that use them (gguf:q3_k_s/m/l, q4_k_s, q5_k_s/m):
every k type's blocks against the gguf package's dequantizer on random grids (hypothesis), the
llama.cpp mixes (`llama_cpp_mix`), and each format written and read back with the gguf reader.
llama.cpp itself: tests/checkpoint/llama_cpp_check.py (not CI), results in spec/format.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import check_asym_k_exact, rtn_state
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_text_model

from signround.adapters.checkpoint import gguf_kquants
from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.formats import GGUF_KBASE, GGUF_KFORMATS, GGUF_KTYPES, gguf_type
from signround.adapters.checkpoint.gguf import llama_cpp_mix
from signround.rounding import QuantSpec
from signround.rounding.grid import quantize_weight

gguf = pytest.importorskip("gguf")
SPECS = {t: QuantSpec(b, g, sym) for t, (b, sym, g) in GGUF_KTYPES.items()}
WIDE = dict(hidden_size=256, intermediate_size=512)  # every in_features a multiple of 256


def _encode(type_name: str, w: torch.Tensor):
    spec = SPECS[type_name]
    qw = quantize_weight(w, spec)
    args = (qw.codes.numpy(), qw.scale.float().numpy()) + (() if spec.sym else (qw.zero.numpy(),))
    return qw, getattr(gguf_kquants, f"encode_{type_name}")(*args)


@settings(max_examples=25, deadline=None)
@given(type_name=st.sampled_from(sorted(GGUF_KTYPES)), rows=st.integers(1, 3), supers=st.integers(1, 2),
       spread=st.floats(0.0, 3.0), outlier=st.floats(0.0, 40.0), seed=st.integers(0, 2 ** 16))
def test_every_k_type_dequantizes_bit_for_bit_as_gguf_does(type_name: str, rows: int, supers: int, spread: float,
                                                           outlier: float, seed: int) -> None:
    """Groups of very different ranges (spread: log-scale of the per-group std) and an outlier:
    ggml's dequantization of our blocks is the `dequantized` we report, its error the `rel_mse`."""
    gen = torch.Generator().manual_seed(seed)
    k = 256 * supers
    group_std = torch.exp(spread * torch.randn(rows, k // 16, 1, generator=gen))
    w = (torch.randn(rows, k // 16, 16, generator=gen) * group_std).reshape(rows, k) * 0.02
    w[0, int(torch.randint(0, k, (1,), generator=gen))] += outlier * 0.02
    qw, kb = _encode(type_name, w)
    qtype = getattr(gguf.GGMLQuantizationType, type_name.upper())
    assert kb.blocks.shape == (rows, supers * gguf.GGML_QUANT_SIZES[qtype][1]) and kb.blocks.dtype == np.uint8
    np.testing.assert_array_equal(gguf.quants.dequantize(kb.blocks, qtype), kb.dequantized)
    ours = qw.dequantize().numpy()
    norm = float((ours.astype(np.float64) ** 2).sum())
    assume(norm > 0)
    assert kb.rel_mse == pytest.approx(float(((kb.dequantized - ours).astype(np.float64) ** 2).sum()) / norm,
                                       rel=1e-5, abs=1e-12)
    assert 0 <= kb.codes_changed <= 1


@pytest.mark.parametrize(("type_name", "bound"), [("q3_k", 0.05), ("q5_k", 0.15)])
def test_q3_k_q5_k_add_little_to_signround_error(type_name: str, bound: float) -> None:
    """Gaussian weights with an outlier group: the re-quantization adds a small share of the grid's
    own error (measured 1.3 % for Q3_K; 9 % for Q5_K, whose 5-bit grid is already fine next to its
    6-bit sub-block scales)."""
    torch.manual_seed(0)
    w = torch.randn(16, 512) * 0.02
    w[3, 40] = 0.3
    qw, kb = _encode(type_name, w)
    ours = qw.dequantize().numpy()
    signround_err = float(((ours - w.numpy()) ** 2).sum() / (w.numpy() ** 2).sum())
    assert 0 < kb.rel_mse < bound * signround_err


def test_q3_k_and_q5_k_hold_scales_already_on_their_sub_block_grid_exactly() -> None:
    rng = np.random.default_rng(1)
    d = np.float32(2.0 ** -12)
    sc = rng.integers(-31, 32, size=(3, 2, 16)).astype(np.float32)
    sc[..., 0] = 31  # the largest |s| sets d = max |s| / 31
    sc[sc == 0] = 1  # SignRound's sym scales are never 0
    codes = rng.integers(0, 8, size=(3, 512))
    kb = gguf_kquants.encode_q3_k(codes, (d * sc).reshape(3, 32))
    assert kb.rel_mse == 0 and kb.codes_changed == 0
    want = (d * sc).reshape(3, 32).repeat(16, 1) * (codes - 4)
    np.testing.assert_array_equal(gguf.quants.dequantize(kb.blocks, gguf.GGMLQuantizationType.Q3_K), want)

    check_asym_k_exact(gguf_kquants.encode_q5_k, gguf.GGMLQuantizationType.Q5_K, 3, 32, rng)


def _grid(t: str) -> dict:
    b, sym, g = GGUF_KTYPES[t]
    return {"bits": b, "group_size": g, "sym": sym}


def test_llama_cpp_mixes_for_q3_and_q5() -> None:
    """llama-quant.cpp's rules on 16 layers (in_features 256, n_gqa 2): q3_k_s and q5_k_s raise
    nothing; q3_k_m: attn_v 0-1 and ffn_down of the first sixteenth Q5_K, the other attn_v / ffn_down
    and every attn_output Q4_K; q3_k_l: all three Q5_K; q4_k_s: attn_v 0-3 and ffn_down of the first
    eighth Q5_K; q5_k_m: attn_v and ffn_down of the use_more_bits layers Q6_K."""
    model = tiny_text_model("llama", num_hidden_layers=16, hidden_size=256, intermediate_size=256)
    assert llama_cpp_mix("gguf:q3_k_s", model) == {} == llama_cpp_mix("gguf:q5_k_s", model)
    mix = llama_cpp_mix("gguf:q3_k_m", model)
    want = {}
    for i in range(16):
        want[f"model.layers.{i}.self_attn.v_proj"] = _grid("q5_k" if i < 2 else "q4_k")
        want[f"model.layers.{i}.mlp.down_proj"] = _grid("q5_k" if i < 1 else "q4_k")
        want[f"model.layers.{i}.self_attn.o_proj"] = _grid("q4_k")
    assert mix == want
    more = [0, 1, 4, 7, 10, 13, 14, 15]  # i < 2, i >= 14, (i - 2) % 3 == 2
    mix = llama_cpp_mix("gguf:q5_k_m", model)
    assert mix == {f"model.layers.{i}.{m}": _grid("q6_k") for i in more for m in ("self_attn.v_proj", "mlp.down_proj")}
    assert mix == {n: _grid("q6_k") for n in llama_cpp_mix("gguf:q4_k_m", model)}  # q4_k_m raises the same layers
    leaves = ("self_attn.v_proj", "mlp.down_proj", "self_attn.o_proj")
    assert llama_cpp_mix("gguf:q3_k_l", model) == {f"model.layers.{i}.{m}": _grid("q5_k") for i in range(16) for m in leaves}
    assert llama_cpp_mix("gguf:q4_k_s", model) == {  # attn_v of layers 0-3, ffn_down of the first eighth
        **{f"model.layers.{i}.self_attn.v_proj": _grid("q5_k") for i in range(4)},
        **{f"model.layers.{i}.mlp.down_proj": _grid("q5_k") for i in range(2)}}


def test_narrow_layers_take_llama_cpp_fallbacks() -> None:
    """in_features 64: Q3_K -> Q4_0 (W4 sym g32) for every base layer; Q5_K needs no entry (Q5_1 holds
    W5 asym g32 exactly); a raised Q4_K stays W4 asym g32 (written as Q4_1)."""
    model = tiny_text_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=256)
    mix = llama_cpp_mix("gguf:q3_k_s", model)
    narrow = {n for n, m in model.named_modules() if n.startswith("model.layers.") and getattr(m, "in_features", 0) == 64}
    assert mix == dict.fromkeys(narrow, {"bits": 4, "group_size": 32, "sym": True})
    assert gguf_type("gguf:q5_k_s", SPECS["q5_k"], 64) == "q5_1" and gguf_type("gguf:q5_k_s", SPECS["q5_k"], 256) == "q5_k"
    assert llama_cpp_mix("gguf:q5_k_s", model) == {}
    mix = llama_cpp_mix("gguf:q3_k_m", model)
    assert mix["model.layers.1.self_attn.o_proj"] == _grid("q4_k")  # in 64: stored as Q4_1
    assert mix["model.layers.0.mlp.down_proj"] == _grid("q4_k")  # in 256, layer 0 >= 2 // 16: Q4_K
    assert mix["model.layers.0.self_attn.q_proj"] == {"bits": 4, "group_size": 32, "sym": True}


@pytest.mark.parametrize("fmt", ["q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q5_k_s", "q5_k_m"])
def test_file_holds_the_mix_with_the_reported_error(tmp_path: Path, fmt: str) -> None:
    """Write + read with the gguf reader: file type, each layer's type from the mix, its values the
    re-quantized weights whose error against SignRound's grid the file's report gives."""
    model = tiny_text_model("qwen2", num_hidden_layers=2, **WIDE)
    mix = llama_cpp_mix(f"gguf:{fmt}", model)
    base = SPECS[GGUF_KBASE[fmt]]
    results = rtn_state(model, base, override={n: QuantSpec(g["bits"], g["group_size"], g["sym"]) for n, g in mix.items()})
    with pytest.warns(UserWarning, match=rf"gguf:{fmt} re-quantizes SignRound's fp16 group scales.*"
                                         rf"layer\(s\) {GGUF_KBASE[fmt].upper()}"):
        out = save_quantized(model, results, tmp_path / "g", format=f"gguf:{fmt}", inplace=False)
    reader = gguf.GGUFReader(str(out / f"model-{fmt}.gguf"))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(getattr(gguf.LlamaFileType, f"MOSTLY_{fmt.upper()}"))
    report = json.loads(bytes(reader.fields["signround.requantization"].parts[-1]).decode())
    tensors = {t.name: t for t in reader.tensors}
    seen = set()
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for hf, name in names.items():
            module = f"model.layers.{i}.{hf}"
            want = gguf_type(f"gguf:{fmt}", results[module].spec, 256)
            assert want in GGUF_KFORMATS[fmt]
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type == getattr(gguf.GGMLQuantizationType, want.upper()), module
            w = layer.get_submodule(hf).weight.detach().numpy()  # SignRound's grid (RTN), in the model
            assert tuple(int(x) for x in t.shape) == (w.shape[1], w.shape[0])
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            rel = float(((deq - w) ** 2).sum() / (w ** 2).sum())
            assert report["layers"][module]["type"] == want
            assert report["layers"][module]["rel_mse"] == pytest.approx(rel, rel=1e-4, abs=1e-12) and rel < 2e-3
            seen.add(want)
    assert seen == {GGUF_KBASE[fmt], *(gguf_type(f"gguf:{fmt}", QuantSpec(g["bits"], g["group_size"], g["sym"]), 256)
                                       for g in mix.values())}
    assert report["exact"] == []


def test_narrow_model_q3_k_s_and_q5_k_s_write_the_exact_fallbacks(tmp_path: Path) -> None:
    """hidden 64: q3_k_s's mix puts those layers at W4 sym g32, written Q4_0; q5_k_s's W5 asym g32 there
    is Q5_1 (both exact, listed in the report); ffn_down (in_features 256) is the k type."""
    for fmt, q_type, exact in (("q3_k_s", "Q4_0", "Q4_0"), ("q5_k_s", "Q5_1", "Q5_1")):
        model = tiny_text_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=256)
        mix = llama_cpp_mix(f"gguf:{fmt}", model)
        results = rtn_state(model, SPECS[GGUF_KBASE[fmt]],
                            override={n: QuantSpec(g["bits"], g["group_size"], g["sym"]) for n, g in mix.items()})
        with pytest.warns(UserWarning, match=r"12 layer\(s\) written exactly as 32-weight blocks"):
            out = save_quantized(model, results, tmp_path / fmt, format=f"gguf:{fmt}", inplace=False)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / f"model-{fmt}.gguf")).tensors}
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == exact == q_type
        assert types["blk.0.ffn_down.weight"] == GGUF_KBASE[fmt].upper()


def test_transformers_reads_a_q3_k_m_file_as_the_weights_we_report(tmp_path: Path) -> None:
    """transformers' GGUF loader (the gguf package's Q3_K / Q4_K / Q5_K dequantization, llama's q/k
    permutation undone) gives the logits of our model holding the re-quantized weights."""
    from checkpoint_helpers import logits
    from transformers import AutoModelForCausalLM

    from signround.adapters.checkpoint.gguf import encode_kquant
    from signround.rounding.grid import QuantizedWeight, from_groups, quantize_codes, to_groups

    model = tiny_text_model("llama", num_hidden_layers=2, **WIDE)
    mix = llama_cpp_mix("gguf:q3_k_m", model)
    results = rtn_state(model, SPECS["q3_k"], override={n: QuantSpec(g["bits"], g["group_size"], g["sym"])
                                                        for n, g in mix.items()})
    with pytest.warns(UserWarning, match="re-quantizes"):
        out = save_quantized(model, results, tmp_path / "g", format="gguf:q3_k_m", inplace=False)
    on_grid = logits(model)
    with torch.no_grad():
        for name, r in results.items():
            lin = model.get_submodule(name)
            codes = quantize_codes(to_groups(lin.weight, r.spec.group_size), r.scale.float(), r.zero.float(), r.spec)
            qw = QuantizedWeight(from_groups(codes, lin.in_features).int(), r.scale, r.zero, r.spec)
            lin.weight.copy_(torch.from_numpy(encode_kquant(qw, gguf_type("gguf:q3_k_m", r.spec, 256)).dequantized))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-q3_k_m.gguf").eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=2e-3)
    assert float((logits(theirs) - on_grid).abs().max()) > 1e-2  # SignRound's grid itself is not what the file holds
