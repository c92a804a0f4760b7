"""Calibration samples: text chunks for a text decoder, processed conversations for a VLM."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch

from signround.templating.collate import collate
from signround.templating.datasets import ConversationDataset, ConversationSample, DatasetError
from signround.templating.images import DEFAULT_MAX_PIXELS, ImageError, open_image
from signround.templating.processors import ImageTokensCut, get_processor
from signround.templating.render import render
from signround.templating.template import Template


def _degenerate(ids: Sequence[int], seqlen: int) -> bool:
    """The reference drops samples whose last token repeats more than seqlen/2 times."""
    return ids.count(ids[-1]) > seqlen // 2 if ids else True


@attrs.frozen
class TextCalibration:
    """Fixed-length text samples and how they were made.

    samples: `input_ids` [seqlen] int64 and `attention_mask` ones, each. distinct_tokens: corpus
    tokens in them, each counted once; repeats: how many times the text had to be cycled to fill
    nsamples × seqlen (1.0 = every token once). source: where the text came from.
    """

    samples: tuple[dict[str, torch.Tensor], ...]
    seqlen: int
    distinct_tokens: int
    repeats: float = 1.0
    source: str = ""

    @property
    def tokens(self) -> int:
        return len(self.samples) * self.seqlen

    def note(self) -> str:
        """One line for a summary: samples × seqlen, distinct tokens, repeats."""
        line = f"{len(self.samples)} × {self.seqlen} tokens, {self.distinct_tokens} distinct"
        return line + (f" (the text is repeated {self.repeats:.1f}×)" if self.repeats > 1 else "")


def text_calibration_set(
    texts: Iterable[str], tokenizer: Any, *, seqlen: int = 2048, nsamples: int = 128, seed: int = 42,
    source: str = "",
) -> TextCalibration:
    """Fixed-length samples for a text decoder, and how many distinct tokens fill them.

    Documents are shuffled by `seed` and tokenized in that order only until there are enough tokens
    (a large corpus is never tokenized whole). Each document at least `seqlen` tokens long gives its
    first `seqlen` tokens (as AutoRound does; degenerate ones whose last token fills over half are
    skipped). The shorter documents are joined into one stream (each tokenized with the tokenizer's
    special tokens and followed by EOS unless it already ends with it) and cut into `seqlen`
    windows. When the corpus is too small the stream is cycled, so a short corpus still gives
    `nsamples`, and a warning says how many distinct tokens there are and how often they repeat. No
    padding anywhere.
    """
    if seqlen < 1 or nsamples < 1:
        raise ValueError(f"seqlen and nsamples must be positive, got {seqlen}, {nsamples}")
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise DatasetError(f"{source or 'text calibration'}: needs at least one non-empty document")
    random.Random(seed).shuffle(docs)
    eos = getattr(tokenizer, "eos_token_id", None)
    need = nsamples * seqlen
    samples: list[list[int]] = []
    rest: list[list[int]] = []
    rest_tokens = 0
    for doc in docs:
        if len(samples) * seqlen + rest_tokens >= need:
            break
        ids = list(tokenizer(doc)["input_ids"])
        if len(ids) >= seqlen and len(samples) < nsamples and not _degenerate(ids[:seqlen], seqlen):
            samples.append(ids[:seqlen])
            continue
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        rest.append(ids)
        rest_tokens += len(ids)
    distinct = len(samples) * seqlen
    repeats = 1.0
    if len(samples) < nsamples:
        pool = rest if rest_tokens else []
        if not pool:  # only long documents: cycle them too
            pool = [list(tokenizer(d)["input_ids"]) + ([eos] if eos is not None else []) for d in docs]
        pool_tokens = sum(map(len, pool))
        want = (nsamples - len(samples)) * seqlen
        stream: list[int] = []
        while len(stream) < want:
            for ids in pool:
                stream.extend(ids)
        samples += [stream[i : i + seqlen] for i in range(0, want, seqlen)]
        distinct = distinct + min(pool_tokens, want) if pool is rest else min(max(distinct, pool_tokens), need)
        if pool_tokens < want:
            repeats = need / max(distinct, 1)
    if repeats > 1:
        warnings.warn(f"{source or 'calibration text'}: {distinct} distinct tokens fill {nsamples} samples × "
                      f"{seqlen} tokens = {need}, so the text is repeated {repeats:.1f}×; pass a larger dataset, "
                      "or fewer (nsamples) or shorter (seqlen) samples", stacklevel=2)
    tensors = tuple(
        {"input_ids": torch.tensor(s, dtype=torch.long), "attention_mask": torch.ones(seqlen, dtype=torch.long)}
        for s in samples[:nsamples]
    )
    return TextCalibration(tensors, seqlen, distinct, repeats, source)


def text_calibration(
    texts: Iterable[str], tokenizer: Any, *, seqlen: int = 2048, nsamples: int = 128, seed: int = 42
) -> list[dict[str, torch.Tensor]]:
    """The samples of `text_calibration_set` (same arguments): `input_ids` [seqlen] int64 and
    `attention_mask` ones, each."""
    return list(text_calibration_set(texts, tokenizer, seqlen=seqlen, nsamples=nsamples, seed=seed).samples)


@attrs.frozen
class CalibrationSet:
    """Processed samples ready for `collate`, plus what was dropped and why; padded_keys: image
    tensors `collate.pad_samples` pads across the whole set (the processor's)."""

    samples: tuple[dict[str, torch.Tensor], ...]
    flat_keys: frozenset[str]
    dropped: tuple[str, ...] = ()
    padded_keys: frozenset[str] = frozenset()

    def batches(self, batch_size: int, *, pad_token_id: int = 0, padding_side: str = "right") -> list[dict[str, torch.Tensor]]:
        """Collate consecutive samples into batches of `batch_size` (the last may be smaller)."""
        return calibration_batches(self.samples, batch_size, pad_token_id=pad_token_id, padding_side=padding_side, flat_keys=self.flat_keys)


def calibration_batches(
    samples: Sequence[Mapping[str, torch.Tensor]],
    batch_size: int,
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
    flat_keys: Iterable[str] = (),
) -> list[dict[str, torch.Tensor]]:
    """Split `samples` into consecutive batches and `collate` each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [
        collate(samples[i : i + batch_size], pad_token_id=pad_token_id, padding_side=padding_side, flat_keys=flat_keys)
        for i in range(0, len(samples), batch_size)
    ]


def _seeded_order(n: int, seed: int) -> Iterator[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return iter(order)


def encode_conversation(template: Template, sample: ConversationSample, *, tokenizer: Any = None, processor: Any = None) -> str:
    """Text for one conversation: our template when `extra_encode`, else the tokenizer's own chat
    template if it has one (AutoRound's `extra_encode=False` path), else our template."""
    if not template.extra_encode:
        owner = tokenizer if getattr(tokenizer, "chat_template", None) else processor
        if getattr(owner, "chat_template", None):
            turns = [{"role": t.role if t.role in ("system", "user", "assistant") else "user", "content": t.content} for t in sample.turns]
            return owner.apply_chat_template(turns, tokenize=False, continue_final_message=turns[-1]["role"] == "assistant")
    return render(template, sample.turns)


def conversation_calibration(
    dataset: ConversationDataset,
    template: Template,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    processor_name: str | None = None,
    seqlen: int | None = 512,
    truncation: bool = True,
    nsamples: int = 128,
    seed: int = 42,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skip_bad_samples: bool = False,
) -> CalibrationSet:
    """Render, load images, process and truncate conversations in a seeded order until `nsamples`.

    A sample whose image tokens would be cut by `seqlen` is dropped (never half an image) and the
    reason kept in `dropped`, with a warning giving the count. An unreadable image raises
    `DatasetError` naming it and the sample id, unless `skip_bad_samples`.
    """
    proc = get_processor(processor_name or template.processor)
    samples: list[dict[str, torch.Tensor]] = []
    dropped: list[str] = []
    for i in _seeded_order(len(dataset.samples), seed):
        if len(samples) >= nsamples:
            break
        s = dataset.samples[i]
        try:
            images = [open_image(img) for img in s.images]
            text = encode_conversation(template, s, tokenizer=tokenizer, processor=processor)
            marker = proc.image_marker
            if marker is not None and text.count(marker) != len(images):
                raise DatasetError(f"{dataset.source}: sample {s.id!r} has {len(images)} image(s) but its rendered "
                                   f"text has {text.count(marker)} {marker!r} (one per image is needed); check the "
                                   "template's replace_tokens (each <image> becomes the family's image token) and "
                                   "the sample's <image> placeholders")
            samples.append(proc(text, images, tokenizer=tokenizer, processor=processor, seqlen=seqlen, truncation=truncation, max_pixels=max_pixels))
        except ImageTokensCut as err:
            dropped.append(f"sample {s.id!r}: {err}")
        except ImageError as err:
            if not skip_bad_samples:
                raise DatasetError(f"{dataset.source}: sample {s.id!r}: {err}") from None
            dropped.append(f"sample {s.id!r}: {err}")
    if dropped:
        warnings.warn(f"{dataset.source}: dropped {len(dropped)} sample(s); first: {dropped[0]}", stacklevel=2)
    if not samples:
        raise DatasetError(f"{dataset.source}: no calibration samples left ({len(dropped)} dropped)")
    if len(samples) < nsamples:
        warnings.warn(f"{dataset.source}: only {len(samples)} of {nsamples} requested samples available", stacklevel=2)
    return CalibrationSet(tuple(samples), proc.flat_keys, tuple(dropped), proc.padded_keys)
