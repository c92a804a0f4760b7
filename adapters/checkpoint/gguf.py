"""GGUF export of the text decoder (llama.cpp's file format), written with the `gguf` package.

The container (header, metadata, tensor index, alignment) is the `gguf` package's `GGUFWriter`;
this module maps the model onto it: tensor names through `gguf.get_tensor_name_map`, the
hyper-parameters llama.cpp reads for the family, the tokenizer (`gguf_vocab.py`: a byte-level BPE as
llama.cpp's ``gpt2`` model, a SentencePiece-style vocabulary as its ``llama`` model; other kinds are
left out with a warning), and each quantized layer's SignRound codes and scales as ggml blocks of 32 weights:

| type | our grid (group_size 32) | block (bytes) | dequantization (ggml) |
|---|---|---|---|
| Q4_0 | 4-bit sym, w = s·(q − 8) | fp16 d = s, 16 bytes: q[j] | q[j+16] << 4 | d·(q − 8) |
| Q4_1 | 4-bit asym, w = s·(q − z) | fp16 d = s, fp16 m = −s·z, 16 bytes as Q4_0 | d·q + m |
| Q5_0 | 5-bit sym, w = s·(q − 16) | fp16 d = s, 4 bytes of bit 4 (uint32, bit j), 16 nibble bytes | d·(q − 16) |
| Q5_1 | 5-bit asym, w = s·(q − z) | fp16 d = s, fp16 m = −s·z, then as Q5_0 | d·q + m |
| Q8_0 | 8-bit sym, w = s·(q − 128) | fp16 d = s, 32 int8 q − 128 | d·q |

Q4_0, Q5_0 and Q8_0 hold our codes and fp16 scales exactly; Q4_1 / Q5_1 round m = −s·z to fp16 (the
codes and d are exact). The k-quant formats (`gguf:q2_k_s`, `q3_k_s`, `q3_k_m`, `q3_k_l`, `q4_k_s`,
`q4_k_m`, `q5_k_s`, `q5_k_m`) also write Q2_K / Q3_K / Q4_K / Q5_K / Q6_K for W2 asym g16 / W3 sym g16 / W4 asym g32 /
W5 asym g32 / W6 sym g16 layers whose in_features is a multiple of 256: their
sub-block scales are re-quantized and the codes re-rounded (`gguf_kquants.py`), which is not
exact; `write_gguf` warns with the error it adds and stores it in the file
(``signround.requantization``). Full-precision Linears and embeddings are F16, norms and biases F32.
Llama/Mistral q and k rows are permuted to llama.cpp's rotary layout (pairs interleaved), as its
converter does; Qwen2 keeps HF's (NeoX) layout. A VLM of `gguf_mmproj.VISION_FAMILIES` gives its
text decoder here and its vision tower to ``mmproj-model-f16.gguf`` (`gguf_mmproj.py`): the text
decoders of Qwen2-VL / Qwen2.5-VL are llama.cpp's ``qwen2vl`` (qwen2 tensors, M-RoPE sections) and
Gemma 3's its ``gemma3`` (norms + 1, sliding-window layers and their rope base); a config llama.cpp
would compute differently (Gemma 3's query scale) is refused before any file is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signround.adapters.checkpoint import gguf_kquants
from signround.adapters.checkpoint.formats import (GGUF_KBASE, GGUF_KFORMATS, GGUF_KTYPES, GGUF_SUPER_BLOCK, GGUF_TYPES,
                                                   gguf_problems, gguf_type)
from signround.adapters.checkpoint.gguf_vocab import add_tokenizer
from signround.rounding.grid import QuantizedWeight

#: model_type -> (gguf architecture, q/k rows permuted to llama.cpp's rotary layout)
GGUF_ARCHS: Mapping[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                              "qwen2": ("qwen2", False), "qwen2_vl_text": ("qwen2vl", False),
                                              "qwen2_5_vl_text": ("qwen2vl", False), "gemma3_text": ("gemma3", False)}


def _rope(cfg: Any, layer_type: str = "full_attention") -> Mapping[str, Any]:
    """The rope parameters of `cfg` (transformers 5 nests them per layer type for Gemma 3)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params = params.get(layer_type, params)
    if getattr(cfg, "rope_theta", None) is not None:
        params.setdefault("rope_theta", cfg.rope_theta)
    return params


