"""A VLM's GGUF export: the text decoder as model-<type>.gguf and the vision tower + connector as
mmproj-model-f16.gguf (llama.cpp's clip architecture), read back with the gguf package's reader.
llama.cpp's mtmd encoding an image through it: llama_cpp_check.py idefics3 (not CI), spec/format.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checkpoint_helpers import rtn_state
from llama_cpp_check import idefics3_model

from signround.adapters.checkpoint.export import save_quantized
from signround.rounding import QuantSpec

gguf = pytest.importorskip("gguf")


def _fields(reader) -> dict:  # type: ignore[no-untyped-def]
    return {k: f.contents() for k, f in reader.fields.items()}


def test_idefics3_writes_text_gguf_and_mmproj(tmp_path: Path) -> None:
    tok, proc, model = idefics3_model()
    results = rtn_state(model, QuantSpec(4, 32, True))
    assert all(n.startswith("model.text_model.") for n in results)
    out = save_quantized(model, results, tmp_path / "g", format="gguf:q4_0", processor=proc)
    assert sorted(p.name for p in out.iterdir()) == ["mmproj-model-f16.gguf", "model-q4_0.gguf"]
    assert model.config.quantization_config["mmproj_file"] == "mmproj-model-f16.gguf"

    text = gguf.GGUFReader(str(out / "model-q4_0.gguf"))
    types = {t.name: t.tensor_type for t in text.tensors}
    assert types["blk.1.attn_v.weight"] == gguf.GGMLQuantizationType.Q4_0 and "output.weight" in types
    assert not any(n.startswith(("v.", "mm.")) for n in types)
    assert _fields(text)["general.architecture"] == "llama" and _fields(text)["llama.embedding_length"] == 128

    mm = gguf.GGUFReader(str(out / "mmproj-model-f16.gguf"))
    f = _fields(mm)
    vcfg = model.config.vision_config
    assert (f["general.architecture"], f["general.type"], f["clip.projector_type"]) == ("clip", "mmproj", "idefics3")
    assert (f["clip.vision.projection_dim"], f["clip.vision.embedding_length"], f["clip.vision.block_count"],
            f["clip.vision.image_size"], f["clip.vision.patch_size"], f["clip.vision.projector.scale_factor"]) == (
        128, vcfg.hidden_size, vcfg.num_hidden_layers, 32, 8, 2)
    assert f["clip.vision.image_mean"] == pytest.approx(proc.image_processor.image_mean)
    tensors = {t.name: t for t in mm.tensors}
    state = model.state_dict()
    expect = {  # HF name -> (gguf name, type)
        "model.vision_model.embeddings.patch_embedding.weight": ("v.patch_embd.weight", "F32"),
        "model.vision_model.embeddings.position_embedding.weight": ("v.position_embd.weight", "F32"),
        "model.vision_model.encoder.layers.1.self_attn.q_proj.weight": ("v.blk.1.attn_q.weight", "F16"),
        "model.vision_model.encoder.layers.1.self_attn.q_proj.bias": ("v.blk.1.attn_q.bias", "F32"),
        "model.vision_model.encoder.layers.0.mlp.fc2.weight": ("v.blk.0.ffn_down.weight", "F16"),
        "model.vision_model.post_layernorm.weight": ("v.post_ln.weight", "F32"),
        "model.connector.modality_projection.proj.weight": ("mm.model.fc.weight", "F16"),
    }
    for hf, (name, kind) in expect.items():
        t = tensors[name]
        w = state[hf].float().numpy()
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind)
        want = w.astype(np.float16) if kind == "F16" else w
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), want)
    n_vision = sum(k.startswith(("model.vision_model.", "model.connector.")) for k in state)
    assert len(tensors) == n_vision


def test_mmproj_without_a_processor_says_which_normalization_it_assumed(tmp_path: Path) -> None:
    _, _, model = idefics3_model()
    with pytest.warns(UserWarning, match="no processor given, so the image mean/std"):
        save_quantized(model, rtn_state(model, QuantSpec(8, 32, True)), tmp_path / "g", format="gguf:q8_0",
                       inplace=False)
