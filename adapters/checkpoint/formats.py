"""The one table of checkpoint layouts: packings (how a Linear's codes lie in int32 words) and the
export formats that use them (see spec/format.md).

A *packing* is what `QuantLinear` needs to read or write a layer's tensors: the zero-point offset,
whether a ``g_idx`` is stored, and the word layout (GPTQ rows or AWQ columns). An *export format*
is what `save_quantized(format=...)` writes: a `quant_method`, a side config file, and the rule
choosing the packing for a plan (`choose_packing`). `packing_of_config` reads a packing back from
a `quantization_config`. Nothing else in the code spells a packing name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from signround.rounding.spec import QuantSpec

#: AWQ word slot s (bits 4s..4s+3) holds column AWQ_ORDER[s] of each run of 8 output columns
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_SLOT = (0, 4, 1, 5, 2, 6, 3, 7)  # column p sits in slot AWQ_SLOT[p]
#: the tensors a packed Linear `name` stores as `name.<suffix>` (plus `name.bias` when it has one)
PACKED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
AUTO_ROUND_METHOD = "auto-round"
GPTQ_METHOD = "gptq"
COMPRESSED_METHOD = "compressed-tensors"  # llm-compressor's checkpoints (adapters/checkpoint/compressed.py)
GGUF_METHOD = "gguf"  # llama.cpp's single-file format (adapters/checkpoint/gguf.py)
#: GGUF block types that hold a SignRound grid exactly: name -> (bits, sym), 32 weights per block (Q5_0 / Q5_1
#: are also llama.cpp's fallback for Q5_K where in_features is not a multiple of 256)
GGUF_TYPES: Mapping[str, tuple[int, bool]] = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True),
                                            "q5_1": (5, False), "q8_0": (8, True)}
GGUF_BLOCK = 32
#: llama.cpp k-quant types: name -> the SignRound grid (bits, sym, group_size) mapped onto it. Their
#: 256-weight super-blocks re-quantize the group scales to 4/6/8-bit sub-block scales and re-round the
#: codes (`gguf_kquants.py`): not exact, and only the k-quant formats below write them
GGUF_KTYPES: Mapping[str, tuple[int, bool, int]] = {"q4_k": (4, False, 32), "q6_k": (6, True, 16),
                                                    "q2_k": (2, False, 16), "q3_k": (3, True, 16),
                                                    "q5_k": (5, False, 32)}
GGUF_SUPER_BLOCK = 256
_K_ORDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
#: k-quant format -> its base type (every layer llama.cpp's mix does not raise; `gguf.llama_cpp_mix`)
GGUF_KBASE: Mapping[str, str] = {"q2_k_s": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
                                 "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k"}
#: k-quant formats -> the k types each writes: its base type and every wider one (the mix raises layers)
GGUF_KFORMATS: Mapping[str, tuple[str, ...]] = {f: _K_ORDER[_K_ORDER.index(b):] for f, b in GGUF_KBASE.items()}
_GPTQ_BITS = (2, 3, 4, 5, 6, 7, 8)  # the bit stream of rounding/pack.py holds any width


@attrs.frozen
class Packing:
    """One tensor layout of a packed Linear (K = in_features, N = out_features).

    zero_offset: subtracted from the zero point before it is packed (GPTQ v1 stores z − 1).
    has_g_idx: a ``g_idx`` int32 [K] is stored. awq: qweight is [K, N·bits/32] packed along N with
    AWQ's column interleave (`AWQ_ORDER`), else [K·bits/32, N] packed along K. bits: the widths
    the layout holds. packing_format / checkpoint_format: how a `quantization_config` names it
    under quant_method ``auto-round`` / ``gptq`` (None: not spelled there).
    """

    name: str
    zero_offset: int
    has_g_idx: bool
    awq: bool
    bits: tuple[int, ...]
    packing_format: str | None = None
    checkpoint_format: str | None = None

    @property
    def layout(self) -> str:
        return "AWQ" if self.awq else "GPTQ"

    def check_bits(self, bits: int) -> None:
        if bits not in self.bits:
            widths = "/".join(str(b) for b in self.bits)
            raise ValueError(f"the {self.layout} layout is {widths}-bit only, got {bits} bits")

    def qweight_shape(self, in_features: int, out_features: int, bits: int) -> tuple[int, int]:
        if self.awq:
            return in_features, -(-out_features * bits // 32)
        return -(-in_features * bits // 32), out_features

    def features(self, qweight_shape: tuple[int, ...], bits: int) -> tuple[int, int]:
        """(in_features, out_features) of a layer from its qweight shape (the inverse of `qweight_shape`
        for the multiple-of-32 shapes that are packed)."""
        rows, cols = qweight_shape[0], qweight_shape[1]
        if self.awq:
            return rows, cols * 32 // bits
        return rows * 32 // bits, cols


PACKINGS: Mapping[str, Packing] = {p.name: p for p in (
    Packing("auto_round:auto_gptq", 1, False, False, _GPTQ_BITS, packing_format="auto_round:auto_gptq"),
    Packing("auto_round", 0, False, False, _GPTQ_BITS, packing_format="auto_round"),
    # read only: auto-round's GPTQModel packing, and GPTQModel's own `checkpoint_format: gptq_v2`
    Packing("auto_round:gptqmodel", 0, True, False, _GPTQ_BITS, packing_format="auto_round:gptqmodel",
            checkpoint_format="gptq_v2"),
    Packing("auto_gptq", 1, True, False, _GPTQ_BITS, checkpoint_format="gptq"),
    # AWQ columns as a bit stream along N: 4-bit is AWQ's own layout; 2/3/5/6/7 are what vLLM's Humming
    # AWQ schema reads (a dense stream, then the 8-column interleave), and auto-round's humming_awq backend
    Packing("auto_round:auto_awq", 0, False, True, _GPTQ_BITS, packing_format="auto_round:auto_awq"),
)}
SYM_PACKING = PACKINGS["auto_round:auto_gptq"]  # auto_round, sym; also QuantLinear's default
NATIVE_PACKING = PACKINGS["auto_round"]  # auto_round, asym (GPTQ v1 cannot hold z = 0)
AWQ_PACKING = PACKINGS["auto_round:auto_awq"]  # auto_round, asym with every layer 4-bit
#: the widths auto-round 0.16.1 writes AWQ-packed under format auto_round (asym, every layer one of these)
AWQ_DEFAULT_BITS = (4,)
W8_ASYM_REFUSAL = ("8-bit asymmetric weights cannot be written as {fmt}: vLLM serves 8-bit GPTQ/AWQ weights "
                   "symmetric only (Marlin takes zero points at 4 bits only; its AWQ path is 4-bit only), and "
                   "auto-round 0.16.1 refuses it too. Use sym=True, an asym width of 7 bits or fewer, or format "
                   "'compressed_tensors' (layers: {layers})")
GPTQ_PACKING = PACKINGS["auto_gptq"]


def get_packing(name: str | Packing) -> Packing:
    """The table entry for a packing name (a `Packing` is returned as is)."""
    if isinstance(name, Packing):
        return name
    try:
        return PACKINGS[name]
    except KeyError:
        raise ValueError(f"unknown packing {name!r}; known: {sorted(PACKINGS)}") from None


@attrs.frozen
class ExportFormat:
    """A checkpoint format `save_quantized` writes.

    quant_method: its `quantization_config.quant_method`. config_file: the side file holding the
    `quantization_config` alone. declared_dtype: the dtype config.json declares and float32
    tensors are cast to (None: the model's own).
    """

    name: str
    quant_method: str
    config_file: str
    declared_dtype: str | None = None
    packing: str | None = None  # the one packing this format writes (None: chosen per plan)
    refuse_w8_asym: bool = True

    def choose_packing(self, spec: QuantSpec, layer_specs: Iterable[QuantSpec] = ()) -> Packing:
        """auto_round: ``auto_round:auto_gptq`` (zero − 1) for a sym global grid; asym goes into the
        AWQ layout when every quantized layer is 4-bit (what auto-round 0.16 writes, and the asym
        layout vLLM loads through AWQ-Marlin), else native ``auto_round``. auto_round:auto_awq: the
        AWQ layout for any width (vLLM serves 2/3/5/6/7 bits through Humming). auto_gptq: ``auto_gptq``."""
        if self.packing is not None:
            return PACKINGS[self.packing]
        if self.quant_method in (COMPRESSED_METHOD, GGUF_METHOD):  # own tensors; in memory the layers stay native
            return NATIVE_PACKING
        if self.quant_method == GPTQ_METHOD:
            return GPTQ_PACKING
        if spec.sym:
            return SYM_PACKING
        awq = spec.bits in AWQ_DEFAULT_BITS and all(s.bits in AWQ_DEFAULT_BITS for s in layer_specs)
        return AWQ_PACKING if awq else NATIVE_PACKING

    def refusal(self, layer_specs: Mapping[str, QuantSpec]) -> str | None:
        """Why this format will not write the plan (None: it will): 8-bit asym in a GPTQ/AWQ-style
        format (auto-round 0.16.1's rule, `compressors/base.py` `_assert_w8_asym_exportable`), or a
        sym layer in the AWQ-only format."""
        if self.quant_method == GGUF_METHOD:
            bad = sorted((n, s) for n, s in layer_specs.items() if gguf_problems(self.name, [(n, None, s)]))
            if not bad:
                return None
            grids = sorted({_grid_name(s) for _, s in bad})
            exact = self.name.split(":", 1)[-1] not in GGUF_KFORMATS
            return (f"format {self.name!r}: {len(bad)} layer(s) (e.g. {bad[0][0]}) have grids {', '.join(grids)} with no "
                    f"{'exact GGUF type' if exact else 'GGUF type in this format'}; {_k_holds(self.name)}")
        if self.refuse_w8_asym:
            w8 = sorted(n for n, s in layer_specs.items() if s.bits == 8 and not s.sym)
            if w8:
                return W8_ASYM_REFUSAL.format(fmt=repr(self.name), layers=", ".join(w8[:4])
                                              + (f" and {len(w8) - 4} more" if len(w8) > 4 else ""))
        if self.packing is not None and PACKINGS[self.packing].awq:
            sym = sorted(n for n, s in layer_specs.items() if s.sym)
            if sym:
                return (f"format {self.name!r} writes zero-pointed (asym) layers only; {', '.join(sym[:4])} "
                        "are sym: use format 'auto_round' (GPTQ layout) for a sym plan")
        return None


EXPORT_FORMATS: Mapping[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("auto_round", AUTO_ROUND_METHOD, "quantization_config.json"),
    ExportFormat("auto_gptq", GPTQ_METHOD, "quantize_config.json", declared_dtype="float16"),
    ExportFormat("auto_round:auto_awq", AUTO_ROUND_METHOD, "quantization_config.json", packing=AWQ_PACKING.name),
    # pack-quantized: every width 2-8, sym or asym (8-bit asym included: vLLM serves it)
    ExportFormat("compressed_tensors", COMPRESSED_METHOD, "quantization_config.json", refuse_w8_asym=False),
    # the text decoder as one .gguf file; the type names the file type, each layer gets the type of its grid
    *(ExportFormat(f"gguf:{t}", GGUF_METHOD, "", refuse_w8_asym=False) for t in GGUF_TYPES),
    # k-quant files: the type names llama.cpp's mix; each layer's grid picks its (re-quantized) k type
    *(ExportFormat(f"gguf:{t}", GGUF_METHOD, "", refuse_w8_asym=False) for t in GGUF_KFORMATS),
)}
FORMAT_NAMES = tuple(EXPORT_FORMATS)
#: the formats that write a Hugging Face directory with a `quantization_config` (not GGUF's one file)
CONFIG_FORMATS = tuple(n for n, f in EXPORT_FORMATS.items() if f.config_file)
DEFAULT_FORMAT = FORMAT_NAMES[0]


def _grid_name(spec: QuantSpec) -> str:
    return f"W{spec.bits} g{spec.group_size} {'sym' if spec.sym else 'asym'}"


_GGUF_EXACT = ", ".join(f"W{b} {'sym' if sym else 'asym'} g{GGUF_BLOCK} ({t})" for t, (b, sym) in GGUF_TYPES.items())
GGUF_HOLDS = (f"GGUF blocks hold {_GGUF_EXACT} exactly (the k-quant formats "
              + ", ".join(f"gguf:{t}" for t in GGUF_KFORMATS) + " re-quantize SignRound's fp16 scales)")


def _k_holds(fmt: str) -> str:
    kinds = GGUF_KFORMATS.get(fmt.split(":", 1)[-1], ())
    if not kinds:
        return GGUF_HOLDS
    ks = ", ".join(f"W{b} {'sym' if sym else 'asym'} g{g} ({t}, scales re-quantized)"
                   for t in kinds for b, sym, g in [GGUF_KTYPES[t]])
    return f"{fmt} writes {ks}; exactly: {_GGUF_EXACT}"


def gguf_type(fmt: str, spec: QuantSpec, in_features: int | None = None) -> str | None:
    """The GGUF type a layer of grid `spec` gets in format `fmt` (None: none). A k-quant format
    writes its k types (`GGUF_KFORMATS`) where in_features is a multiple of 256, and the exact
    types (`GGUF_TYPES`) otherwise: a W4 asym g32 layer of in_features 576 is Q4_1, as it is."""
    kinds = GGUF_KFORMATS.get(fmt.split(":", 1)[-1], ())
    k = next((t for t in kinds if GGUF_KTYPES[t] == (spec.bits, spec.sym, spec.group_size)), None)
    if k is not None and (in_features is None or in_features % GGUF_SUPER_BLOCK == 0):
        return k
    return next((t for t, (bits, sym) in GGUF_TYPES.items()
                 if (spec.bits, spec.sym, spec.group_size) == (bits, sym, GGUF_BLOCK)), None)


def gguf_problems(fmt: str, layers: Iterable[tuple[str, int | None, QuantSpec]]) -> list[str]:
    """Why layers (name, in_features or None, grid) cannot go into GGUF format `fmt`: each grid
    must have a type there (`gguf_type`), and in_features fit its blocks (32, or 256 for a k type)."""
    out = []
    exact = fmt.split(":", 1)[-1] not in GGUF_KFORMATS
    for name, in_features, spec in layers:
        if gguf_type(fmt, spec) is None:
            out.append(f"{name}: {_grid_name(spec)} has no {'exact ' if exact else ''}GGUF type for {fmt} "
                       f"({_k_holds(fmt)})")
        elif in_features is not None and gguf_type(fmt, spec, in_features) is None:
            out.append(f"{name}: in_features {in_features} is not a multiple of {GGUF_SUPER_BLOCK} (the "
                       f"{gguf_type(fmt, spec)} super-block), and {_grid_name(spec)} has no 32-weight GGUF type")
        elif in_features is not None and in_features % GGUF_BLOCK:
            out.append(f"{name}: in_features {in_features} is not a multiple of {GGUF_BLOCK} (GGUF blocks)")
    return out


def parse_formats(format: str | Sequence[str]) -> tuple[str, ...]:
    """Format names from a name, a comma-separated list or a sequence; each must be in the table."""
    items = [format] if isinstance(format, str) else list(format)
    fmts = [f.strip() for item in items for f in item.split(",") if f.strip()]
    if not fmts:
        raise ValueError("format must name at least one of " + ", ".join(FORMAT_NAMES))
    for f in fmts:
        if f not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {f!r}; supported: {', '.join(FORMAT_NAMES)}")
    return tuple(dict.fromkeys(fmts))


def get_format(name: str) -> ExportFormat:
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose from {FORMAT_NAMES}") from None


def choose_packing(fmt: str, spec: QuantSpec, layer_specs: Iterable[QuantSpec] = ()) -> Packing:
    """The packing `save_quantized(format=fmt)` uses for a plan (see `ExportFormat.choose_packing`)."""
    return get_format(fmt).choose_packing(spec, layer_specs)


def is_auto_round_method(method: str) -> bool:
    """auto-round's spellings of its quant_method ("auto-round", "intel/auto-round", "auto_round")."""
    return any(s in method.lower() for s in (AUTO_ROUND_METHOD, "auto_round"))


def format_of_config(qc: Mapping[str, Any]) -> str | None:
    """The export format whose `quant_method` a `quantization_config` names (None: none of ours)."""
    method = str(qc.get("quant_method", "")).lower()
    if is_auto_round_method(method):
        return next(f.name for f in EXPORT_FORMATS.values() if f.quant_method == AUTO_ROUND_METHOD)
    return next((f.name for f in EXPORT_FORMATS.values() if f.quant_method == method), None)


def packing_of_config(qc: Mapping[str, Any]) -> Packing:
    """The packing a `quantization_config` describes.

    gptq: ``checkpoint_format`` (``gptq_v2`` → zero points as is), else ``auto_gptq``. auto-round:
    ``packing_format`` (default ``auto_round:auto_gptq``); an unknown spelling that mentions gptq is
    read as ``auto_round:auto_gptq``. Raises NotImplementedError for anything else.
    """
    method = str(qc.get("quant_method", "")).lower()
    if method == COMPRESSED_METHOD:
        if qc.get("format", "pack-quantized") != "pack-quantized":
            raise NotImplementedError(f"compressed-tensors format {qc.get('format')!r} is not supported by signround")
        return NATIVE_PACKING  # read through compressed.unpack_layer, held natively
    if method == GPTQ_METHOD:
        fmt = qc.get("checkpoint_format")
        return next((p for p in PACKINGS.values() if fmt and p.checkpoint_format == fmt), GPTQ_PACKING)
    if is_auto_round_method(method):
        fmt = str(qc.get("packing_format", SYM_PACKING.packing_format))
        found = next((p for p in PACKINGS.values() if p.packing_format == fmt), None)
        if found is not None:
            return found
        if "gptq" in fmt:
            return SYM_PACKING
        raise NotImplementedError(f"packing_format {fmt!r} is not supported by signround's loader")
    raise NotImplementedError(f"quant_method {qc.get('quant_method')!r} is not supported by signround's loader")