def _text_problems(arch: str, cfg: Any) -> list[str]:
    """Why llama.cpp's `arch` graph would not compute what transformers does for this config."""
    out = []
    if arch == "gemma3":
        n_head, head_dim = cfg.num_attention_heads, cfg.head_dim
        # llama.cpp's Gemma 3 scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) at 62 layers (27B)
        want = cfg.hidden_size // n_head if cfg.num_hidden_layers == 62 else head_dim
        if cfg.query_pre_attn_scalar != want:
            out.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar}: llama.cpp's gemma3 scales queries by "
                       f"1/sqrt({want}) for this model (set query_pre_attn_scalar={want} or keep it out of GGUF)")
        if getattr(cfg, "attn_logit_softcapping", None):
            out.append("attn_logit_softcapping: llama.cpp's gemma3 has none")
    for kind in ("full_attention", "sliding_attention") if arch == "gemma3" else ("full_attention",):
        rope_type = _rope(cfg, kind).get("rope_type", "default")
        if rope_type not in ("default", "mrope") and (arch, kind, rope_type) not in (
                ("gemma3", "full_attention", "linear"), ("llama", "full_attention", "llama3")):
            out.append(f"{kind} rope_type {rope_type!r}: this GGUF writer has no llama.cpp form for it (it writes "
                       "default, M-RoPE, Llama 3's frequency factors and Gemma 3's linear scaling)")
    return out


