"""Before/after evaluation: perplexity on text, language-model loss on image-text batches."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _token_nll(logits: Tensor, labels: Tensor, mask: Optional[Tensor]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            reduction="none").reshape(target.shape)
    if mask is not None:
        m = mask[:, 1:].to(nll.dtype)
        return float((nll * m).sum()), int(m.sum())
    return float(nll.sum()), target.numel()


@torch.no_grad()
def perplexity(model: Any, token_ids: Tensor, *, seqlen: int = 512, max_windows: Optional[int] = None,
               batch_size: int = 4) -> float:
    """Perplexity of `model` on a 1-D tensor of token ids, in non-overlapping windows of `seqlen`."""
    if token_ids.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(token_ids.shape)}")
    n = token_ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of "
                         f"{seqlen}; give a longer text or a smaller seqlen")
    windows = token_ids[: n * seqlen].reshape(n, seqlen)
    device = _device_of(model)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        s, c = _token_nll(logits, ids, None)
        total, count = total + s, count + c
    return math.exp(total / count)


@torch.no_grad()
def multimodal_loss(model: Any, batches: Iterable[Mapping[str, Tensor]]) -> float:
    """Mean next-token loss over image-text batches (padding excluded via attention_mask)."""
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    total, count = 0.0, 0
    for batch in batches:
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()
                  if isinstance(v, Tensor)}
        logits = model(**inputs, use_cache=False).logits
        s, c = _token_nll(logits, inputs["input_ids"], inputs.get("attention_mask"))
        total, count = total + s, count + c
    if count == 0:
        raise ValueError("no tokens to evaluate: the image-text set is empty")
    return total / count
