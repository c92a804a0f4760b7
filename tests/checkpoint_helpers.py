"""Checkpoint-test helpers: an RTN stand-in for the engine's results, a word-level tokenizer, logits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from signround.adapters.checkpoint.files import LayerQuant
from signround.adapters.hf.blocks import find_block_lists
from signround.rounding import QuantSpec, quantize_weight


def rtn_state(model: nn.Module, spec: QuantSpec, *, blocks: Iterable[str] | None = None, skip: Iterable[str] = (),
              override: Mapping[str, QuantSpec] | None = None, extra: Iterable[str] = ()) -> dict[str, LayerQuant]:
    """What the engine leaves behind, made with RTN: on-grid weights in the model + per-layer grids."""
    prefixes = list(blocks) if blocks is not None else find_block_lists(model)
    override = dict(override or {})
    skip = set(skip)
    results = {}
    for name, m in model.named_modules():
        inside = any(name.startswith(p + ".") for p in prefixes)
        if not isinstance(m, nn.Linear) or name in skip or not (inside or name in extra):
            continue
        s = override.get(name, spec)
        qw = quantize_weight(m.weight, s)
        with torch.no_grad():
            m.weight.copy_(qw.dequantize(m.weight.dtype))
        results[name] = LayerQuant(s, qw.scale, qw.zero)
    return results


def tiny_tokenizer(vocab_size: int = 256):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 240, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()
