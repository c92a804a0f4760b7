"""Loadability verdicts (checkpoint/targets.py): from a plan, from our checkpoints and auto-round's,
through the facade (`target=`) and the CLI (`--target`, `inspect`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from checkpoint_helpers import rtn_state, tiny_tokenizer
from tiny_models import tiny_text_model
from typer.testing import CliRunner

from signround.adapters.checkpoint.export import export_view, save_quantized
from signround.adapters.checkpoint.inspect import inspect_checkpoint
from signround.adapters.checkpoint.targets import (
    SIGNROUND,
    TRANSFORMERS,
    VLLM,
    UnloadableError,
    check,
    fused_groups,
    harmonize_fused,
)
from signround.adapters.frontends.facade import AutoRound
from signround.rounding import QuantSpec

Q = "model.layers.0.self_attn.q_proj"
W4 = QuantSpec(4, 32, True)


def _view(spec: QuantSpec, fmt: str = "auto_round", **kw):
    model = tiny_text_model("llama")
    results = rtn_state(model, spec, **kw)
    return export_view(model, results, fmt, ["model.layers"])


def test_fused_groups_of_a_llama_block() -> None:
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.gate_proj",
                                                                      "model.layers.0.mlp.up_proj"]
    assert fused_groups(names) == [
        ("model.layers.0.self_attn.qkv_proj", names[:3]),
        ("model.layers.0.mlp.gate_up_proj", names[4:]),
    ]


def test_harmonize_takes_the_strictest_member() -> None:
    k, v = Q.replace("q_proj", "k_proj"), Q.replace("q_proj", "v_proj")
    new, messages = harmonize_fused({Q: None, k: W4, v: W4}, {Q: 64, k: 64, v: 64})
    assert new == {Q: None, k: None, v: None} and len(messages) == 1 and "k_proj, v_proj" in messages[0]
    w8 = QuantSpec(8, 32, True)
    new, _ = harmonize_fused({Q: W4, k: w8, v: QuantSpec(4, 32, False)}, {Q: 64, k: 64, v: 64})
    assert set(new.values()) == {w8}  # more bits beats a zero point
    assert harmonize_fused({Q: W4, k: W4, v: W4}, {Q: 64, k: 64, v: 64})[1] == []


def test_split_fused_group_fails_vllm_only() -> None:
    """The README's `{"q_proj": {"bits": 16}}` splits vLLM's qkv_proj (what vcheck reported)."""
    verdicts = check(_view(W4, skip=[Q]))
    assert not verdicts[VLLM].loads
    assert "model.layers.0.self_attn.qkv_proj: fused module" in verdicts[VLLM].problems[0]
    assert verdicts[TRANSFORMERS].loads and verdicts[SIGNROUND].loads


@pytest.mark.parametrize("spec, vllm", [
    (QuantSpec(4, 32, True), True), (QuantSpec(4, 32, False), True),  # GPTQ / AWQ layouts
    (QuantSpec(2, 32, True), True), (QuantSpec(3, 32, True), True), (QuantSpec(8, 32, True), True),
    (QuantSpec(3, 32, False), False), (QuantSpec(2, 32, False), False),  # native packing
])
def test_auto_round_bits_and_sym(spec: QuantSpec, vllm: bool) -> None:
    verdicts = check(_view(spec))
    assert verdicts[VLLM].loads is vllm, verdicts[VLLM]
    if not vllm:
        assert "packing_format 'auto_round'" in verdicts[VLLM].problems[0]
    assert verdicts[TRANSFORMERS].loads and verdicts[SIGNROUND].loads


def test_group_size_without_a_vllm_kernel() -> None:
    verdicts = check(_view(QuantSpec(4, 16, True)))
    assert not verdicts[VLLM].loads and "group_size 16" in verdicts[VLLM].problems[0]


def test_facade_target_vllm_aligns_fused_groups() -> None:
    model = tiny_text_model("llama")
    with pytest.warns(UserWarning, match="qkv_proj: vLLM fuses q_proj, k_proj, v_proj"):
        ar = AutoRound(model, None, group_size=32, recipe="rtn", progress=False, layer_config={"q_proj": {"bits": 16}},
                       target="vllm")
    plan = ar.plan()
    for layer in (0, 1):
        for p in "qkv":
            assert f"model.layers.{layer}.self_attn.{p}_proj" in plan.skipped
        assert f"model.layers.{layer}.self_attn.o_proj" in plan.quantize


def test_facade_target_refuses_an_unloadable_plan_before_any_work() -> None:
    model = tiny_text_model("llama")
    with pytest.raises(UnloadableError, match="vllm: packing_format 'auto_round'"):
        AutoRound(model, None, bits=3, sym=False, group_size=32, recipe="rtn", progress=False, target=("vllm",))
    with pytest.raises(ValueError, match="unknown target"):
        AutoRound(model, None, recipe="rtn", progress=False, target="tgi")
    # without a target nothing is refused, and nothing is changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ar = AutoRound(model, None, group_size=32, recipe="rtn", progress=False, layer_config={"q_proj": {"bits": 16}})
    assert "model.layers.0.self_attn.k_proj" in ar.plan().quantize


def test_save_quantized_with_targets_checks_before_writing(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, W4, skip=[Q])
    with pytest.raises(UnloadableError, match="qkv_proj"):
        save_quantized(model, results, tmp_path / "c", targets=("vllm",), inplace=False)
    assert not (tmp_path / "c").exists()
    save_quantized(model, results, tmp_path / "c", targets=("signround", "transformers"), inplace=False)


def test_inspect_gives_the_same_verdicts(tmp_path: Path) -> None:
    model = tiny_text_model("llama")
    results = rtn_state(model, QuantSpec(3, 32, False), skip=[Q])
    expected = check(export_view(model, results, "auto_round", ["model.layers"]))
    info = inspect_checkpoint(save_quantized(model, results, tmp_path / "c", inplace=False))
    assert {t: (v["loads"], list(v["problems"])) for t, v in info["verdicts"].items()} == {
        t: (v.loads, list(v.problems)) for t, v in expected.items()}


def test_inspect_reads_auto_rounds_own_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("auto_round")
    from auto_round import AutoRound as Reference

    model = tiny_text_model("llama")
    tok = tiny_tokenizer()
    ar = Reference(model, tok, bits=3, group_size=32, sym=False, iters=0, nsamples=2, seqlen=8,
                   layer_config={Q: {"bits": 16}})
    ar.quantize_and_save(str(tmp_path / "ref"), format="auto_round")
    info = inspect_checkpoint(next(p.parent for p in (tmp_path / "ref").rglob("config.json")))
    vllm = info["verdicts"][VLLM]
    assert not vllm["loads"]
    assert any("packing_format 'auto_round'" in p for p in vllm["problems"])
    assert any("qkv_proj: fused module" in p for p in vllm["problems"])
    assert info["verdicts"][SIGNROUND]["loads"]


def test_cli_target_and_inspect(tmp_path: Path) -> None:
    from signround.cli import app

    tok = tiny_tokenizer()
    model = tiny_text_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--recipe", "rtn",
                              "--bits", "3", "--asym", "--group-size", "32", "--target", "vllm"])
    assert res.exit_code == 2 and "packing_format 'auto_round'" in res.output and not (tmp_path / "q").exists()
    res = runner.invoke(app, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--recipe", "rtn",
                              "--group-size", "32", "--target", "vllm"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "q")], terminal_width=200)
    assert res.exit_code == 0 and "will it load?" in res.output and "FAILS" in res.output  # llama.cpp: not GGUF


# what vLLM 0.33.0's own loader said of each case (../shared/tools/vllm_check, spec/format.md "vLLM check"):
# (format, global grid, per-layer overrides (None = fp), lm_head grid, vocab) -> loads
L0 = "model.layers.0."
G4, A4 = QuantSpec(4, 128, True), QuantSpec(4, 128, False)
MEASURED = {
    "ar-w4-sym": (("auto_round", G4, {}, None, 256), True),
    "ar-w4-asym": (("auto_round", A4, {}, None, 256), True),
    "ar-w2-sym": (("auto_round", QuantSpec(2, 64, True), {}, None, 256), True),
    "ar-w3-sym": (("auto_round", QuantSpec(3, 128, True), {}, None, 256), True),
    "ar-w8-sym": (("auto_round", QuantSpec(8, 128, True), {}, None, 256), True),
    "ar-w3-asym": (("auto_round", QuantSpec(3, 128, False), {}, None, 256), False),
    "ar-w2-asym": (("auto_round", QuantSpec(2, 64, False), {}, None, 256), False),
    "ar-w4-sym-mixed8-fused-ok": (("auto_round", G4, {L0 + "mlp.down_proj": QuantSpec(8, 128, True),
                                                      L0 + "self_attn.o_proj": None}, None, 256), True),
    "ar-w4-sym-qproj-fp": (("auto_round", G4, {L0 + "self_attn.q_proj": None}, None, 256), False),
    "ar-w4-sym-lm_head": (("auto_round", G4, {}, G4, 256), True),
    "ar-w4-sym-lm_head-v288": (("auto_round", G4, {}, G4, 288), False),
    "ar-w4-sym-g16": (("auto_round", QuantSpec(4, 16, True), {}, None, 256), False),
    "awq-w2-asym": (("auto_round:auto_awq", QuantSpec(2, 64, False), {}, None, 256), False),
    "awq-w3-asym": (("auto_round:auto_awq", QuantSpec(3, 128, False), {}, None, 256), False),
    "awq-w4-asym-mixed3": (("auto_round:auto_awq", A4, {L0 + "mlp.down_proj": QuantSpec(3, 128, False)}, None, 256),
                           True),
    "ct-w4-sym": (("compressed_tensors", G4, {}, None, 256), True),
    "ct-w4-asym": (("compressed_tensors", A4, {}, None, 256), True),
    "ct-w3-asym": (("compressed_tensors", QuantSpec(3, 128, False), {}, None, 256), True),
    "ct-w2-asym": (("compressed_tensors", QuantSpec(2, 64, False), {}, None, 256), True),
    "ct-w8-asym": (("compressed_tensors", QuantSpec(8, 128, False), {}, None, 256), True),
    "ct-w8-sym-channel": (("compressed_tensors", QuantSpec(8, -1, True), {}, None, 256), True),
    "ct-w4-asym-mixed8-qproj-fp": (("compressed_tensors", A4, {L0 + "mlp.down_proj": QuantSpec(8, 128, False),
                                                              L0 + "self_attn.q_proj": None}, None, 256), False),
    "ct-w4-sym-lm_head": (("compressed_tensors", G4, {}, G4, 256), True),
    "gptq-w4-sym": (("auto_gptq", G4, {}, None, 256), True),
    "gptq-w8-sym": (("auto_gptq", QuantSpec(8, 128, True), {}, None, 256), True),
    "gptq-w3-sym": (("auto_gptq", QuantSpec(3, 128, True), {}, None, 256), False),
    "gptq-w4-sym-mixed8": (("auto_gptq", G4, {L0 + "mlp.down_proj": QuantSpec(8, 128, True)}, None, 256), True),
    "gptq-w4-sym-lm_head": (("auto_gptq", G4, {}, G4, 256), True),
}


@pytest.mark.parametrize("case", MEASURED)
def test_verdicts_match_the_vllm_check(case: str) -> None:
    """Our rules give vLLM's verdict for every case the real loader was run on (27 of 27 agree)."""
    (fmt, spec, over, head, vocab), loads = MEASURED[case]
    model = tiny_text_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False, vocab_size=vocab)
    results = rtn_state(model, spec, skip=[n for n, s in over.items() if s is None],
                        override={n: s for n, s in over.items() if s is not None})
    if head is not None:
        results["lm_head"] = rtn_state(model, head, blocks=[], extra=["lm_head"])["lm_head"]
    verdict = check(export_view(model, results, fmt, ["model.layers"]), [VLLM])[VLLM]
    assert verdict.loads is loads, verdict
