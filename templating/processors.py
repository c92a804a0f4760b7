"""Processor registry: rendered text + images -> the tensor dict a model's forward takes.

A processor is a function registered under a name (templates refer to it by that name)::

    @register_processor("mine", flat_keys=("pixel_values",), image_tokens=("<image>",))
    def mine(text, images, *, tokenizer, processor, seqlen, truncation, max_pixels) -> dict: ...

Arguments: `text` is the template-rendered string (image placeholders already in the family's
form, without BOS: the tokenizer adds it), `images` the sample's PIL images in order, `tokenizer`
the model's tokenizer, `processor` the model's HF processor (or None), `seqlen`/`truncation` the
length policy, `max_pixels` the bound applied to each image first (see `images.bound_image`).
Returns one sample with a leading batch dimension of 1 on per-sample tensors (`input_ids`
[1, L], `attention_mask` [1, L], family image tensors as the HF processor gives them).

`flat_keys` names tensors whose first dimension counts images, not samples (Qwen2-VL
`pixel_values` [patches, 1176], `image_grid_thw` [images, 3]); `collate` concatenates them and
skips samples that lack them. `padded_keys` (Mllama's image tensors) are zero-padded in every
dimension to the largest across the whole calibration set, a sample without images getting zeros
(`collate.pad_samples`): a padded image is masked out by the model. `image_tokens` are the token
strings that make up an image's span in `input_ids`; truncation never cuts inside or before such a
span (see `truncate`). `image_marker` is one image in the rendered text (`<|image_pad|>`,
`<image>`, …): calibration checks each sample renders one per image before processing it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import torch
from PIL import Image

from signround.templating.images import DEFAULT_MAX_PIXELS, bound_image

SEQUENCE_KEYS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "position_ids", "labels", "cross_attention_mask"}
)


class ProcessorFn(Protocol):
    def __call__(
        self,
        text: str,
        images: Sequence[Image.Image],
        *,
        tokenizer: Any,
        processor: Any,
        seqlen: int | None,
        truncation: bool,
        max_pixels: int,
    ) -> dict[str, torch.Tensor]: ...


@attrs.frozen
class RegisteredProcessor:
    """A registry entry: the function plus what `collate` and `truncate` need to know."""

    name: str
    fn: ProcessorFn
    flat_keys: frozenset[str] = frozenset()
    image_tokens: tuple[str, ...] = ()
    padded_keys: frozenset[str] = frozenset()
    image_marker: str | None = None  # one image in the rendered text, before the processor expands it

    def __call__(
        self,
        text: str,
        images: Sequence[Image.Image] = (),
        *,
        tokenizer: Any = None,
        processor: Any = None,
        seqlen: int | None = None,
        truncation: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> dict[str, torch.Tensor]:
        return self.fn(
            text, list(images), tokenizer=tokenizer, processor=processor, seqlen=seqlen,
            truncation=truncation, max_pixels=max_pixels,
        )


PROCESSORS: dict[str, RegisteredProcessor] = {}


class ProcessorError(ValueError):
    """A processor was misused (missing HF processor, images given to a text-only one, ...)."""


class ImageTokensCut(ValueError):
    """Truncating to seqlen would cut an image's tokens: the sample must be dropped."""


def register_processor(
    name: str, *, flat_keys: Iterable[str] = (), image_tokens: Iterable[str] = (), padded_keys: Iterable[str] = (),
    image_marker: str | None = None, overwrite: bool = False,
) -> Callable[[ProcessorFn], ProcessorFn]:
    """Decorator: register `fn` under `name` (refuses to replace one unless `overwrite`)."""

    def deco(fn: ProcessorFn) -> ProcessorFn:
        if name in PROCESSORS and not overwrite:
            raise ValueError(f"processor {name!r} is already registered (pass overwrite=True to replace it)")
        PROCESSORS[name] = RegisteredProcessor(name, fn, frozenset(flat_keys), tuple(image_tokens), frozenset(padded_keys),
                                               image_marker)
        return fn

    return deco


def get_processor(name: str) -> RegisteredProcessor:
    """Look a processor up by name; the error lists the registered names."""
    try:
        return PROCESSORS[name]
    except KeyError:
        raise ProcessorError(f"unknown processor {name!r}; registered: {sorted(PROCESSORS)}") from None


def list_processors() -> tuple[str, ...]:
    return tuple(sorted(PROCESSORS))


# ---------------------------------------------------------------------------------------- helpers


