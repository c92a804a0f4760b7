"""Export a quantized (fake-quant) model as an `auto_round` or `auto_gptq` checkpoint.

Input: the model whose quantized Linears hold their on-grid weights, and per layer its grid and
scale/zero (`LayerQuant`, or the engine's `LayerResult`: anything with .spec/.scale/.zero). Codes
are recovered exactly, packed by `QuantLinear.from_quantized`, written as sharded safetensors with
the `quantization_config` the reference writes. Everything goes to a temporary directory that is
renamed at the end. Field-by-field description: spec/format.md.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from signround.adapters.checkpoint.config import build_quantization_config, in_blocks
from signround.adapters.checkpoint.files import LayerQuant, atomic_dir, recover_codes, to_checkpoint_namer, write_safetensors
from signround.adapters.checkpoint.formats import (COMPRESSED_METHOD, DEFAULT_FORMAT, GGUF_METHOD, PACKED_TENSORS,
                                                  Packing, choose_packing, get_format, parse_formats)
from signround.adapters.checkpoint.targets import plan_view, require_loadable
from signround.adapters.checkpoint.qlinear import QuantLinear
from signround.adapters.engine.device import release_host_memory
from signround.rounding.recipe import Recipe
from signround.rounding.spec import QuantSpec


class HasGrid(Protocol):
    spec: QuantSpec
    scale: Tensor
    zero: Tensor


def format_dirname(fmt: str) -> str:
    """Sub-folder name for one of several formats, as the reference names it."""
    return fmt.replace(":", "-").replace("_", "-")


def _formats(format: str | Sequence[str]) -> list[str]:
    return list(parse_formats(format))


def global_spec(layer_results: Mapping[str, HasGrid]) -> QuantSpec:
    """The spec most layers use (the checkpoint's top-level bits/group_size/sym)."""
    if not layer_results:
        raise ValueError("no quantized layers to export (layer_results is empty)")
    return Counter(r.spec for r in layer_results.values()).most_common(1)[0][0]


def _block_prefixes(model: nn.Module, names: Iterable[str],
                    block_name_to_quantize: str | Sequence[str] | None) -> list[str]:
    if block_name_to_quantize is not None:
        items = [block_name_to_quantize] if isinstance(block_name_to_quantize, str) else list(block_name_to_quantize)
        return [p.strip() for item in items for p in item.split(",") if p.strip()]
    # infer: the nearest ModuleList above each quantized layer
    lists = {n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:i]) in lists:
                found[".".join(parts[:i])] = None
                break
    return list(found)


def _pack(model: nn.Module, layer_results: Mapping[str, HasGrid], packing: Packing) -> dict[str, QuantLinear]:
    """One QuantLinear per quantized layer (codes recovered and verified)."""
    packed: dict[str, QuantLinear] = {}
    for name, r in layer_results.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"layer_results names {name!r}, which is not a module of the model") from None
        if isinstance(module, QuantLinear):
            raise ValueError(f"layer {name} is already packed (a QuantLinear): the model was exported with "
                             "inplace=True before; export all formats in one call, or use inplace=False")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"layer {name} is a {type(module).__name__}; only nn.Linear layers can be exported")
        lq = LayerQuant(r.spec, r.scale, r.zero)
        qw = recover_codes(name, module.weight, lq)
        packed[name] = QuantLinear.from_quantized(qw, module.bias, packing=packing,
                                                  compute_dtype=module.weight.dtype, name=name)
        del qw
        # the layer's recovery temporaries (int32 codes, dequantized checks) are freed here; glibc would
        # keep them in its heap, so a model's export held many layers' worth (spec/performance.md, issue 16)
        release_host_memory()
    return packed


