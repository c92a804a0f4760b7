"""load_quantized: every family and format round-trips to the fake-quant model's logits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import logits, rtn_state, tiny_tokenizer
from tiny_models import VLM_FAMILIES, tiny_text_model, tiny_vlm

from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.loader import load_quantized
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.rounding import QuantSpec


def _generate(model: torch.nn.Module, n: int = 4) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 33, 42, 7]])
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", *VLM_FAMILIES])
def test_family_roundtrip(tmp_path: Path, family: str) -> None:
    model = tiny_text_model(family) if family in ("llama", "qwen2") else tiny_vlm(family)
    results = rtn_state(model, QuantSpec(4, 32, True))
    assert results
    ref, ref_tokens = logits(model), _generate(model)
    out = save_quantized(model, results, tmp_path / family, tokenizer=tiny_tokenizer())
    loaded = load_quantized(out)
    assert type(loaded) is type(model)
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(results)
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=1e-4)
    tokens = _generate(loaded)
    assert tokens.shape == (1, 9) and torch.equal(tokens, ref_tokens)


FORMATS = [
    ("auto_round", QuantSpec(4, 32, True)), ("auto_round", QuantSpec(4, 32, False)),
    ("auto_round", QuantSpec(3, 32, True)), ("auto_round", QuantSpec(3, 64, False)),
    ("auto_round", QuantSpec(2, 32, True)), ("auto_round", QuantSpec(8, 32, True)),
    ("auto_round:auto_awq", QuantSpec(3, 32, False)), ("auto_round:auto_awq", QuantSpec(2, 64, False)),
    ("auto_gptq", QuantSpec(4, 32, True)),
    ("auto_gptq", QuantSpec(3, 32, True)), ("auto_gptq", QuantSpec(2, 64, True)),
]


@pytest.mark.parametrize(("fmt", "spec"), FORMATS, ids=lambda v: str(v))
def test_format_roundtrip(tmp_path: Path, fmt: str, spec: QuantSpec) -> None:
    model = tiny_text_model("qwen2")
    results = rtn_state(model, spec)
    ref = logits(model)
    out = save_quantized(model, results, tmp_path / "c", format=fmt, inplace=False)
    loaded = load_quantized(out, dtype=torch.float32)
    # auto_gptq stores the fp32 embeddings/norms in its declared fp16: only the packed layers are exact
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=1e-4 if fmt != "auto_gptq" else 5e-3)
    for name, r in results.items():
        ql = loaded.get_submodule(name)
        assert isinstance(ql, QuantLinear) and ql.spec == r.spec
        assert torch.equal(ql.dequantize(torch.float32), model.get_submodule(name).weight)


def test_auto_gptq_default_dtype_is_fp16(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    out = save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "g", format="auto_gptq")
    loaded = load_quantized(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert torch.isfinite(logits(loaded)).all()


def test_mixed_layers_sharded_and_bf16(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tiny_models import text_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(text_config("llama"), dtype=torch.bfloat16).eval()
    results = rtn_state(model, QuantSpec(4, 32, True), skip=["model.layers.0.mlp.down_proj"],
                        override={"model.layers.1.self_attn.o_proj": QuantSpec(7, 64, False)}, extra=["lm_head"])
    ref = logits(model)
    out = save_quantized(model, results, tmp_path / "m", inplace=False, max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").is_file()
    loaded = load_quantized(out)
    assert loaded.dtype == torch.bfloat16
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert loaded.model.layers[1].self_attn.o_proj.spec == QuantSpec(7, 64, False)
    assert isinstance(loaded.lm_head, QuantLinear)
    torch.testing.assert_close(logits(loaded), ref, rtol=0, atol=1e-2)


def test_tied_embeddings(tmp_path: Path) -> None:
    model = tiny_text_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = save_quantized(model, results, tmp_path / "t", inplace=False)
    loaded = load_quantized(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-4)


def test_loader_stays_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    model = tiny_vlm("qwen2_vl")
    out = save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "o")

    def no_network(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("load_quantized tried to reach the Hub")

    for fn in ("hf_hub_download", "snapshot_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, fn, no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_quantized(out)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_quantized(tmp_path / "Qwen--Qwen2-VL-2B-Instruct")


def test_inplace_packed_model_equals_loaded(tmp_path: Path) -> None:
    model = tiny_vlm("gemma3")
    results = rtn_state(model, QuantSpec(4, 32, False))
    fake = copy.deepcopy(model)
    out = save_quantized(model, results, tmp_path / "p", inplace=True)
    loaded = load_quantized(out)
    for a, b, c in ((logits(model), logits(loaded), logits(fake)),):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-4)
        torch.testing.assert_close(b, c, rtol=0, atol=1e-4)
