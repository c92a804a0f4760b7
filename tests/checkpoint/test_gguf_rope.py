"""GGUF text decoders and their rope: Llama 3's frequency factors as llama.cpp's rope_freqs tensor
(equal to what transformers divides its frequencies by), and rope types the writer has no llama.cpp
form for refused before any file. llama.cpp itself: llama_cpp_check.py llama3 (spec/format.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from checkpoint_helpers import rtn_state
from tiny_models import tiny_text_model

from signround.adapters.checkpoint.export import save_quantized
from signround.rounding import QuantSpec

gguf = pytest.importorskip("gguf")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def test_llama3_rope_factors_are_transformers_frequency_ratios(tmp_path: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = tiny_text_model("llama", rope_parameters=dict(LLAMA3))
    out = save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "g", format="gguf:q4_0",
                         inplace=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model-q4_0.gguf")).tensors}
    t = tensors["rope_freqs.weight"]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and tuple(int(x) for x in t.shape) == (head_dim // 2,)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    np.testing.assert_allclose(np.asarray(t.data), plain / inv_freq.numpy(), rtol=1e-5)
    assert {1.0, 8.0} <= set(np.asarray(t.data).tolist())  # high frequencies kept, low ones divided by 8
    plain_model = tiny_text_model("llama")
    out = save_quantized(plain_model, rtn_state(plain_model, QuantSpec(4, 32, True)), tmp_path / "p",
                         format="gguf:q4_0", inplace=False)
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(str(out / "model-q4_0.gguf")).tensors}


def test_a_rope_type_without_a_llama_cpp_form_is_refused_before_any_file(tmp_path: Path) -> None:
    model = tiny_text_model("qwen2", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 256})
    with pytest.raises(ValueError, match="full_attention rope_type 'yarn': this GGUF writer has no llama.cpp form"):
        save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "g", format="gguf:q4_0",
                       inplace=False)
    assert not (tmp_path / "g").exists()
