"""GGUF export of the text decoder (llama.cpp's file format), written with the `gguf` package.

The container (header, metadata, tensor index, alignment) is the `gguf` package's `GGUFWriter`;
this module maps the model onto it: tensor names through `gguf.get_tensor_name_map`, the
hyper-parameters llama.cpp reads for the family, the tokenizer (byte-level BPE, as llama.cpp's
``gpt2`` model; other kinds are left out with a warning), and each quantized layer's SignRound codes and scales as ggml blocks of 32 weights:

| type | our grid (group_size 32) | block (bytes) | dequantization (ggml) |
|---|---|---|---|
| Q4_0 | 4-bit sym, w = s·(q − 8) | fp16 d = s, 16 bytes: q[j] | q[j+16] << 4 | d·(q − 8) |
| Q4_1 | 4-bit asym, w = s·(q − z) | fp16 d = s, fp16 m = −s·z, 16 bytes as Q4_0 | d·q + m |
| Q8_0 | 8-bit sym, w = s·(q − 128) | fp16 d = s, 32 int8 q − 128 | d·q |

Q4_0 and Q8_0 hold our codes and fp16 scales exactly; Q4_1 rounds m = −s·z to fp16 (the codes
and d are exact). Full-precision Linears and embeddings are F16, norms and biases F32.
Llama/Mistral q and k rows are permuted to llama.cpp's rotary layout (pairs interleaved), as its
converter does; Qwen2 keeps HF's (NeoX) layout. The k-quants (Q4_K, Q2_K, …) are not written:
their 256-weight super-blocks store 6/4-bit sub-block scales relative to one fp16 scale, so
SignRound's fp16 group scales do not map onto them without re-quantizing the scales.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signround.adapters.checkpoint.formats import GGUF_TYPES
from signround.rounding.grid import QuantizedWeight

#: model_type -> (gguf architecture, q/k rows permuted to llama.cpp's rotary layout)
GGUF_ARCHS: Mapping[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                              "qwen2": ("qwen2", False)}


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
    elif type_name == "q8_0":
        parts = [_fp16_bytes(scale), (codes - 128).astype(np.int8).view(np.uint8)]
    else:
        raise ValueError(f"GGUF type {type_name!r} is not written by signround; choose from {sorted(GGUF_TYPES)}")
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def type_of(spec: Any) -> str | None:
    """The GGUF type holding a grid exactly, or None."""
    return next((t for t, (bits, sym) in GGUF_TYPES.items()
                 if spec.bits == bits and spec.sym == sym and spec.group_size == 32), None)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (rows only: groups run along K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, tokenizer: Any) -> bool:
    """Write a byte-level BPE tokenizer as llama.cpp's ``gpt2`` model; False (nothing written) for
    any other kind (SentencePiece, byte-fallback BPE, word-level)."""
    import json

    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return False
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.NORMAL
    for added in tokenizer.added_tokens_decoder.values():
        i = vocab[added.content]
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            setter(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return True


def write_gguf(model: nn.Module, qweights: Mapping[str, QuantizedWeight], path: Path, fmt: str,
               tokenizer: Any = None) -> Path:
    """Write the text decoder of `model` to `path` (a .gguf file). qweights: module name → its codes
    and grid (every quantized layer, each a GGUF type: `formats.gguf_problems`)."""
    gguf = _gguf()
    cfg = model.config
    model_type = getattr(cfg, "model_type", "")
    if model_type not in GGUF_ARCHS:
        raise NotImplementedError(f"GGUF export covers {sorted(GGUF_ARCHS)} text decoders, not {model_type!r}")
    arch, permute = GGUF_ARCHS[model_type]
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    main = fmt.split(":", 1)[1]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(getattr(cfg, "_name_or_path", "") or model_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    if rope is not None:
        writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main.upper()}"))
    if tokenizer is not None and not _add_tokenizer(writer, tokenizer):
        warnings.warn(f"{path.name}: the tokenizer ({type(tokenizer).__name__}) is not a byte-level BPE, so no "
                      "tokenizer metadata was written: llama.cpp needs it to load the file (transformers' gguf "
                      "loader reads the weights without it)", stacklevel=4)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key.startswith("lm_head."):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
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
            type_name = type_of(qw.spec)
            assert type_name is not None, module
            writer.add_tensor(target, encode_blocks(qw, type_name),
                              raw_dtype=getattr(gguf.GGMLQuantizationType, type_name.upper()))
            continue
        t = tensor.detach().float()
        if needs_permute:
            t = _permute(t, rows)
        data = t.numpy().astype(np.float16 if t.dim() == 2 else np.float32)
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
