"""`load_quantized(path)`: a Hugging Face model with our `QuantLinear`s, from a local checkpoint.

Reads `auto_round` (every packing) and `auto_gptq` checkpoints, ours or the auto-round
package's; `config.parse_quantization_config` tells the packing and each layer's grid. Local
files only: nothing is fetched from the Hub. The model is built with empty (meta) parameters,
quantized Linears are swapped for `QuantLinear`, and the safetensors are assigned in place, so
peak memory is about the checkpoint's size.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signround.adapters.checkpoint.config import parse_quantization_config, read_quantization_config
from signround.adapters.checkpoint.files import checkpoint_keys, from_checkpoint_namer, iter_tensors, to_checkpoint_namer
from signround.adapters.checkpoint.kernels import check_kernel_name, prepare_model
from signround.adapters.checkpoint import compressed
from signround.adapters.checkpoint.formats import COMPRESSED_METHOD
from signround.adapters.checkpoint.qlinear import QuantLinear


def _dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return getattr(torch, value.removeprefix("torch."), None)
    return None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _stored_dtype(path: Path) -> torch.dtype:
    """The most common float dtype among the non-packed tensors (for configs that name none)."""
    from collections import Counter

    from safetensors import safe_open

    from signround.adapters.checkpoint.files import safetensors_files

    counts: Counter[torch.dtype] = Counter()
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if not k.endswith((".scales", ".bias")):
                    dt = _SAFETENSORS_DTYPES.get(fh.get_slice(k).get_dtype())
                    if dt is not None:
                        counts[dt] += 1
    return counts.most_common(1)[0][0] if counts else torch.float32


def _model_class(config: Any) -> type:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModelForVision2Seq", "AutoModel"):
        mapping = getattr(transformers, auto, None)
        mapping = getattr(mapping, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]
    raise ValueError(f"cannot tell which transformers class builds model_type {config.model_type!r} "
                     f"(architectures {getattr(config, 'architectures', None)}); pass model_class=")


def _unfuse_stored_experts(model: nn.Module, keys: list[str]) -> list[str]:
    """Swap each stacked experts module for one Linear per expert matrix (`hf.experts`) when the
    checkpoint stores that module per expert ("….experts.0.w1.qweight", as `save_quantized` writes
    MoE models); modules stored as 3D tensors stay as they are. Returns the unfused names."""
    from signround.adapters.hf.experts import expert_leaf_names, is_stacked_experts, unfused_from

    stacked = [n for n, m in model.named_modules() if is_stacked_experts(m)]
    if not stacked:
        return []
    leaves = expert_leaf_names(model)
    to_ckpt = to_checkpoint_namer(model)
    stored = tuple(keys)
    out = []
    for name in stacked:
        head = to_ckpt(f"{name}.0.{leaves.gate}.weight")[0].removesuffix("weight")  # "….experts.0.w1."
        if any(k.startswith(head) for k in stored):
            model.set_submodule(name, unfused_from(model.get_submodule(name), leaves))
            out.append(name)
    return out


def load_quantized(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_class: type | None = None,
    cache_weights: bool = False,
    kernel: str = "auto",
) -> nn.Module:
    """Build the model of the checkpoint at `path` with packed layers as `QuantLinear`.

    dtype: of the non-quantized weights and the compute (default: the checkpoint's dtype);
    packed tensors keep theirs (int32 words, fp16 scales). model_class: override the class picked
    from `config.architectures`. cache_weights: keep each dequantized weight after first use.
    kernel: how the packed layers run (`kernels.KERNEL_NAMES`): "auto" picks, per layer, the first of
    torch's int4/int8 kernels that serves it on `device` in `dtype`, else the dequantizing reference;
    a name forces that kernel (an error if it cannot serve a layer). The choice is logged
    (logger ``signround.kernels``) and kept on each layer (`QuantLinear.kernel`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    check_kernel_name(kernel)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local checkpoint directory (no config.json); "
                                "load_quantized never downloads")
    qc = read_quantization_config(path)
    packing, plan = parse_quantization_config(qc)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    dtype = dtype or _dtype(getattr(config, "dtype", None)) or _stored_dtype(path)
    cls = model_class or _model_class(config)
    quantization = getattr(config, "quantization_config", None)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # building must not start transformers' own quantizer
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config") else cls(config)

    keys = checkpoint_keys(path)
    _unfuse_stored_experts(model, keys)
    tensors = lambda: iter_tensors(path)  # noqa: E731
    if str(qc.get("quant_method", "")).lower() == COMPRESSED_METHOD:  # read as the native packing
        keys, tensors = compressed.native_keys(keys), lambda: compressed.native_tensors(iter_tensors(path), plan.spec)
    module_keys = model.state_dict().keys()
    namer = from_checkpoint_namer(model, module_keys)
    key_map: dict[str, str] = {}
    for k in keys:
        new, converted = namer(k)
        if converted and k.endswith((".qweight", ".qzeros", ".scales")):
            raise NotImplementedError(f"{k}: transformers converts this tensor on load; not supported for packed layers")
        key_map[k] = new
    stored = set(keys)
    for ckpt_key, module_key in key_map.items():
        if not module_key.endswith(".qweight"):
            continue
        name, ckpt_name = module_key[: -len(".qweight")], ckpt_key[: -len(".qweight")]
        linear = model.get_submodule(name)
        spec = plan.spec(name, ckpt_name)
        if spec is None:
            raise ValueError(f"{ckpt_name} has packed weights but the quantization_config keeps it at 16 bits")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: packed weights for a {type(linear).__name__}, expected nn.Linear")
        ql = QuantLinear(linear.in_features, linear.out_features, spec, bias=f"{ckpt_name}.bias" in stored,
                         packing=packing, compute_dtype=dtype, cache_weight=cache_weights, device="cpu")
        model.set_submodule(name, ql)

    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for ckpt_key, tensor in tensors():
        key = key_map[ckpt_key]
        target = state.get(key)
        if target is None:
            unexpected.append(ckpt_key)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{ckpt_key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(target.shape)}")
        owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
        if tensor.is_floating_point() and not isinstance(owner, QuantLinear):
            tensor = tensor.to(dtype)
        loaded[key] = tensor.to(target.dtype) if isinstance(owner, QuantLinear) else tensor
    if unexpected:
        warnings.warn(f"{len(unexpected)} checkpoint tensors have no place in the model and were skipped, "
                      f"e.g. {unexpected[:3]}", stacklevel=2)
    model.load_state_dict(loaded, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{len(missing)} weights are missing from the checkpoint at {path}, e.g. {missing[:5]}")
    if quantization is not None:
        model.config.quantization_config = quantization
    if (path / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model = model.to(device).eval()
    prepare_model(model, kernel)
    return model
