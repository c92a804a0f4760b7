"""Calibration text written by the model itself (`dataset="self"`), for domains no corpus covers.

Each sample starts from the tokenizer's BOS (when it has one) and one token drawn uniformly from the
ordinary vocabulary, then the model continues by sampling from its own next-token distribution
(softmax at `temperature`, no truncation) until `seqlen` tokens, with a KV cache, `batch_size`
sequences at a time. Every draw comes from one `torch.Generator` seeded by the recipe's seed, on
the CPU, so the samples are the same on every device for the same logits. Nothing else is
touched: the model's mode and the global RNG are left as they were.

The model is called as `model(input_ids=..., cache=..., use_cache=True)` (`past_key_values=` before
transformers renamed it; a Hugging Face causal LM, or a VLM on text): the only model-facing code in
`templating`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from signround.templating.calibration import TextCalibration, _degenerate


def _first_tokens(tokenizer: Any, vocab: int, count: int, gen: torch.Generator) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    ordinary = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    return ordinary[torch.randint(len(ordinary), (count,), generator=gen)]


@torch.no_grad()
def self_calibration(model: Any, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int = 42,
                     batch_size: int = 8, temperature: float = 1.0) -> TextCalibration:
    """`nsamples` sequences of exactly `seqlen` tokens sampled from `model` (see the module docstring).

    The samples are as `text_calibration_set` gives them (`input_ids` [seqlen], `attention_mask`
    ones); a warning says how many are degenerate (one token filling over half of the sample)."""
    if nsamples < 1 or seqlen < 2 or batch_size < 1:
        raise ValueError(f"self-generated calibration needs nsamples >= 1, seqlen >= 2, batch_size >= 1; got "
                         f"{nsamples}, {seqlen}, {batch_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else len(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        for start in range(0, nsamples, batch_size):
            n = min(batch_size, nsamples - start)
            first = _first_tokens(tokenizer, min(vocab, len(tokenizer)), n, gen).unsqueeze(1)
            ids = first if bos is None else torch.cat([torch.full((n, 1), bos, dtype=torch.long), first], 1)
            out = model(input_ids=ids.to(device), use_cache=True, **last)
            for _ in range(seqlen - ids.shape[1]):
                probs = torch.softmax(out.logits[:, -1, :vocab].float().cpu() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                ids = torch.cat([ids, nxt], 1)
                out = model(input_ids=nxt.to(device), use_cache=True, **last, **{cache_arg: getattr(out, cache_arg)})
            rows.extend(ids[:, :seqlen])
            del out
    finally:
        model.train(was_training)
    samples = tuple({"input_ids": r.clone(), "attention_mask": torch.ones(seqlen, dtype=torch.long)} for r in rows)
    degenerate = sum(_degenerate(r.tolist(), seqlen) for r in rows)
    if degenerate:
        import warnings

        warnings.warn(f"self-generated calibration: {degenerate} of {nsamples} samples are degenerate (one token "
                      "fills over half of the sample); a higher temperature or a real dataset may calibrate better",
                      stacklevel=2)
    return TextCalibration(samples, seqlen, distinct_tokens=nsamples * seqlen, repeats=1.0, source="self")