def _packed_state_dict(model: nn.Module, packed: Mapping[str, QuantLinear],
                       state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's state dict (or the part of it given as `state`) with each packed layer's
    weight/bias replaced by its buffers."""
    state = model.state_dict() if state is None else dict(state)
    for name, ql in packed.items():
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
        state.update({f"{name}.{k}": v for k, v in ql.state_dict().items()})
    try:  # tied weights (lm_head ↔ embeddings) are stored once, as save_pretrained does
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        state = remove_tied_weights_from_state_dict(state, model)
    except (ImportError, TypeError, AttributeError):
        seen: set[tuple[int, int]] = set()
        for key in list(state):
            t = state[key]
            ident = (t.untyped_storage().data_ptr(), t.storage_offset())
            if ident in seen and t.numel():
                del state[key]
            seen.add(ident)
    return state


def _checkpoint_state(model: nn.Module, state: dict[str, Tensor], quantized_keys: set[str]) -> dict[str, Tensor]:
    """Rename to checkpoint keys as `save_pretrained` would (transformers ≥ 5 reverts its renamings)."""
    namer = to_checkpoint_namer(model)
    # Plain tensors take the namer's names too (it also restores a sub-model's dropped prefix, e.g.
    # CLIP's `vision_model.`); those stored through a conversion op go through transformers' revert.
    plain, converted_keys = {}, {}
    for k, v in state.items():
        if k not in quantized_keys:
            new, converted = namer(k)
            if converted:
                converted_keys[k] = v
            else:
                plain[new] = v
    if converted_keys:
        try:
            from transformers.core_model_loading import revert_weight_conversion
            converted_keys = revert_weight_conversion(model, converted_keys)
        except ImportError:
            pass
    out = {**plain, **converted_keys}
    for key in quantized_keys & state.keys():
        new, converted = namer(key)
        if converted:
            raise NotImplementedError(f"{key}: transformers stores this weight through a conversion op; packed "
                                      "layers of this family cannot be exported yet — keep the layer in full precision")
        out[new] = state[key]
    return out


def export_view(model: nn.Module, layer_results: Mapping[str, HasGrid], fmt: str,
                block_prefixes: Sequence[str]):  # -> targets.CheckpointView
    """What a runtime will see of this export: every Linear inside the blocks (quantized or not)
    and the quantized ones outside (lm_head), with shapes and grids."""
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and (n in layer_results or in_blocks(n, block_prefixes))}
    return plan_view(fmt, shapes, {n: r.spec for n, r in layer_results.items()}, block_prefixes,
                     tied_lm_head=_tied_lm_head(model))


def _tied_lm_head(model: nn.Module) -> bool:
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)


def _save_side_files(tmp: Path, tokenizer: Any, processor: Any, image_processor: Any) -> None:
    if processor is not None and not hasattr(processor, "chat_template"):
        processor.chat_template = None  # some processors fail to save without the attribute
    for obj in (tokenizer, processor, image_processor):
        if obj is not None:
            obj.save_pretrained(str(tmp))


def _write_config(model: nn.Module, tmp: Path, qc: dict[str, Any], fmt: str) -> None:
    config = copy.deepcopy(model.config)
    config.quantization_config = qc
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(tmp))
    path = tmp / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"] = qc
    f = get_format(fmt)
    dtype = f.declared_dtype or data.get("dtype") or data.get("torch_dtype")
    if dtype is None:
        dtype = str(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)).split(".")[-1]
    data["dtype"] = data["torch_dtype"] = dtype  # new and old spelling, for transformers 4.x and 5.x
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (tmp / f.config_file).write_text(json.dumps(qc, indent=2) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        try:
            gen.save_pretrained(str(tmp))
        except ValueError as e:  # an invalid generation config must not cost the checkpoint
            warnings.warn(f"generation_config.json not written: {e}", stacklevel=3)


def quantization_config_of(model: nn.Module, layer_results: Mapping[str, HasGrid], fmt: str, spec: QuantSpec,
                           block_prefixes: Sequence[str], recipe: Recipe | None,
                           extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `quantization_config` of `fmt` for these layers (fp Linears inside the blocks listed)."""
    # fp layers inside the blocks: every Linear under a block prefix that has no result, and the
    # MoE routers (vLLM builds Qwen3-MoE's gate with the quant config, so it must be told bits 16)
    fp_in_blocks = [n for n, m in model.named_modules()
                    if (isinstance(m, nn.Linear) or _is_router(m)) and n not in layer_results
                    and in_blocks(n, block_prefixes)]
    namer = to_checkpoint_namer(model)
    ckpt_prefixes = list(dict.fromkeys(namer(f"{p}.0.weight")[0].rsplit(".0.weight", 1)[0] for p in block_prefixes))
    name = _config_namer(namer, block_prefixes)
    return build_quantization_config(fmt, spec, {name(n): r.spec for n, r in layer_results.items()},
                                     [name(n) for n in fp_in_blocks], block_prefixes, ckpt_prefixes, recipe, extra_info)


def _is_router(module: nn.Module) -> bool:
    """A MoE router (transformers 5: `…TopKRouter`, a 2D weight, not an nn.Linear)."""
    weight = getattr(module, "weight", None)
    return "router" in type(module).__name__.lower() and isinstance(weight, Tensor) and weight.dim() == 2


def _config_namer(namer: Any, block_prefixes: Sequence[str]) -> Any:
    """The name a layer has in `extra_config`: its module name, unless transformers renames it
    inside its block (Mixtral: ``.block_sparse_moe.`` ↔ ``.mlp.``), where the checkpoint's name is
    written, since vLLM matches extra_config against modules named as the checkpoint is. Renamed
    block prefixes alone (Qwen2-VL's ``model.language_model.layers``) keep the module name, which
    vLLM's own mapper translates."""
    pairs = [(p, namer(f"{p}.0.weight")[0].rsplit(".0.weight", 1)[0]) for p in block_prefixes]

    def name(module_name: str) -> str:
        ckpt = namer(f"{module_name}.weight")[0].removesuffix(".weight")
        for p, cp in pairs:
            if module_name.startswith(p + ".") and ckpt.startswith(cp + "."):
                return ckpt if module_name[len(p):] != ckpt[len(cp):] else module_name
        return module_name

    return name


def checkpoint_tensors(model: nn.Module, state: dict[str, Tensor], packed: Mapping[str, QuantLinear],
                       fmt: str) -> dict[str, Tensor]:
    """`state` (module keys, packed layers' buffers in place of their weights; all of the model or
    a part of it) as `fmt` stores it: dtypes the format declares, checkpoint key names."""
    quantized_keys = {f"{n}.{k}" for n, ql in packed.items() for k in ql.state_dict()}
    declared = get_format(fmt).declared_dtype
    if declared is not None:  # float32 tensors follow the declared dtype (bf16 ones are kept, as the reference does)
        target = getattr(torch, declared)
        state = {k: (v.to(target) if v.dtype == torch.float32 and k not in quantized_keys else v)
                 for k, v in state.items()}
    return _checkpoint_state(model, state, quantized_keys)


def _export_compressed(model: nn.Module, layer_results: Mapping[str, HasGrid], tmp: Path, fmt: str, *,
                       max_shard_size: int | str, side_files: tuple[Any, Any, Any]
                       ) -> tuple[dict[str, QuantLinear], dict[str, Any]]:
    """compressed-tensors (`compressed.py`): each layer's codes as weight_packed / weight_scale /
    weight_zero_point / weight_shape; Linears without a result are listed in `ignore`."""
    from signround.adapters.checkpoint import compressed

    packed = _pack(model, layer_results, choose_packing(fmt, global_spec(layer_results)))  # inplace=True keeps these
    state = _packed_state_dict(model, packed)
    quantized_keys: set[str] = set()
    for name, ql in packed.items():
        for suffix in PACKED_TENSORS:
            state.pop(f"{name}.{suffix}", None)
        for suffix, tensor in compressed.pack_layer(ql.quantized_weight()).items():
            state[f"{name}.{suffix}"] = tensor
            quantized_keys.add(f"{name}.{suffix}")
    namer = to_checkpoint_namer(model)
    ckpt = {n: namer(f"{n}.weight")[0].removesuffix(".weight") for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}
    qc = compressed.build_config({ckpt[n]: r.spec for n, r in layer_results.items()},
                                 [c for n, c in ckpt.items() if n not in layer_results])
    write_safetensors(_checkpoint_state(model, state, quantized_keys), tmp, max_shard_size)
    _write_config(model, tmp, qc, fmt)
    _save_side_files(tmp, *side_files)
    return packed, qc


def _export_gguf(model: nn.Module, layer_results: Mapping[str, HasGrid], tmp: Path, fmt: str, *,
                 side_files: tuple[Any, Any, Any]) -> tuple[dict[str, QuantLinear], dict[str, Any]]:
    """GGUF (`gguf.py`): the text decoder as one ``model-<type>.gguf`` file, tokenizer included when given;
    a VLM's vision tower as ``mmproj-model-f16.gguf`` beside it."""
    from signround.adapters.checkpoint.gguf import write_gguf

    packed = _pack(model, layer_results, choose_packing(fmt, global_spec(layer_results)))  # inplace=True keeps these
    name = f"model-{fmt.split(':', 1)[1]}.gguf"
    tokenizer, processor, image_processor = side_files
    extra = write_gguf(model, {n: ql.quantized_weight() for n, ql in packed.items()}, tmp / name, fmt,
                       tokenizer=tokenizer or getattr(processor, "tokenizer", None),
                       image_processor=image_processor or getattr(processor, "image_processor", None))
    return packed, {"quant_method": GGUF_METHOD, "gguf_file": name, **extra}


def _export_one(model: nn.Module, layer_results: Mapping[str, HasGrid], tmp: Path, fmt: str, *,
                spec: QuantSpec, block_prefixes: Sequence[str], recipe: Recipe | None,
                extra_info: Mapping[str, Any] | None, max_shard_size: int | str,
                side_files: tuple[Any, Any, Any]) -> tuple[dict[str, QuantLinear], dict[str, Any]]:
    """Write one format into `tmp`; returns the packed layers and the quantization_config."""
    if get_format(fmt).quant_method == COMPRESSED_METHOD:
        return _export_compressed(model, layer_results, tmp, fmt, max_shard_size=max_shard_size, side_files=side_files)
    if get_format(fmt).quant_method == GGUF_METHOD:
        return _export_gguf(model, layer_results, tmp, fmt, side_files=side_files)
    packed = _pack(model, layer_results, choose_packing(fmt, spec, [r.spec for r in layer_results.values()]))
    qc = quantization_config_of(model, layer_results, fmt, spec, block_prefixes, recipe, extra_info)
    state = checkpoint_tensors(model, _packed_state_dict(model, packed), packed, fmt)
    write_safetensors(state, tmp, max_shard_size)
    _write_config(model, tmp, qc, fmt)
    _save_side_files(tmp, *side_files)
    return packed, qc


def save_quantized(
    model: nn.Module,
    layer_results: Mapping[str, HasGrid],
    out_dir: str | Path,
    *,
    format: str | Sequence[str] = DEFAULT_FORMAT,
    inplace: bool = True,
    tokenizer: Any = None,
    processor: Any = None,
    image_processor: Any = None,
    block_name_to_quantize: str | Sequence[str] | None = None,
    recipe: Recipe | None = None,
    extra_info: Mapping[str, Any] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    targets: Sequence[str] = (),
) -> Path | dict[str, Path]:
    """Write `model` as a packed checkpoint in `out_dir`; returns its path (one path per format
    when several are asked for: sub-folders named like ``auto-round``, ``auto-gptq``).

    layer_results: full module name → grid (`LayerQuant` or the engine's `LayerResult`); those
    Linears must hold exactly `scale · (codes − zero)`. block_name_to_quantize: block list
    prefixes (module names, e.g. "model.language_model.layers"); inferred from the layers when
    None. inplace=True swaps the Linears for the packed `QuantLinear`s once the checkpoint is
    written (the model keeps working; no full copy is made either way; with several formats the
    last one's layers); inplace=False leaves the fake-quant model untouched. recipe / extra_info add
    informational keys to `quantization_config`. Refuses a non-empty `out_dir` unless `overwrite`.
    targets: runtimes that must load every format written (`targets.TARGETS`); checked before
    anything is written (`targets.UnloadableError` names each problem).
    """
    fmts = _formats(format)
    spec = global_spec(layer_results)
    block_prefixes = _block_prefixes(model, layer_results, block_name_to_quantize)
    for fmt in fmts:
        refusal = get_format(fmt).refusal({n: r.spec for n, r in layer_results.items()})
        if refusal:
            raise ValueError(refusal)
        if targets:
            require_loadable(export_view(model, layer_results, fmt, block_prefixes), targets)
    side = (tokenizer, processor, image_processor)
    common = dict(spec=spec, block_prefixes=block_prefixes, recipe=recipe, extra_info=extra_info,
                  max_shard_size=max_shard_size, side_files=side)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for fmt in fmts:
            sub = tmp if len(fmts) == 1 else tmp / format_dirname(fmt)
            sub.mkdir(exist_ok=True)
            packed, qc = _export_one(model, layer_results, sub, fmt, **common)
    if inplace:  # only once the checkpoint is in place: a failed save leaves the model as it was
        for name, ql in packed.items():
            model.set_submodule(name, ql)
        if hasattr(model, "config"):
            model.config.quantization_config = qc
    out = Path(out_dir).resolve()
    return out if len(fmts) == 1 else {f: out / format_dirname(f) for f in fmts}
