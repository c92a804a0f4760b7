"""lm_head quantized through layer_config (exact name): RTN in the facade, exported in extra_config,
loaded by our loader and by transformers + auto-round; vLLM's check flags it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import logits, tiny_tokenizer
from tiny_models import tiny_text_model

from signround.adapters.checkpoint.inspect import inspect_checkpoint
from signround.adapters.checkpoint.loader import load_quantized
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.adapters.checkpoint.targets import UnloadableError
from signround.adapters.frontends.facade import AutoRound

HEAD = {"lm_head": {"bits": 4, "group_size": 32}}


def _untied():
    return tiny_text_model("llama", tie_word_embeddings=False)


def test_lm_head_is_quantized_exported_and_reloaded(tmp_path: Path) -> None:
    model = _untied()
    ar = AutoRound(model, None, group_size=32, recipe="rtn", progress=False, layer_config=HEAD)
    report = ar.quantize()
    assert report.layers["lm_head"].spec.bits == 4
    out = ar.save_quantized(tmp_path / "q", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["extra_config"]["lm_head"] == {"bits": 4, "group_size": 32, "sym": True, "data_type": "int"}
    loaded = load_quantized(out)
    assert isinstance(loaded.lm_head, QuantLinear)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-4)
    verdicts = inspect_checkpoint(out)["verdicts"]
    assert all(verdicts[t]["loads"] for t in ("vllm", "transformers", "signround"))  # vocab 256: no padding
    assert any("quantized lm_head loads" in n for n in verdicts["vllm"]["notes"])


def test_transformers_with_auto_round_loads_the_quantized_lm_head(tmp_path: Path) -> None:
    pytest.importorskip("auto_round")
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = _untied()
    ar = AutoRound(model, None, group_size=32, recipe="rtn", progress=False, layer_config=HEAD)
    ar.quantize()
    out = ar.save_quantized(tmp_path / "q", inplace=False)
    tiny_tokenizer().save_pretrained(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", local_files_only=True)
    assert "QuantLinear" in type(theirs.lm_head).__name__
    torch.testing.assert_close(logits(theirs.eval()), logits(model), rtol=0, atol=2e-3)


def test_lm_head_refusals() -> None:
    padded = tiny_text_model("llama", tie_word_embeddings=False, vocab_size=288)  # vLLM pads it to 320
    with pytest.raises(UnloadableError, match="lm_head: vLLM pads the vocabulary .288."):
        AutoRound(padded, None, group_size=32, recipe="rtn", progress=False, layer_config=HEAD, target="vllm")
    with pytest.raises(ValueError, match="shares its weight with the input embeddings"):
        AutoRound(tiny_text_model("llama", tie_word_embeddings=True), None, group_size=32, recipe="rtn",
                  progress=False, layer_config=HEAD)
    # a regular expression does not reach outside the blocks, and says so when it names lm_head
    with pytest.raises(ValueError, match="name it exactly"):
        AutoRound(_untied(), None, group_size=32, recipe="rtn", progress=False,
                  layer_config={"lm_head|down_proj": {"bits": 8}})