def token_ids(tokenizer: Any, tokens: Iterable[str]) -> list[int]:
    """Ids of those `tokens` that are single tokens of `tokenizer` (unknown ones are left out)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for tok in tokens:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != unk:
            out.append(tid)
    return out


def truncate(
    sample: Mapping[str, torch.Tensor], seqlen: int | None, image_ids: Iterable[int], *, negative_is_image: bool = False
) -> dict[str, torch.Tensor]:
    """Cut every sequence tensor of a batch-1 sample to `seqlen` tokens, never through an image.

    If any image token (id in `image_ids`, or negative when `negative_is_image`) sits at a position
    >= seqlen, the cut would orphan image tensors or split an image: raises `ImageTokensCut`,
    and the caller drops the sample (calibration reports how many). Otherwise the text after the
    last image is shortened.
    """
    out = dict(sample)
    ids = out["input_ids"]
    length = ids.shape[-1]
    if seqlen is None or length <= seqlen:
        return out
    ids_list = torch.tensor(sorted(set(image_ids)), dtype=ids.dtype)
    is_image = torch.isin(ids, ids_list)
    if negative_is_image:
        is_image |= ids < 0
    tail = is_image[..., seqlen:]
    if bool(tail.any()):
        last = int(is_image.reshape(-1, length).any(0).nonzero().max()) + 1
        raise ImageTokensCut(
            f"sample is {length} tokens and its image tokens reach position {last}, past seqlen={seqlen}; "
            "dropped rather than cutting an image (raise seqlen or lower max_pixels)"
        )
    for key, value in out.items():
        if key in SEQUENCE_KEYS and value.dim() >= 2 and value.shape[1] == length:
            out[key] = value[:, :seqlen]
    return out


def _tokenize(tokenizer: Any, text: str) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise ProcessorError("a tokenizer is required")
    enc = tokenizer(text, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _hf_call(processor: Any, text: str, images: Sequence[Image.Image], max_pixels: int, name: str) -> dict[str, torch.Tensor]:
    if processor is None:
        raise ProcessorError(f"processor {name!r} needs the model's HF processor (AutoProcessor) for image inputs")
    bounded = [bound_image(im if im.mode == "RGB" else im.convert("RGB"), max_pixels) for im in images]
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if bounded:
        kwargs["images"] = bounded
    enc = processor(**kwargs)
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _text_only(name: str, text: str, images: Sequence[Image.Image], tokenizer: Any, processor: Any) -> dict[str, torch.Tensor] | None:
    """Text-only sample: through the HF processor when given (same keys as image samples), else the tokenizer."""
    if images:
        return None
    if processor is not None:
        enc = processor(text=[text], return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    return _tokenize(tokenizer, text)


def _family(name: str, image_tokens: tuple[str, ...], flat_keys: tuple[str, ...] = (), *, negative: bool = False,
            padded_keys: tuple[str, ...] = (), image_marker: str | None = None) -> None:
    """Register a processor that calls the HF processor with bounded images, then truncates."""

    def fn(text, images, *, tokenizer, processor, seqlen, truncation, max_pixels):  # type: ignore[no-untyped-def]
        sample = _text_only(name, text, images, tokenizer, processor)
        if sample is None:
            sample = _hf_call(processor, text, images, max_pixels, name)
        if not truncation:
            return sample
        tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        return truncate(sample, seqlen, token_ids(tok, image_tokens) if tok is not None else (), negative_is_image=negative)

    fn.__name__ = f"{name}_processor"
    fn.__doc__ = f"{name}: HF processor call on bounded images; image spans {image_tokens or 'negative ids'}."
    register_processor(name, flat_keys=flat_keys, image_tokens=image_tokens, padded_keys=padded_keys,
                       image_marker=image_marker)(fn)


# --------------------------------------------------------------------------------------- built-ins


@register_processor("basic")
def basic(text, images, *, tokenizer, processor, seqlen, truncation, max_pixels):  # type: ignore[no-untyped-def]
    """Text only: tokenizer(text); images are an error (choose `hf` or a family processor)."""
    if images:
        raise ProcessorError("processor 'basic' is text-only but the sample has images; use 'hf' or a family processor")
    tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
    sample = _tokenize(tok, text)
    return truncate(sample, seqlen, ()) if truncation else sample


_family("hf", ())  # generic: whatever the model's processor returns; no known image tokens
_family("qwen2_vl", ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"), ("pixel_values", "image_grid_thw"),
        image_marker="<|image_pad|>")
_family("llava", ("<image>",), ("pixel_values", "image_sizes"), image_marker="<image>")
_family("gemma3", ("<start_of_image>", "<image_soft_token>", "<end_of_image>"), ("pixel_values",),
        image_marker="<start_of_image>")
# Mllama's image tensors are padded to the set's most images (all-zero images, masked out of the
# cross-attention) so every batch calls the cross-attention layers with one layout.
_family("mllama", ("<|image|>",), padded_keys=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                                               "cross_attention_mask"), image_marker="<|image|>")
_IDEFICS3_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
)
_family("idefics3", _IDEFICS3_TOKENS, image_marker="<image>")

_IMAGE_N = re.compile(r"<\|image_\d+\|>")


def renumber_phi3_images(text: str) -> str:
    """Phi-3-vision numbers its image tags: the k-th `<|image_N|>` becomes `<|image_k|>`."""
    counter = iter(range(1, 1 << 30))
    return _IMAGE_N.sub(lambda _m: f"<|image_{next(counter)}|>", text)


@register_processor("phi3_v", flat_keys=("pixel_values", "image_sizes"))
def phi3_v(text, images, *, tokenizer, processor, seqlen, truncation, max_pixels):  # type: ignore[no-untyped-def]
    """Phi-3-vision (remote-code processor): renumbers `<|image_N|>`; image spans are negative ids."""
    text = renumber_phi3_images(text)
    sample = _text_only("phi3_v", text, images, tokenizer, processor)
    if sample is None:
        sample = _hf_call(processor, text, images, max_pixels, "phi3_v")
    return truncate(sample, seqlen, (), negative_is_image=True) if truncation else sample
