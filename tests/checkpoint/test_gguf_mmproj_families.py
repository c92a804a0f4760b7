"""mmproj-model-f16.gguf for LLaVA (CLIP, llama.cpp's legacy ``mlp`` projector), Gemma 3 (SigLIP,
``gemma3``), Qwen2-VL (``qwen2vl_merger``) and Qwen2.5-VL (``qwen2.5vl_merger``), and their text
decoders (llama, gemma3, qwen2vl), read back with the gguf package's reader: names, shapes, types,
keys, values (and the tensors changed on the way: q/k/v split, Conv3D split, norm + 1, mm.0/mm.2).
llama.cpp's mtmd encoding an image through each: llama_cpp_check.py FAMILY (not CI), spec/format.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import rtn_state
from tiny_models import tiny_vlm

from signround.adapters.checkpoint.export import save_quantized
from signround.rounding import QuantSpec

gguf = pytest.importorskip("gguf")
Q4 = QuantSpec(4, 32, True)


def _write(tmp_path: Path, model, ip):  # type: ignore[no-untyped-def]
    results = rtn_state(model, Q4)
    assert all(".language_model." in n for n in results)  # the text decoder is what SignRound quantized
    out = save_quantized(model, results, tmp_path / "g", format="gguf:q4_0", image_processor=ip, inplace=False)
    assert sorted(p.name for p in out.iterdir()) == ["mmproj-model-f16.gguf", "model-q4_0.gguf"]
    return gguf.GGUFReader(str(out / "model-q4_0.gguf")), gguf.GGUFReader(str(out / "mmproj-model-f16.gguf"))


def _fields(reader) -> dict:  # type: ignore[no-untyped-def]
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(reader) -> dict:  # type: ignore[no-untyped-def]
    return {t.name: t for t in reader.tensors}


def _check(tensors: dict, name: str, want: torch.Tensor | np.ndarray, kind: str) -> None:
    t = tensors[name]
    w = want.detach().float().numpy() if isinstance(want, torch.Tensor) else want
    assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind), name
    assert tuple(int(x) for x in t.shape) == tuple(reversed(w.shape)), name  # gguf lists ggml's ne (reversed)
    np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w.astype(np.float16 if kind == "F16" else np.float32))


def _common(f: dict, model, projector: str) -> None:  # type: ignore[no-untyped-def]
    assert (f["general.architecture"], f["general.type"], f["clip.projector_type"]) == ("clip", "mmproj", projector)
    assert f["clip.has_vision_encoder"] is True
    assert f["clip.vision.projection_dim"] == model.config.get_text_config().hidden_size


def test_llava_mmproj_keeps_the_layers_up_to_the_feature_layer(tmp_path: Path) -> None:
    """vision_feature_layer -2 of 2 layers: llama.cpp's block count 1, feature_layer [1]; no
    post_layernorm (HF's LLaVA reads hidden_states); linear_1/2 as mm.0/mm.2; CLIP's quick-gelu. The
    export warns that llama.cpp's llava graph misplaces the CLS embedding (llama_cpp_check.py llava)."""
    from transformers import CLIPImageProcessor

    model = tiny_vlm("llava")
    with pytest.warns(UserWarning, match=r"llama.cpp#25814.*puts the CLS embedding after the patches"):
        text, mm = _write(tmp_path, model, CLIPImageProcessor())
    f = _fields(mm)
    _common(f, model, "mlp")
    vcfg = model.config.vision_config
    assert (f["clip.vision.block_count"], f["clip.vision.feature_layer"], f["clip.vision.embedding_length"],
            f["clip.vision.feed_forward_length"], f["clip.vision.image_size"], f["clip.vision.patch_size"]) == (
        1, [1], vcfg.hidden_size, vcfg.intermediate_size, 28, 14)
    assert "clip.use_gelu" not in f  # clip.cpp's default: quick-gelu
    assert f["clip.vision.image_mean"] == pytest.approx(CLIPImageProcessor().image_mean)
    t = _tensors(mm)
    vt, proj = model.model.vision_tower, model.model.multi_modal_projector
    _check(t, "v.class_embd", vt.embeddings.class_embedding, "F32")
    _check(t, "v.patch_embd.weight", vt.embeddings.patch_embedding.weight, "F32")
    _check(t, "v.pre_ln.weight", vt.pre_layrnorm.weight, "F32")
    _check(t, "v.blk.0.attn_q.weight", vt.encoder.layers[0].self_attn.q_proj.weight, "F16")
    _check(t, "v.blk.0.ffn_up.weight", vt.encoder.layers[0].mlp.fc1.weight, "F16")
    _check(t, "mm.0.weight", proj.linear_1.weight, "F16")
    _check(t, "mm.2.bias", proj.linear_2.bias, "F32")
    assert not any(n.startswith(("v.blk.1.", "v.post_ln")) for n in t)
    assert len(t) == 5 + 16 + 4  # embeddings + pre-ln, one block, the projector
    tf = _fields(text)
    assert tf["general.architecture"] == "llama" and not any(n.startswith(("v.", "mm.")) for n in _tensors(text))


def test_gemma3_mmproj_and_text_shift_the_norms_by_one(tmp_path: Path) -> None:
    """SigLIP tower with its pooling head dropped; mm_input_projection as stored ([vision, text]);
    Gemma3RMSNorm's 1 + w written as w + 1 (soft_emb_norm; every text norm); the text file's sliding
    window keys."""
    from transformers import Gemma3ImageProcessor

    model = tiny_vlm("gemma3", query_pre_attn_scalar=16)
    proj = model.model.multi_modal_projector
    with torch.no_grad():  # transformers initializes both to zeros
        proj.mm_input_projection_weight.normal_()
        proj.mm_soft_emb_norm.weight.normal_()
    text, mm = _write(tmp_path, model, Gemma3ImageProcessor())
    f = _fields(mm)
    _common(f, model, "gemma3")
    assert f["clip.use_gelu"] is True and f["clip.vision.projector.scale_factor"] == 1  # 2 x 2 patches, 4 tokens
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    t = _tensors(mm)
    vt = model.model.vision_tower
    _check(t, "mm.input_projection.weight", proj.mm_input_projection_weight, "F16")
    _check(t, "mm.soft_emb_norm.weight", proj.mm_soft_emb_norm.weight + 1, "F32")
    _check(t, "v.position_embd.weight", vt.embeddings.position_embedding.weight, "F32")
    _check(t, "v.post_ln.weight", vt.post_layernorm.weight, "F32")  # Gemma 3 reads last_hidden_state
    _check(t, "v.blk.1.ffn_down.weight", vt.encoder.layers[1].mlp.fc2.weight, "F16")
    assert not any("head" in n for n in t)
    tf = _fields(text)
    tcfg = model.config.get_text_config()
    assert tf["general.architecture"] == "gemma3"
    assert (tf["gemma3.attention.sliding_window"], tf["gemma3.attention.sliding_window_pattern"],
            tf["gemma3.rope.freq_base"], tf["gemma3.rope.freq_base_swa"]) == (
        tcfg.sliding_window, [t == "sliding_attention" for t in tcfg.layer_types], 1e6, 1e4)
    lm = model.model.language_model
    tt = _tensors(text)
    _check(tt, "blk.0.attn_norm.weight", lm.layers[0].input_layernorm.weight + 1, "F32")
    _check(tt, "blk.1.post_ffw_norm.weight", lm.layers[1].post_feedforward_layernorm.weight + 1, "F32")
    _check(tt, "blk.0.attn_q_norm.weight", lm.layers[0].self_attn.q_norm.weight + 1, "F32")
    _check(tt, "output_norm.weight", lm.norm.weight + 1, "F32")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_mmproj_splits_qkv_and_the_conv3d(tmp_path: Path, family: str) -> None:
    from transformers import Qwen2VLImageProcessor

    model = tiny_vlm(family)
    text, mm = _write(tmp_path, model, Qwen2VLImageProcessor())
    f = _fields(mm)
    _common(f, model, {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}[family])
    vcfg = model.config.vision_config
    width = vcfg.embed_dim if family == "qwen2_vl" else vcfg.hidden_size
    assert (f["clip.vision.embedding_length"], f["clip.vision.block_count"], f["clip.vision.attention.head_count"],
            f["clip.vision.image_size"]) == (width, vcfg.depth, vcfg.num_heads, 560)
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    if family == "qwen2_5_vl":
        assert f["clip.use_silu"] is True and f["clip.vision.n_wa_pattern"] == 2  # full attention at block 1
    else:
        assert "clip.use_silu" not in f and "clip.use_gelu" not in f  # quick-gelu
    t = _tensors(mm)
    vis = model.model.visual
    conv = vis.patch_embed.proj.weight  # [out, 3, 2, p, p]
    _check(t, "v.patch_embd.weight", conv[:, :, 0], "F16")
    _check(t, "v.patch_embd.weight.1", conv[:, :, 1], "F16")
    qkv_w, qkv_b = vis.blocks[1].attn.qkv.weight, vis.blocks[1].attn.qkv.bias
    for i, part in enumerate("qkv"):
        _check(t, f"v.blk.1.attn_{part}.weight", qkv_w.chunk(3)[i], "F16")
        _check(t, f"v.blk.1.attn_{part}.bias", qkv_b.chunk(3)[i], "F32")
    _check(t, "v.post_ln.weight", vis.merger.ln_q.weight, "F32")
    _check(t, "mm.0.weight", vis.merger.mlp[0].weight, "F16")
    _check(t, "mm.2.weight", vis.merger.mlp[2].weight, "F16")
    if family == "qwen2_5_vl":
        _check(t, "v.blk.0.ffn_gate.weight", vis.blocks[0].mlp.gate_proj.weight, "F16")
    n_state = sum(k.startswith("model.visual.") for k in model.state_dict())
    assert len(t) == n_state + 1 + 2 * 2 * vcfg.depth  # one Conv3D -> two; qkv w, b -> three each
    tf = _fields(text)
    assert tf["general.architecture"] == "qwen2vl" and tf["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    assert _tensors(text)["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0


def test_what_llama_cpp_would_compute_differently_is_refused_before_any_file(tmp_path: Path) -> None:
    model = tiny_vlm("llava")
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="always drops the CLS token"):
        save_quantized(model, rtn_state(model, Q4), tmp_path / "a", format="gguf:q4_0", inplace=False)
    model.config.vision_feature_select_strategy, model.config.vision_feature_layer = "default", [-1, -2]
    with pytest.raises(ValueError, match=r"vision_feature_layer \[-1, -2\]: llama.cpp concatenates the feature layers"):
        save_quantized(model, rtn_state(model, Q4), tmp_path / "a", format="gguf:q4_0", inplace=False)
    model = tiny_vlm("qwen2_5_vl")
    model.config.vision_config.window_size = 56
    with pytest.raises(ValueError, match="window_size 56: llama.cpp's qwen2.5vl windows are 112 pixels"):
        save_quantized(model, rtn_state(model, Q4), tmp_path / "b", format="gguf:q4_0", inplace=False)
    model = tiny_vlm("gemma3")  # query_pre_attn_scalar 256 with head_dim 16
    with pytest.raises(ValueError, match=r"query_pre_attn_scalar 256: llama.cpp's gemma3 scales queries by 1/sqrt\(16\)"):
        save_quantized(model, rtn_state(model, Q4), tmp_path / "c", format="gguf:q4_0", inplace=False)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_vision_mlp_as_wide_as_its_tower_is_refused(tmp_path: Path) -> None:
    """clip.cpp swaps ffn_up/ffn_down when ffn_down's input width equals the tower's (its fix for
    files written with the two swapped), so such a tower would run with its MLP reversed."""
    from tiny_models import vlm_config
    from transformers import AutoModelForImageTextToText

    cfg = vlm_config("llava")
    cfg.vision_config.intermediate_size = cfg.vision_config.hidden_size
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    with pytest.raises(ValueError, match="as wide as the tower"):
        save_quantized(model, rtn_state(model, Q4), tmp_path / "g", format="gguf:q4_0", inplace=False)


def test_mmproj_without_a_processor_names_the_defaults_it_used(tmp_path: Path) -> None:
    model = tiny_vlm("qwen2_vl")
    with pytest.warns(UserWarning, match="Qwen2VLImageProcessor's defaults"):
        save_quantized(model, rtn_state(model, Q4), tmp_path / "g", format="gguf:q4_0", inplace=False)


def test_llama_cpp_mix_of_a_vlm_covers_its_text_decoder_only() -> None:
    """The tower has a self_attn.v_proj too (SigLIP): the mix names the text decoder's layers only."""
    from signround.adapters.checkpoint.gguf import llama_cpp_mix

    for family, kw in (("gemma3", {"query_pre_attn_scalar": 16}), ("qwen2_vl", {})):
        model = tiny_vlm(family, **kw)
        mix = llama_cpp_mix("gguf:q3_k_m", model)
        assert mix and all(n.startswith("model.language_model.layers.") for n in mix)
        assert mix["model.language_model.layers.0.self_attn.v_proj"] == {"bits": 5, "group_size": 32, "sym": False}


def test_a_quantized_vision_layer_is_written_as_its_grid(tmp_path: Path) -> None:
    """quant_nontext_module: the tower's fused qkv on SignRound's grid is split and written in F16 as
    that grid (fp16 of the grid values), not as packed codes."""
    from transformers import Qwen2VLImageProcessor

    model = tiny_vlm("qwen2_vl")
    qkv = "model.visual.blocks.0.attn.qkv"
    results = rtn_state(model, Q4, extra=[qkv])
    assert qkv in results
    out = save_quantized(model, results, tmp_path / "g", format="gguf:q4_0", image_processor=Qwen2VLImageProcessor(),
                         inplace=False)
    t = _tensors(gguf.GGUFReader(str(out / "mmproj-model-f16.gguf")))
    grid = model.get_submodule(qkv).weight  # rtn_state left SignRound's dequantized grid in the model
    for i, part in enumerate("qkv"):
        _check(t, f"v.blk.0.attn_{part}.weight", grid.chunk(3)[i], "F16")
