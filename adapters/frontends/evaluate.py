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


def _text_ids(tokenizer: Any, text: Optional[Any]) -> Tensor:
    from pathlib import Path

    from signround.templating.heldout import HELDOUT_TEXT

    if text is None:
        body = HELDOUT_TEXT
    else:
        p = Path(text)
        if not p.is_file():
            raise FileNotFoundError(f"evaluation text {str(p)!r} does not exist")
        body = p.read_text(encoding="utf-8", errors="replace")
    return torch.tensor(tokenizer(body)["input_ids"], dtype=torch.long)


def _image_text_batches(path: Any, extra_data_dir: Any, template: Any, model: Any, tokenizer: Any,
                        processor: Any) -> list[dict[str, Tensor]]:
    from signround.templating import conversation_calibration, load_dataset, load_template
    from signround.templating.calibration import calibration_batches

    if processor is None:
        raise ValueError("image-text evaluation needs the model's processor, and none could be loaded from the model "
                         "directory (save it there with processor.save_pretrained)")
    data = load_dataset(path, extra_data_dir=extra_data_dir)
    tmpl = load_template(template, getattr(model.config, "model_type", None))
    calib = conversation_calibration(data, tmpl, tokenizer=tokenizer, processor=processor, seqlen=None,
                                     truncation=False, nsamples=len(getattr(data, "samples", ())) or 1, seed=0)
    return calibration_batches(calib.samples, 1, pad_token_id=tokenizer.pad_token_id or 0, flat_keys=calib.flat_keys)


def compare_models(model_path: Any, quantized: Optional[Any] = None, *, text: Optional[Any] = None,
                   image_text: Optional[Any] = None, extra_data_dir: Optional[Any] = None,
                   template: Optional[Any] = None, seqlen: int = 512, max_windows: Optional[int] = None,
                   dtype: Optional[torch.dtype] = None) -> list[dict[str, Any]]:
    """Perplexity (and image-text loss) of the model at `model_path` and of its quantized checkpoint."""
    from signround.adapters.checkpoint.loader import load_quantized
    from signround.adapters.hf.model_io import load_model

    loaded = load_model(model_path, dtype=dtype)
    ids = _text_ids(loaded.tokenizer, text)
    batches = None
    if image_text is not None:
        batches = _image_text_batches(image_text, extra_data_dir, template, loaded.model, loaded.tokenizer,
                                      loaded.processor)
    rows = []

    def row(name: str, model: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"model": name, "perplexity": perplexity(model, ids, seqlen=seqlen,
                                                                        max_windows=max_windows)}
        if batches is not None:
            out["image_text_loss"] = multimodal_loss(model, batches)
        return out

    rows.append(row(f"{model_path} (original)", loaded.model))
    if quantized is not None:
        del loaded
        rows.append(row(f"{quantized} (quantized)", load_quantized(quantized, dtype=dtype)))
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    """One table: a row per model, perplexity and image-text loss side by side."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("model")
    table.add_column("perplexity")
    has_mm = any("image_text_loss" in r for r in rows)
    if has_mm:
        table.add_column("image-text loss")
    base = rows[0]["perplexity"] if rows else None
    for r in rows:
        ppl = f"{r['perplexity']:.3f}"
        if base and r is not rows[0]:
            ppl += f" ({(r['perplexity'] / base - 1) * 100:+.1f}%)"
        cells = [r["model"], ppl] + ([f"{r.get('image_text_loss', float('nan')):.4f}"] if has_mm else [])
        table.add_row(*cells)
    Console().print(table)