def llama3_rope_factors(cfg: Any) -> np.ndarray | None:
    """Llama 3's rope frequency factors (rope_type llama3) as llama.cpp's ``rope_freqs.weight``, float32
    [head_dim / 2]: 1 for wavelengths under original_max_position_embeddings / high_freq_factor,
    `factor` above original / low_freq_factor, smoothly between (its converter's LlamaModel); None
    for other rope types."""
    import math

    rope = _rope(cfg)
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _add_arch_keys(writer: Any, arch: str, cfg: Any) -> None:
    """Keys llama.cpp's converter writes for qwen2vl (M-RoPE sections) and gemma3 (sliding window)."""
    gguf = _gguf()
    if arch == "qwen2vl":
        sections = list(_rope(cfg)["mrope_section"])
        writer.add_rope_dimension_sections((sections + [0] * 4)[:4])
    elif arch == "gemma3":
        writer.add_sliding_window(int(cfg.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        writer.add_rope_freq_base_swa(float(_rope(cfg, "sliding_attention")["rope_theta"]))
        full = _rope(cfg)
        if full.get("rope_type") == "linear":  # global layers only; the sliding ones keep scale 1 in llama.cpp
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        if getattr(cfg, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is in the test extra
        raise ImportError("GGUF export needs the gguf package: pip install 'signround[gguf]'") from None
    return gguf


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[N, G, 32] codes 0..15 -> [N, G, 16] bytes (element j low nibble, j+16 high nibble)."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def encode_blocks(qw: QuantizedWeight, type_name: str) -> np.ndarray:
    """The ggml blocks of one layer: uint8 [N, (K/32)·block_bytes]."""
    n, k = qw.codes.shape
    g = k // 32
    codes = qw.codes.to(torch.int32).numpy().reshape(n, g, 32)
    scale = qw.scale.float().numpy().reshape(n, g)
    if type_name == "q4_0":
        parts = [_fp16_bytes(scale), _nibbles(codes)]
    elif type_name == "q4_1":
        zero = qw.zero.float().numpy().reshape(n, g)
        parts = [_fp16_bytes(scale), _fp16_bytes(-scale * zero), _nibbles(codes)]
    elif type_name in ("q5_0", "q5_1"):
        # bit 4 of element j is bit j of a little-endian uint32 after d (and m); the low nibbles as Q4_0
        high = np.packbits((codes >> 4).astype(np.uint8), axis=-1, bitorder="little")
        lows = [_fp16_bytes(scale)] + ([] if type_name == "q5_0" else
                                       [_fp16_bytes(-scale * qw.zero.float().numpy().reshape(n, g))])
        parts = [*lows, high, _nibbles(codes & 15)]
    elif type_name == "q8_0":
        parts = [_fp16_bytes(scale), (codes - 128).astype(np.int8).view(np.uint8)]
    else:
        raise ValueError(f"GGUF type {type_name!r} is not written by signround; choose from {sorted(GGUF_TYPES)}")
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def encode_kquant(qw: QuantizedWeight, type_name: str) -> gguf_kquants.KBlocks:
    """The k-quant blocks of one layer and what re-quantization changed (`gguf_kquants`)."""
    codes, scale = qw.codes.to(torch.int32).numpy(), qw.scale.float().numpy()
    if qw.spec.sym:  # q3_k, q6_k
        return getattr(gguf_kquants, f"encode_{type_name}")(codes, scale)
    return getattr(gguf_kquants, f"encode_{type_name}")(codes, scale, qw.zero.to(torch.int32).numpy())


def _mix_type(main: str, leaf: str, i: int, n: int, n_gqa: int) -> str:
    """The k type llama.cpp gives layer `i` of `n` (its tensor `leaf`) in k-quant format `main`:
    llama-quant.cpp's `llama_tensor_get_type_impl` for a dense (no experts), non-Falcon model."""
    base = GGUF_KBASE[main]
    more = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2  # its use_more_bits
    if leaf == "self_attn.v_proj":
        if main == "q2_k_s" and n_gqa >= 4:
            return "q4_k"
        if main == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if main == "q3_k_l" or (main == "q4_k_s" and i < 4):
            return "q5_k"
        if main in ("q4_k_m", "q5_k_m") and more:
            return "q6_k"
    elif leaf == "mlp.down_proj":
        if main == "q2_k_s" and i < n // 8:
            return "q4_k"
        if main == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if main == "q3_k_l" or (main == "q4_k_s" and i < n // 8):
            return "q5_k"
        if main in ("q4_k_m", "q5_k_m") and more:
            return "q6_k"
    elif leaf == "self_attn.o_proj" and main in ("q3_k_m", "q3_k_l"):
        return "q4_k" if main == "q3_k_m" else "q5_k"
    return base


#: llama.cpp's `tensor_type_fallback` where in_features is not a multiple of 256, as a grid: Q2_K / Q3_K
#: -> Q4_0 (W4 sym g32), Q6_K -> Q8_0. Q5_K -> Q5_1 holds W5 asym g32 as it is, and Q4_K's W4 asym g32
#: stays as Q4_1 (llama.cpp takes Q5_0 there; Q4_1 is SignRound's grid exactly), so neither needs an entry.
_NARROW: Mapping[str, tuple[int, bool, int]] = {"q2_k": (4, True, 32), "q3_k": (4, True, 32), "q6_k": (8, True, 32)}


def llama_cpp_mix(fmt: str, model: nn.Module) -> dict[str, dict[str, Any]]:
    """llama.cpp's mix for a k-quant format as a `layer_config` for `model` (module name → grid;
    llama-quant.cpp's `llama_tensor_get_type`), so SignRound tunes those layers at the grid they
    are stored in; the other layers keep the run's grid, the format's base type (`GGUF_KBASE`:
    W2 asym g16, W3 sym g16, W4 asym g32, W5 asym g32 for q2_k / q3_k / q4_k / q5_k files).

    Raised layers (`use_more_bits`: the first and last eighth and every third between; of 8
    layers 0, 3, 6, 7): q4_k_m and q5_k_m put attn_v and ffn_down of those at Q6_K (W6 sym g16);
    q3_k_m puts attn_v of layers 0-1 and ffn_down of the first sixteenth at Q5_K (W5 asym g32), the
    other attn_v and ffn_down and every attn_output at Q4_K (W4 asym g32); q3_k_l every attn_v,
    ffn_down and attn_output at Q5_K; q4_k_s attn_v of layers 0-3 and ffn_down of the first eighth
    at Q5_K; q2_k_s puts ffn_down of the first eighth, and attn_v when n_head / n_kv >= 4, at Q4_K;
    q3_k_s and q5_k_s raise nothing.
    Where in_features is not a multiple of 256, llama.cpp's fallback (`_NARROW`): a Q2_K / Q3_K
    layer is Q4_0 (W4 sym g32, listed here even when it is a base layer), Q6_K is Q8_0 (W8 sym g32).
    Not copied: llama.cpp's Q6_K output / tied embedding (ours stay F16, as an unquantized
    lm_head), its 70B attn_v rule and its MoE rules (our GGUF families are dense)."""
    from signround.adapters.checkpoint.gguf_mmproj import VISION_FAMILIES

    main = fmt.split(":", 1)[-1]
    if main not in GGUF_KFORMATS:
        raise ValueError(f"{fmt!r} is not a k-quant GGUF format ({', '.join('gguf:' + k for k in GGUF_KFORMATS)})")
    family = VISION_FAMILIES.get(getattr(model.config, "model_type", ""))
    cfg = model.config.get_text_config() if family else model.config
    layers = (family.text_prefix if family else "model.") + "layers."
    n = cfg.num_hidden_layers
    n_gqa = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    base = GGUF_KBASE[main]
    mix: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        index, _, leaf = name[len(layers):].partition(".")
        if not (name.startswith(layers) and index.isdigit() and isinstance(module, nn.Linear)):
            continue
        kind = _mix_type(main, leaf, int(index), n, n_gqa)
        narrow = module.in_features % GGUF_SUPER_BLOCK != 0
        if narrow and kind in _NARROW:
            bits, sym, group = _NARROW[kind]
        elif kind != base:
            bits, sym, group = GGUF_KTYPES[kind]
        else:
            continue
        mix[name] = {"bits": bits, "group_size": group, "sym": sym}
    return mix


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (rows only: groups run along K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: nn.Module, qweights: Mapping[str, QuantizedWeight], path: Path, fmt: str,
               tokenizer: Any = None, image_processor: Any = None) -> dict[str, Any]:
    """Write the text decoder of `model` to `path` (a .gguf file), and for a VLM of
    `gguf_mmproj.VISION_FAMILIES` its vision tower to ``mmproj-model-f16.gguf`` beside it.
    qweights: module name → its codes and grid (every quantized text layer, each a GGUF type:
    `formats.gguf_problems`). Returns what export adds to its config: ``requantization`` (k-quant
    formats: {layers: {module: {type, rel_mse, codes_changed}}, exact: layers written as a 32-weight
    type}) and ``mmproj_file``."""
    from signround.adapters.checkpoint.gguf_mmproj import VISION_FAMILIES, mmproj_problems, write_mmproj

    gguf = _gguf()
    model_type = getattr(model.config, "model_type", "")
    family = VISION_FAMILIES.get(model_type)
    cfg = model.config.get_text_config() if family else model.config
    text_type = getattr(cfg, "model_type", "")
    if text_type not in GGUF_ARCHS:
        raise NotImplementedError(f"GGUF export covers {sorted(GGUF_ARCHS)} text decoders (and the VLMs "
                                  f"{sorted(VISION_FAMILIES)}), not {model_type!r}")
    arch, permute = GGUF_ARCHS[text_type]
    prefix = family.text_prefix if family else "model."
    qweights = {n: qw for n, qw in qweights.items() if n.startswith(prefix) or n.startswith("lm_head")}
    problems = _text_problems(arch, cfg) + (mmproj_problems(model, family) if family else [])
    if problems:  # before either file is written
        raise ValueError(f"{path.name}: llama.cpp would not compute what this {model_type} computes: "
                         + "; ".join(problems))
    problems = gguf_problems(fmt, [(n, qw.codes.shape[1], qw.spec) for n, qw in qweights.items()])
    if problems:  # in_features is only known here when the plan was not checked against llama.cpp
        raise ValueError(f"{path.name}: " + "; ".join(problems))
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    main = fmt.split(":", 1)[1]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(getattr(model.config, "_name_or_path", "") or model_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = _rope(cfg).get("rope_theta")
    if rope is not None:
        writer.add_rope_freq_base(float(rope))
    _add_arch_keys(writer, arch, cfg)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main.upper()}"))
    unwritten = add_tokenizer(writer, tokenizer, cfg.vocab_size, cfg) if tokenizer is not None else None
    if unwritten:
        warnings.warn(f"{path.name}: no tokenizer metadata was written: the tokenizer ({type(tokenizer).__name__}) "
                      f"is neither a byte-level BPE nor a SentencePiece-style vocabulary llama.cpp reads "
                      f"({unwritten}); llama.cpp needs it to load the file (transformers' gguf loader reads the "
                      "weights without it)", stacklevel=4)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    factors = llama3_rope_factors(cfg) if arch == "llama" else None
    if factors is not None:  # llama.cpp divides each rotary frequency by its factor
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    report: dict[str, Any] = {}
    exact: list[str] = []
    for key, tensor in model.state_dict().items():
        if (tied and key.startswith("lm_head.")) or not key.startswith((prefix, "lm_head.")):
            continue  # a VLM's vision tower and connector go to the mmproj file
        hf = "model." + key[len(prefix):] if key.startswith(prefix) else key  # HF's text-model names
        target = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if target is None:
            if "rotary_emb" in key:
                continue
            raise NotImplementedError(f"{key}: no GGUF tensor name for it in the {arch} architecture")
        module, _, leaf = key.rpartition(".")
        rows = n_head if key.endswith("q_proj.weight") or key.endswith("q_proj.bias") else n_kv
        needs_permute = permute and module.endswith(("q_proj", "k_proj"))
        if module in qweights and leaf == "weight":
            qw = qweights[module]
            if needs_permute:
                qw = QuantizedWeight(_permute(qw.codes, rows), _permute(qw.scale, rows), _permute(qw.zero, rows), qw.spec)
            type_name = gguf_type(fmt, qw.spec, qw.codes.shape[1])
            assert type_name is not None, module
            if type_name in GGUF_KTYPES:
                kb = encode_kquant(qw, type_name)
                data = kb.blocks
                report[module] = {"type": type_name, "rel_mse": kb.rel_mse, "codes_changed": kb.codes_changed}
            else:
                data = encode_blocks(qw, type_name)
                if main in GGUF_KFORMATS:
                    exact.append(module)
            writer.add_tensor(target, data, raw_dtype=getattr(gguf.GGMLQuantizationType, type_name.upper()))
            continue
        t = tensor.detach().float()
        if needs_permute:
            t = _permute(t, rows)
        if arch == "gemma3" and key.endswith("norm.weight"):
            t = t + 1  # Gemma3RMSNorm scales by 1 + w, llama.cpp by w (its converter adds the 1)
        data = t.numpy().astype(np.float16 if t.dim() == 2 else np.float32)
        writer.add_tensor(target, data)
    out: dict[str, Any] = {}
    if main in GGUF_KFORMATS:
        import json

        out["requantization"] = {"layers": report, "exact": exact}
        writer.add_string("signround.requantization", json.dumps(out["requantization"]))
        warnings.warn(_requant_message(path.name, fmt, report, exact), stacklevel=4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if family:
        out["mmproj_file"] = write_mmproj(model, path.parent / "mmproj-model-f16.gguf", family, image_processor).name
    return out


def _requant_message(name: str, fmt: str, report: Mapping[str, Mapping[str, Any]], exact: list[str]) -> str:
    """One line saying what a k-quant export changed against SignRound's grid."""
    parts = []
    for t in sorted({r["type"] for r in report.values()}):
        rows = [(n, r) for n, r in report.items() if r["type"] == t]
        worst = max(rows, key=lambda nr: nr[1]["rel_mse"])
        mean = sum(r["rel_mse"] for _, r in rows) / len(rows)
        changed = sum(r["codes_changed"] for _, r in rows) / len(rows)
        parts.append(f"{len(rows)} layer(s) {t.upper()}: relative MSE vs SignRound's grid mean {mean:.2e}, max "
                     f"{worst[1]['rel_mse']:.2e} ({worst[0]}), {changed:.2%} of codes re-rounded")
    if exact:
        parts.append(f"{len(exact)} layer(s) written exactly as 32-weight blocks (in_features not a multiple of "
                     f"256, e.g. {exact[0]})")
    return (f"{name}: {fmt} re-quantizes SignRound's fp16 group scales to the k-quants' sub-block scales and "
            "re-rounds the codes against them; " + "; ".join(parts)
            + " (report: the file's signround.requantization key)")
