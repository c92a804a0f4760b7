"""AutoRound with unusual inputs (issue 14): layer_config keys that match nothing, weights that are
not quantized (MoE routers), GPT-2 Conv1D, self-generated data, what save_quantized may replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from _templating_helpers import byte_tokenizer
from signround.adapters.frontends.facade import AutoRound
from tiny_models import tiny_text_model

SMALL = dict(iters=2, nsamples=4, seqlen=32, batch_size=4, progress=False, group_size=32)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer([])


@pytest.mark.parametrize("layer_config, match", [
    ({"q_prj": {"bits": 8}}, r"'q_prj' matches no layer of the model; near matches: q_proj"),
    ({"lm_head|mlp.down_proj": {"bits": 8}}, "lm_head"),  # the README's old example: its lm_head part did nothing
    ({"embed_tokens": {"bits": 8}}, "matches no layer"),
    ({"q_proj": {"bits": 8}, "self_attn.q_proj": {"bits": 3}}, "decided by an earlier key"),
])
def test_layer_config_keys_must_match_a_layer(tok, layer_config, match) -> None:
    with pytest.raises(ValueError, match=match):
        AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, layer_config=layer_config, **SMALL)


def test_keys_that_keep_layers_fp_may_name_layers_outside_the_blocks(tok) -> None:
    ar = AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, layer_config={"lm_head": {"bits": 16}}, **SMALL)
    assert len(ar.plan().quantize) == 14


def test_moe_experts_are_quantized_and_the_routers_counted_as_full_precision(tok, capsys) -> None:
    # issue 14: Mixtral's fused experts were saved fp32 while the summary said "0 kept in full
    # precision"; issue 17: they are quantized, one Linear per expert matrix (hf/experts.py)
    cfg = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), num_local_experts=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    report = AutoRound(model, tok, recipe="rtn", group_size=32).quantize()
    experts = sorted(n for n in report.layers if ".experts." in n)
    assert experts == sorted(f"model.layers.{i}.mlp.experts.{e}.{w}" for i in (0, 1) for e in range(4)
                             for w in ("w1", "w2", "w3"))
    assert not any(p.dim() == 3 for p in model.parameters())  # no stacked expert weights left
    routers = [n for n, why in report.other_weights.items() if "router" in why]
    assert routers == [f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    assert report.kept_fp()["other_in_blocks"] == 2  # the routers
    summary = report.summary()
    assert summary["kept_in_full_precision"] == {"layers": 0, "other_in_blocks": 2, "outside_blocks": 2}
    assert summary["moe_experts"] == {"quantized": 24, "kept_in_full_precision": 0, "not_routed": 0,
                                      "not_routed_layers": []}
    err = " ".join(capsys.readouterr().err.split())
    assert "24 expert layer(s) quantized" in err and "2 other weight(s)" in err and "MoE router" in err


def test_gpt2_conv1d_is_refused_before_tuning(tok) -> None:
    cfg = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64)
    with pytest.raises(ValueError, match=r"GPT-2 style Conv1D \(transformer\.h\.0\.attn\.c_attn"):
        AutoRound(AutoModelForCausalLM.from_config(cfg), tok, **SMALL)


def test_a_group_size_that_divides_no_layer_is_refused(tok) -> None:
    with pytest.raises(ValueError, match="no layer would be quantized"):
        AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, **{**SMALL, "group_size": 48})


@pytest.mark.parametrize("device, match", [("mps", "not supported"), ("0,1", "torchrun")])
def test_devices_signround_does_not_tune_on(tok, device, match) -> None:
    with pytest.raises(ValueError, match=match):
        AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, device=device, **SMALL)


def test_self_generated_calibration_runs_and_is_recorded(tok, tmp_path) -> None:
    model = tiny_text_model("llama", vocab_size=len(tok))
    ar = AutoRound(model, tok, dataset="self", **SMALL)
    batches = ar.calibration()
    assert [b["input_ids"].shape for b in batches] == [(4, 32)]
    assert torch.equal(batches[0]["input_ids"], AutoRound(model, tok, dataset="self", **SMALL).calibration()[0]["input_ids"])
    report = ar.quantize()
    assert report.settings["calibration"]["source"] == "self"
    qc = json.loads((ar.save_quantized(tmp_path / "q") / "config.json").read_text())["quantization_config"]
    assert qc["dataset"] == "self" and qc["signround_settings"]["calibration"]["distinct_tokens"] == 4 * 32


def test_save_never_replaces_the_runs_inputs_or_other_files(tok, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    calib = work / "calib.txt"
    calib.write_text("some text for the calibration\n\nand another document")
    ar = AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, dataset=str(calib), **SMALL)
    ar.quantize()
    with pytest.raises(ValueError, match="an input of this run"):
        ar.save_quantized(work, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a quantized checkpoint"):
        ar.save_quantized(mine, overwrite=True)
    assert calib.is_file() and (mine / "notes.txt").read_text() == "mine"
    out = ar.save_quantized(tmp_path / "q", inplace=False)
    assert ar.save_quantized(out, overwrite=True, inplace=False) == out  # a previous checkpoint is replaced
