"""save_quantized: tensors, config, side files, sharding, atomic writes, inplace semantics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from checkpoint_helpers import logits, rtn_state, tiny_tokenizer
from tiny_models import tiny_text_model, tiny_vlm
from torch import nn

from signround.adapters.checkpoint import files as ckpt
from signround.adapters.hf.blocks import find_block_lists
from signround.adapters.checkpoint.files import checkpoint_keys, iter_tensors
from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.rounding import QuantSpec, Recipe


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


CASES = {  # id: (spec, expected packing_format)
    "w4-sym": (QuantSpec(4, 32, True), "auto_round:auto_gptq"),
    "w4-asym": (QuantSpec(4, 32, False), "auto_round:auto_awq"),  # as auto-round 0.16 writes it
    "w3-sym": (QuantSpec(3, 32, True), "auto_round:auto_gptq"),
    "w3-asym": (QuantSpec(3, 32, False), "auto_round"),
    "w2-sym": (QuantSpec(2, 32, True), "auto_round:auto_gptq"),
    "w8-sym": (QuantSpec(8, 64, True), "auto_round:auto_gptq"),
}


@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq", "auto_round:auto_awq"])
def test_8bit_asym_is_refused_with_the_reason(tmp_path: Path, fmt: str) -> None:
    """As auto-round 0.16.1 refuses it: vLLM serves 8-bit GPTQ/AWQ weights sym only."""
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, False), override={"model.layers.1.mlp.down_proj": QuantSpec(8, -1, False)})
    with pytest.raises(ValueError, match="8-bit asymmetric weights cannot be written.*model.layers.1.mlp.down_proj"):
        save_quantized(model, results, tmp_path / "c", format=fmt, inplace=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_awq_format_packs_every_asym_width_along_out(tmp_path: Path, bits: int) -> None:
    """format auto_round:auto_awq: qweight [K, N·bits/32] (the layout vLLM's Humming AWQ schema reads)."""
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(bits, 32, False))
    out = save_quantized(model, results, tmp_path / "c", format="auto_round:auto_awq", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["packing_format"] == "auto_round:auto_awq" and qc["bits"] == bits
    t = tensors(out)
    for name in results:
        m = model.get_submodule(name)
        assert tuple(t[f"{name}.qweight"].shape) == (m.in_features, m.out_features * bits // 32)
    with pytest.raises(ValueError, match="writes zero-pointed .asym. layers only"):
        save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "s", format="auto_round:auto_awq")


@pytest.mark.parametrize("case", CASES)
def test_auto_round_tensors_and_config(tmp_path: Path, case: str) -> None:
    spec, packing = CASES[case]
    model = tiny_text_model("qwen2")  # fp32, q/k/v with bias
    results = rtn_state(model, spec)
    out = save_quantized(model, results, tmp_path / "ckpt", format="auto_round", inplace=False,
                         tokenizer=tiny_tokenizer(), recipe=Recipe(iters=0, nsamples=16))
    t = tensors(out)
    bits, gs = spec.bits, (spec.group_size if spec.group_size > 0 else None)
    for name, module in model.named_modules():
        if name in results:
            k, n = module.in_features, module.out_features
            g = k // gs if gs and gs < k else 1
            assert f"{name}.weight" not in t
            qshape = (k, n * bits // 32) if packing.endswith("awq") else (k * bits // 32, n)  # AWQ packs along N
            assert (t[f"{name}.qweight"].dtype, tuple(t[f"{name}.qweight"].shape)) == (torch.int32, qshape)
            assert (t[f"{name}.qzeros"].dtype, tuple(t[f"{name}.qzeros"].shape)) == (torch.int32, (g, n * bits // 32))
            assert (t[f"{name}.scales"].dtype, tuple(t[f"{name}.scales"].shape)) == (torch.float16, (g, n))
            assert f"{name}.g_idx" not in t
            if module.bias is not None:
                assert t[f"{name}.bias"].dtype == torch.float16
            if case == "w4-sym":
                assert bool((t[f"{name}.qzeros"] == 0x77777777).all())
    assert t["model.embed_tokens.weight"].dtype == torch.float32  # non-quantized: kept as is
    assert t["lm_head.weight"].dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantization_config.json").read_text())
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == packing
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["data_type"]) == (bits, spec.group_size, spec.sym, "int")
    assert qc["block_name_to_quantize"] == "model.layers"
    assert qc["iters"] == 0 and qc["nsamples"] == 16 and "seqlen" not in qc and "lr" not in qc
    assert qc["autoround_version"] and qc["signround_version"]
    assert "extra_config" not in qc
    assert config["torch_dtype"] == "float32"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f


def test_4bit_asym_with_other_widths_stays_native(tmp_path: Path) -> None:
    """format auto_round writes asym AWQ-packed only when every layer is 4-bit (auto-round 0.16.1's
    rule): one 3-bit layer keeps the whole checkpoint native."""
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, False), override={"model.layers.1.mlp.down_proj": QuantSpec(3, 32, False)})
    out = save_quantized(model, results, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["packing_format"] == "auto_round"
    assert tuple(tensors(out)["model.layers.0.mlp.down_proj.qweight"].shape) == (128 * 4 // 32, 64)  # packed along K


def test_extra_config_for_mixed_layers(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    spec = QuantSpec(4, 32, True)
    results = rtn_state(model, spec, skip=["model.layers.0.mlp.down_proj"],
                        override={"model.layers.1.mlp.down_proj": QuantSpec(8, 32, True)}, extra=["lm_head"])
    out = save_quantized(model, results, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["extra_config"] == {
        "model.layers.0.mlp.down_proj": {"bits": 16},
        "model.layers.1.mlp.down_proj": {"bits": 8},
        "lm_head": {"bits": 4, "group_size": 32, "sym": True, "data_type": "int"},
    }
    t = tensors(out)
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert tuple(t["model.layers.1.mlp.down_proj.qweight"].shape) == (128 * 8 // 32, 64)
    assert "lm_head.qweight" in t


def test_auto_gptq(tmp_path: Path) -> None:
    model = tiny_text_model("qwen2")
    results = rtn_state(model, QuantSpec(4, 32, True), skip=["model.layers.0.mlp.down_proj"])
    out = save_quantized(model, results, tmp_path / "gptq", format="auto_gptq")
    t = tensors(out)
    name = "model.layers.1.self_attn.q_proj"
    assert t[f"{name}.g_idx"].dtype == torch.int32
    assert torch.equal(t[f"{name}.g_idx"], (torch.arange(64) // 32).to(torch.int32))
    assert bool((t[f"{name}.qzeros"] == 0x77777777).all())
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["desc_act"] is False and qc["sym"] is True
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["block_name_to_quantize"] == "model.layers"
    assert qc["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}}
    assert config["torch_dtype"] == "float16"
    assert t["model.embed_tokens.weight"].dtype == torch.float16  # fp32 follows the declared fp16


def test_vlm_uses_checkpoint_names(tmp_path: Path) -> None:
    model = tiny_vlm("qwen2_vl").to(torch.bfloat16)
    assert find_block_lists(model) == ["model.language_model.layers"]
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = save_quantized(model, results, tmp_path / "vl")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # module prefix (transformers >= 5) and checkpoint prefix, as auto-round 0.16.1 writes them
    assert qc["block_name_to_quantize"] == "model.language_model.layers,model.layers"
    t = tensors(out)
    assert "model.layers.0.self_attn.q_proj.qweight" in t  # checkpoint namespace, like save_pretrained
    assert t["visual.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16  # vision tower untouched
    assert not any(k.startswith("model.language_model.") for k in t)


def test_sharded_save(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    out = save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "s", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(checkpoint_keys(out))


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    calls = []

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return st.save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, results, tmp_path / "out", max_shard_size="40KB")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no out dir, no temp dir
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in results)


def test_failure_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = save_quantized(model, results, tmp_path / "out", inplace=False)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, results, out, overwrite=True, inplace=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_empty_out_dir_refused(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_quantized(model, results, out, inplace=False)
    with pytest.raises(FileExistsError, match="not a quantized checkpoint"):  # overwrite replaces checkpoints only
        save_quantized(model, results, out, inplace=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    ckpt_dir = save_quantized(model, results, tmp_path / "ckpt", inplace=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(model, results, ckpt_dir, inplace=False)
    save_quantized(model, results, ckpt_dir, inplace=False, overwrite=True)
    assert (ckpt_dir / "config.json").is_file()
    (tmp_path / "empty").mkdir()
    save_quantized(model, results, tmp_path / "empty", inplace=False)  # an empty dir is fine


def test_inplace_false_keeps_model_usable(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    before = logits(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_quantized(model, results, tmp_path / "a", inplace=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), before)
    assert not hasattr(model.config, "quantization_config")


def test_inplace_packs_the_model(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    before = logits(model)
    save_quantized(model, results, tmp_path / "a", inplace=True)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(results) == 14
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)
    assert model.config.quantization_config["quant_method"] == "auto-round"
    with pytest.raises(ValueError, match="already packed"):
        save_quantized(model, results, tmp_path / "b")


def test_several_formats_go_to_subfolders(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = save_quantized(model, results, tmp_path / "multi", format=["auto_round", "auto_gptq"])
    assert out == {"auto_round": tmp_path / "multi" / "auto-round", "auto_gptq": tmp_path / "multi" / "auto-gptq"}
    assert json.loads((out["auto_round"] / "config.json").read_text())["quantization_config"]["quant_method"] == "auto-round"
    assert json.loads((out["auto_gptq"] / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert any(isinstance(m, QuantLinear) for m in model.modules())  # inplace applies to the last format


def test_weight_off_grid_is_refused(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(4, 32, True))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] += 1e-3
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.up_proj: the weight is not on the"):
        save_quantized(model, results, tmp_path / "x", inplace=False)
    assert not (tmp_path / "x").exists()


def test_bad_format_and_empty_results(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    with pytest.raises(ValueError, match="unknown export format"):
        save_quantized(model, rtn_state(model, QuantSpec()), tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(model, {}, tmp_path / "x")


def test_vlm_processor_saved_beside(tmp_path: Path) -> None:
    from transformers import Qwen2VLImageProcessor

    model = tiny_vlm("qwen2_vl")
    image_processor = Qwen2VLImageProcessor()
    out = save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "vl",
                         tokenizer=tiny_tokenizer(), image_processor=image_processor)
    assert (out / "preprocessor_config.json").is_file()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg or (out / "chat_template.jinja").is_file()
