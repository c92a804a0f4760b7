"""GGUF export (gguf:q4_0 / q4_1 / q5_0 / q5_1 / q8_0) through the gguf package's writer, read back with its
reader (tensor types, shapes, dequantized values vs ours) and by transformers' GGUF loader.
llama.cpp itself: spec/format.md (tests/checkpoint/llama_cpp_check.py, not run in CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import logits, rtn_state
from tiny_models import tiny_text_model

from signround.adapters.checkpoint.export import export_view, save_quantized
from signround.adapters.checkpoint.targets import LLAMA_CPP, check
from signround.adapters.frontends.facade import AutoRound
from signround.rounding import QuantSpec

gguf = pytest.importorskip("gguf")
CASES = {"q4_0": QuantSpec(4, 32, True), "q4_1": QuantSpec(4, 32, False), "q5_0": QuantSpec(5, 32, True),
         "q5_1": QuantSpec(5, 32, False), "q8_0": QuantSpec(8, 32, True)}
V = "model.layers.0.self_attn.v_proj"


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the cat sat on the mat " * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _write(tmp_path: Path, family: str, fmt: str, spec: QuantSpec, **kw):
    tokenizer = kw.pop("tokenizer", None)
    model = tiny_text_model(family)
    results = rtn_state(model, spec, **kw)
    out = save_quantized(model, results, tmp_path / "g", format=f"gguf:{fmt}", inplace=False, tokenizer=tokenizer)
    (path,) = out.glob("*.gguf")
    return model, results, path


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("fmt", CASES)
def test_reader_types_shapes_and_values(tmp_path: Path, family: str, fmt: str) -> None:
    spec = CASES[fmt]
    model, results, path = _write(tmp_path, family, fmt, spec)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    for i, layer in enumerate(model.model.layers):
        for hf, name in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            t = tensors[f"blk.{i}.{name}.weight"]
            w = layer.get_submodule(hf).weight.detach().numpy()
            assert t.tensor_type == qtype and tuple(int(x) for x in t.shape) == (w.shape[1], w.shape[0])
            deq = gguf.quants.dequantize(t.data, t.tensor_type)
            # Q4_0 / Q5_0 / Q8_0 hold our codes and fp16 scales exactly; Q4_1 / Q5_1 round m = -scale·zero to fp16
            np.testing.assert_allclose(deq, w, rtol=0, atol=0 if fmt not in ("q4_1", "q5_1") else 1e-3 * np.abs(w).max())
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == family
    assert int(fields[f"{family}.block_count"].parts[-1][0]) == len(model.model.layers)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_transformers_reads_the_gguf(tmp_path: Path, family: str) -> None:
    """transformers' GGUF loader dequantizes it (and undoes llama's q/k permutation): same logits
    up to the fp16 embeddings and norms."""
    from transformers import AutoModelForCausalLM

    model, _, path = _write(tmp_path, family, "q4_0", CASES["q4_0"])
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=2e-3)


def test_mixed_types_tokenizer_and_full_precision(tmp_path: Path) -> None:
    kept = "model.layers.1.mlp.down_proj"
    tok = _bpe_tokenizer()
    _, _, path = _write(tmp_path, "qwen2", "q4_0", CASES["q4_0"], skip=[kept], override={V: CASES["q8_0"]},
                        tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_v.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert int(reader.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tok.get_vocab())
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"


def test_grids_without_a_gguf_type_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="14 layer.s. .e.g. model.layers.0.mlp.down_proj. have grids W4 g-1 sym, W4 g128 sym with no exact GGUF type"):
        AutoRound(tiny_text_model("qwen2"), None, group_size=128, recipe="rtn", progress=False, format="gguf:q4_0")
    model = tiny_text_model("qwen2")
    view = export_view(model, rtn_state(model, CASES["q4_1"]), "gguf:q4_1", ["model.layers"])
    assert check(view, [LLAMA_CPP])[LLAMA_CPP].loads
    view = export_view(model, rtn_state(model, CASES["q4_1"]), "auto_round", ["model.layers"])
    assert not check(view, [LLAMA_CPP])[LLAMA_CPP].loads


def test_cli_writes_gguf_and_a_tokenizer_it_cannot_write_is_left_out(tmp_path: Path) -> None:
    from checkpoint_helpers import tiny_tokenizer
    from typer.testing import CliRunner

    from signround.cli import app

    model = tiny_text_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")  # qwen2's tokenizer class reads it back as a BPE
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--recipe", "rtn",
                                   "--group-size", "32", "--format", "gguf:q8_0", "--bits", "8"])
    assert res.exit_code == 0, res.output
    reader = gguf.GGUFReader(str(tmp_path / "q" / "model-q8_0.gguf"))
    assert {t.tensor_type for t in reader.tensors if t.name.startswith("blk.0.ffn_") and "norm" not in t.name} == {
        gguf.GGMLQuantizationType.Q8_0}
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    model = tiny_text_model("qwen2")  # a word-level tokenizer: llama.cpp has no such model, it is left out
    with pytest.warns(UserWarning, match="no tokenizer metadata was written"):
        save_quantized(model, rtn_state(model, CASES["q8_0"]), tmp_path / "w", format="gguf:q8_0",
                       tokenizer=tiny_tokenizer(), inplace=False)
