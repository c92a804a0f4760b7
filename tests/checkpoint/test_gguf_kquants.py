"""GGUF k-quants (gguf:q4_k_m, gguf:q2_k_s): SignRound grids re-quantized into Q4_K / Q6_K / Q2_K
blocks, read back with the gguf package's dequantizer (bit for bit what we claim), the error the
re-quantization adds (reported, in the file too), and the construction-time refusals. llama.cpp
itself: tests/checkpoint/llama_cpp_check.py (not CI), results in spec/format.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import check_asym_k_exact, rtn_state
from tiny_models import tiny_text_model

from signround.adapters.checkpoint import gguf_kquants
from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.gguf import encode_kquant, llama_cpp_mix
from signround.adapters.checkpoint.targets import UnloadableError
from signround.adapters.frontends.facade import AutoRound
from signround.rounding import QuantSpec
from signround.rounding.grid import QuantizedWeight, from_groups, quantize_codes, quantize_weight, to_groups

gguf = pytest.importorskip("gguf")
KTYPES = {"q4_k": QuantSpec(4, 32, False), "q6_k": QuantSpec(6, 16, True), "q2_k": QuantSpec(2, 16, False)}
WIDE = dict(hidden_size=256, intermediate_size=512)  # in_features multiples of the 256-weight super-block


def _encode(type_name: str, spec: QuantSpec, w: torch.Tensor):
    qw = quantize_weight(w, spec)
    args = (qw.codes.numpy(), qw.scale.float().numpy()) + (() if spec.sym else (qw.zero.numpy(),))
    return qw, getattr(gguf_kquants, f"encode_{type_name}")(*args)


@pytest.mark.parametrize("type_name", KTYPES)
def test_blocks_dequantize_to_what_we_claim_and_the_added_error_is_small(type_name: str) -> None:
    spec = KTYPES[type_name]
    torch.manual_seed(0)
    w = torch.randn(16, 512) * 0.02
    w[3, 40] = 0.3  # an outlier group: its scale is far from the super-block's others
    qw, kb = _encode(type_name, spec, w)
    qtype = getattr(gguf.GGMLQuantizationType, type_name.upper())
    assert kb.blocks.shape == (16, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    np.testing.assert_array_equal(gguf.quants.dequantize(kb.blocks, qtype), kb.dequantized)  # ggml's arithmetic
    ours = qw.dequantize().numpy()
    err = float(((kb.dequantized - ours) ** 2).sum() / (ours ** 2).sum())
    assert kb.rel_mse == pytest.approx(err, rel=1e-6) and kb.rel_mse > 0
    signround_err = float(((ours - w.numpy()) ** 2).sum() / (w.numpy() ** 2).sum())
    assert kb.rel_mse < 0.1 * signround_err  # measured 3-4 % of SignRound's own error (spec/format.md)


def test_scales_already_on_the_sub_block_grid_are_written_exactly() -> None:
    """d·sc scales and dmin·m offsets with the largest at 63: Q4_K holds the grid, no code moves."""
    check_asym_k_exact(gguf_kquants.encode_q4_k, gguf.GGMLQuantizationType.Q4_K, 4, 16, np.random.default_rng(0))


def test_q4_k_m_file_holds_the_llama_cpp_mix_and_reports_the_error(tmp_path: Path) -> None:
    model = tiny_text_model("qwen2", **WIDE)
    mix = llama_cpp_mix("gguf:q4_k_m", model)  # use_more_bits: layer 1 of 2 takes Q6_K for attn_v, ffn_down
    six = {f"model.layers.1.{m}": KTYPES["q6_k"] for m in ("self_attn.v_proj", "mlp.down_proj")}
    assert mix == {n: {"bits": 6, "group_size": 16, "sym": True} for n in six}
    results = rtn_state(model, KTYPES["q4_k"], override=six)
    with pytest.warns(UserWarning, match=r"re-quantizes SignRound's fp16 group scales.*12 layer\(s\) Q4_K.*"
                                         r"2 layer\(s\) Q6_K"):
        out = save_quantized(model, results, tmp_path / "g", format="gguf:q4_k_m", inplace=False)
    reader = gguf.GGUFReader(str(out / "model-q4_k_m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    report = json.loads(bytes(reader.fields["signround.requantization"].parts[-1]).decode())
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    for i, layer in enumerate(model.model.layers):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.v_proj", "attn_v"), ("mlp.down_proj", "ffn_down")):
            module = f"model.layers.{i}.{hf}"
            t = tensors[f"blk.{i}.{name}.weight"]
            want = "q6_k" if module in six else "q4_k"
            w = layer.get_submodule(hf).weight.detach().numpy()  # SignRound's grid (RTN), in the model
            assert t.tensor_type == getattr(gguf.GGMLQuantizationType, want.upper())
            assert tuple(int(x) for x in t.shape) == (w.shape[1], w.shape[0])
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            rel = float(((deq - w) ** 2).sum() / (w ** 2).sum())
            assert report["layers"][module]["type"] == want
            assert report["layers"][module]["rel_mse"] == pytest.approx(rel, rel=1e-5, abs=1e-12) and rel < 1e-3
    assert report["exact"] == []


def test_q2_k_s_writes_q2_k_and_narrow_layers_fall_to_exact_types(tmp_path: Path) -> None:
    """in_features 64 is no super-block: a W4 asym g32 layer there is Q4_1 (SignRound's grid as is)."""
    model = tiny_text_model("qwen2", hidden_size=256, intermediate_size=64)
    down = "model.layers.0.mlp.down_proj"  # in_features 64
    results = rtn_state(model, KTYPES["q2_k"], override={down: KTYPES["q4_k"]},
                        skip=["model.layers.1.mlp.down_proj"])
    with pytest.warns(UserWarning, match=r"Q2_K.*1 layer\(s\) written exactly as 32-weight blocks"):
        out = save_quantized(model, results, tmp_path / "g", format="gguf:q2_k_s", inplace=False)
    reader = gguf.GGUFReader(str(out / "model-q2_k_s.gguf"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q2_K
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_1
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F16


def test_grids_a_format_does_not_hold_are_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gguf:q4_k_m.*W4 g128 asym with no GGUF type in this format; gguf:q4_k_m "
                                         r"writes W4 asym g32 \(q4_k, scales re-quantized\)"):
        AutoRound(tiny_text_model("qwen2", **WIDE), None, group_size=128, sym=False, recipe="rtn", progress=False,
                  format="gguf:q4_k_m")
    # an exact format never re-quantizes: a k grid there is refused, not silently changed
    with pytest.raises(ValueError, match="W6 g16 sym with no exact GGUF type"):
        AutoRound(tiny_text_model("qwen2", **WIDE), None, bits=6, group_size=16, recipe="rtn", progress=False,
                  format="gguf:q8_0")
    # a k grid on a narrow layer: the llama.cpp target sees it before any work; the writer always does
    with pytest.raises(UnloadableError, match="in_features 64 is not a multiple of 256"):
        AutoRound(tiny_text_model("qwen2"), None, bits=6, group_size=16, recipe="rtn", progress=False,
                  format="gguf:q4_k_m", target="llama.cpp")
    model = tiny_text_model("qwen2")
    with pytest.raises(ValueError, match="in_features 64 is not a multiple of 256"):
        save_quantized(model, rtn_state(model, KTYPES["q6_k"]), tmp_path / "n", format="gguf:q4_k_m", inplace=False)
    assert not (tmp_path / "n").exists()
    with pytest.raises(ValueError, match="not a k-quant GGUF format"):
        llama_cpp_mix("gguf:q4_0", model)


def test_llama_cpp_mix_layers() -> None:
    """llama.cpp's choices: q4_k_m's use_more_bits layers (Q6_K, or its Q8_0 fallback on a narrow
    layer); q2_k_s's first-eighth ffn_down and, at n_gqa 4, every attn_v as Q4_K, narrow Q2_K layers
    as Q4_0."""
    model = tiny_text_model("llama", num_hidden_layers=8, hidden_size=64, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=1)
    mix = llama_cpp_mix("gguf:q4_k_m", model)
    assert sorted(mix) == sorted(f"model.layers.{i}.{m}" for i in (0, 3, 6, 7)
                                 for m in ("self_attn.v_proj", "mlp.down_proj"))
    assert mix["model.layers.3.mlp.down_proj"] == {"bits": 6, "group_size": 16, "sym": True}  # in_features 256
    assert mix["model.layers.3.self_attn.v_proj"] == {"bits": 8, "group_size": 32, "sym": True}  # 64: Q8_0
    mix = llama_cpp_mix("gguf:q2_k_s", model)
    q4_k = {"bits": 4, "group_size": 32, "sym": False}
    raised = ["model.layers.0.mlp.down_proj", *(f"model.layers.{i}.self_attn.v_proj" for i in range(8))]
    assert {n: g for n, g in mix.items() if g == q4_k} == dict.fromkeys(raised, q4_k)
    # Q2_K layers of in_features 64 take llama.cpp's fallback, Q4_0 (W4 sym g32); ffn_down (256) stays Q2_K
    narrow = {n for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "in_features")
              and m.in_features == 64 and n not in raised}
    assert {n for n, g in mix.items() if g != q4_k} == narrow and len(narrow) == 8 * 5
    assert {str(mix[n]) for n in narrow} == {str({"bits": 4, "group_size": 32, "sym": True})}


def test_cli_writes_q4_k_m_with_the_mix_as_layer_config(tmp_path: Path) -> None:
    """The spec's commands: signround gguf-mix, then quantize --asym --group-size 32 --format gguf:q4_k_m
    --layer-config mix.json."""
    from checkpoint_helpers import tiny_tokenizer
    from typer.testing import CliRunner

    from signround.cli import app

    model = tiny_text_model("qwen2", **WIDE)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    mix = CliRunner().invoke(app, ["gguf-mix", str(tmp_path / "m"), "--format", "gguf:q4_k_m"])
    assert mix.exit_code == 0 and json.loads(mix.output) == llama_cpp_mix("gguf:q4_k_m", model), mix.output
    (tmp_path / "mix.json").write_text(mix.output)
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--recipe", "rtn",
                                   "--group-size", "32", "--asym", "--format", "gguf:q4_k_m",
                                   "--layer-config", str(tmp_path / "mix.json")])
    assert res.exit_code == 0, res.output
    assert "re-quantizes SignRound's fp16 group scales" in res.output  # the user is told what changed
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "q" / "model-q4_k_m.gguf")).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q6_K
    assert types["blk.0.ffn_down.weight"] == types["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K


def test_transformers_reads_the_k_quant_file_as_the_weights_we_report(tmp_path: Path) -> None:
    """transformers' GGUF loader (its own k-quant dequantization, llama's q/k permutation undone)
    gives the logits of our model holding the re-quantized weights: the file is what we claim."""
    from checkpoint_helpers import logits
    from transformers import AutoModelForCausalLM

    model = tiny_text_model("llama", **WIDE)
    results = rtn_state(model, KTYPES["q4_k"], override={"model.layers.0.mlp.down_proj": KTYPES["q6_k"]})
    with pytest.warns(UserWarning, match="re-quantizes"):
        out = save_quantized(model, results, tmp_path / "g", format="gguf:q4_k_m", inplace=False)
    on_grid = logits(model)
    with torch.no_grad():
        for name, r in results.items():
            lin = model.get_submodule(name)
            codes = quantize_codes(to_groups(lin.weight, r.spec.group_size), r.scale.float(), r.zero.float(), r.spec)
            qw = QuantizedWeight(from_groups(codes, lin.in_features).int(), r.scale, r.zero, r.spec)
            lin.weight.copy_(torch.from_numpy(encode_kquant(qw, {4: "q4_k", 6: "q6_k"}[r.spec.bits]).dequantized))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-q4_k_m.gguf").eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=2e-3)
    assert float((logits(theirs) - on_grid).abs().max()) > 1e-2  # SignRound's grid itself is not what the file holds
