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


def check_asym_k_exact(encode, qtype, rows: int, levels: int, rng) -> None:  # type: ignore[no-untyped-def]
    """An asym k-quant encoder (Q4_K, Q5_K) given d·sc scales and dmin·m offsets already on its
    sub-block grid (the largest sc and m at 63, dmin = d) writes them exactly and moves no code: the
    file dequantizes (gguf's own arithmetic) to SignRound's s · (q − z) bit for bit."""
    import gguf
    import numpy as np

    d = np.float32(2.0 ** -12)
    sc = rng.integers(1, 8, size=(rows, 2, 8)).astype(np.float32)
    sc[..., 0] = 63
    zero = rng.integers(0, 8, size=(rows, 2, 8))
    zero[..., 0] = 1  # the offsets s·z = d·sc·z are multiples of dmin = d, the largest 63·d
    codes = rng.integers(0, levels, size=(rows, 512))
    kb = encode(codes, (d * sc).reshape(rows, 16), zero.reshape(rows, 16))
    assert kb.rel_mse == 0 and kb.codes_changed == 0
    ours = (d * sc).reshape(rows, 16).repeat(32, 1) * (codes - zero.reshape(rows, 16).repeat(32, 1))
    np.testing.assert_array_equal(gguf.quants.dequantize(kb.blocks, qtype), ours)
