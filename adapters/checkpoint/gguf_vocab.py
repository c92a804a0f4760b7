"""The tokenizer of a text GGUF, as llama.cpp's converter (convert_hf_to_gguf.py) writes it, from the
transformers fast tokenizer the user passed (its ``backend_tokenizer``), through the `gguf` package's
writer calls and its `SpecialVocab`.

Two kinds are written; anything else writes nothing and says why (the caller warns):

- a byte-level BPE: llama.cpp's ``gpt2`` model (tokens, types, merges, bos/eos/pad, chat template);
- a SentencePiece-style vocabulary (Llama-2 / LLaVA-1.5 / Mistral-v0.1 / Gemma 3: a BPE or Unigram
  with byte fallback over ``▁``-escaped spaces): llama.cpp's ``llama`` (SPM) model, as the
  converter's ``_set_vocab_sentencepiece``: tokens by id, scores, token types (byte pieces
  ``<0xXX>`` BYTE, the unknown piece UNKNOWN, special added tokens CONTROL, the other added tokens
  USER_DEFINED with ``▁`` written as a space, ids past the tokenizer up to the model's vocab_size
  ``[PADi]`` UNUSED), ``add_space_prefix`` (True where the tokenizer prepends ``▁``: Llama-2's
  Prepend normalizer or a Metaspace pre-tokenizer; False for Gemma 3, as its converter's
  Gemma3Model writes), and `SpecialVocab` on the tokenizer saved to a temporary folder: bos / eos /
  unk / pad ids and the chat template; add_bos / add_eos are what the tokenizer does on a test
  string.

Scores: a Unigram's own log-probabilities. A BPE holds none; llama.cpp's SPM tokenizer merges the
adjacent pair whose joined piece scores highest, transformers' BPE the pair of lowest merge rank,
so a piece scores −(rank of the first merge that makes it) — the same order as SentencePiece's own
scores for a vocabulary converted from a ``tokenizer.model`` (merges sorted by piece), which is
what makes llama.cpp split words as transformers does. Pieces no merge makes (single characters,
which llama.cpp starts from) score below every merge; byte pieces 0, added tokens −1000 (the
converter's values). A Unigram is written the way the converter writes any ``tokenizer.model``,
but llama.cpp then tokenizes it with that score-greedy merge, not the Unigram's best segmentation:
that is warned about. A ``tokenizer.model`` file is not read (that needs the sentencepiece
package): the fast tokenizer transformers built from it carries the same pieces.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

SPACE = "\u2581"  # SentencePiece's ▁
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, config: Any = None) -> str | None:
    """Write `tokenizer` into `writer` as llama.cpp reads it; None when written, else why nothing was
    (a tokenizer kind llama.cpp's converter would not write this way)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"{type(tokenizer).__name__} is no fast tokenizer (no backend_tokenizer to read the vocabulary from)"
    pipeline = json.loads(backend.to_str())
    model = pipeline.get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback") and _byte_level(pipeline):
        _add_gpt2(writer, tokenizer, model)
        return None
    reason = _spm_problem(model, pipeline)
    if reason:
        return reason
    _add_spm(writer, tokenizer, model, pipeline, vocab_size, config)
    return None


def _steps(part: Any) -> list[dict[str, Any]]:
    if not part:
        return []
    return [s for p in part.get("normalizers", part.get("pretokenizers", [part])) for s in _steps(p)] \
        if part.get("type") == "Sequence" else [part]


def _byte_level(pipeline: dict[str, Any]) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _steps(pipeline.get("pre_tokenizer")))


def _add_gpt2(writer: Any, tokenizer: Any, model: dict[str, Any]) -> None:
    """A byte-level BPE as llama.cpp's ``gpt2`` model."""
    import gguf

    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.NORMAL
    for added in tokenizer.added_tokens_decoder.values():
        i = vocab[added.content]
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                        ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            setter(int(value))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _space_prefix(pipeline: dict[str, Any]) -> bool | str:
    """Whether the tokenizer prepends ▁ (llama.cpp's add_space_prefix), or why its normalization is
    not SentencePiece's plain one (spaces as ▁, nothing else), which is all llama.cpp's SPM does."""
    escaped = prefix = False
    for n in _steps(pipeline.get("normalizer")):
        if n.get("type") == "Replace" and n.get("pattern") == {"String": " "} and n.get("content") == SPACE:
            escaped = True
        elif n.get("type") == "Prepend" and n.get("prepend") == SPACE:
            prefix = True
        else:
            return f"normalizer {n.get('type')} (llama.cpp's SentencePiece tokenizer only escapes spaces as ▁)"
    for p in _steps(pipeline.get("pre_tokenizer")):
        if p.get("type") == "Metaspace" and p.get("replacement") == SPACE and not p.get("split", True):
            escaped = True
            prefix = prefix or p.get("prepend_scheme", "always") in ("always", "first")
        elif p.get("type") == "Split" and p.get("pattern") == {"String": " "} and escaped:
            continue  # splits on a space the normalizer has already turned into ▁: nothing
        else:
            return f"pre-tokenizer {p.get('type')} (llama.cpp's SentencePiece tokenizer does not split words)"
    return prefix if escaped else "spaces are not escaped as ▁"


def _spm_problem(model: dict[str, Any], pipeline: dict[str, Any]) -> str | None:
    kind = model.get("type")
    if kind not in ("BPE", "Unigram"):
        return f"a {kind} model: llama.cpp has no tokenizer for it"
    if kind == "BPE" and (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
                          or model.get("ignore_merges")):
        return "a BPE with subword affixes or ignore_merges: not a SentencePiece vocabulary"
    pieces = model["vocab"] if kind == "BPE" else {p: i for i, (p, _) in enumerate(model["vocab"])}
    if not model.get("byte_fallback") or sum(bool(_BYTE.fullmatch(p)) for p in pieces) != 256:
        return ("a vocabulary without byte fallback (all 256 <0xXX> pieces): llama.cpp's SentencePiece "
                "tokenizer falls back to them for any character outside the vocabulary")
    space = _space_prefix(pipeline)
    return space if isinstance(space, str) else None


def _add_spm(writer: Any, tokenizer: Any, model: dict[str, Any], pipeline: dict[str, Any], vocab_size: int,
             config: Any) -> None:
    """A SentencePiece-style vocabulary as llama.cpp's ``llama`` model (module docstring)."""
    import gguf

    T = gguf.TokenType
    if model["type"] == "Unigram":
        base = {p: (i, float(s)) for i, (p, s) in enumerate(model["vocab"])}
        unk = model.get("unk_id")
        warnings.warn("the tokenizer is a SentencePiece Unigram: llama.cpp's `llama` tokenizer merges its pieces "
                      "by score (as its converter writes any tokenizer.model), which can split words differently "
                      "from the Unigram's best segmentation in transformers", stacklevel=5)
    else:
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        unmerged = -float(len(merges))
        base = {p: (i, -float(rank[p]) if p in rank else unmerged) for p, i in model["vocab"].items()}
        unk = base[model["unk_token"]][0] if model.get("unk_token") in base else None
    size = max(vocab_size, max(tokenizer.get_vocab().values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [T.UNUSED] * size
    for piece, (i, score) in base.items():
        byte = bool(_BYTE.fullmatch(piece))
        tokens[i], scores[i] = piece, 0.0 if byte else score
        types[i] = T.BYTE if byte else T.UNKNOWN if i == unk else T.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        # the converter: special added tokens CONTROL, the others USER_DEFINED with ▁ as a space (llama.cpp
        # matches them in the raw text, before it escapes spaces)
        tokens[i] = added.content if added.special else added.content.replace(SPACE, " ")
        scores[i], types[i] = -1000.0, T.CONTROL if added.special else T.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(_space_prefix(pipeline)))
    special = _special_vocab(tokenizer, config, size)
    special.add_to_gguf(writer, quiet=True)


def _special_vocab(tokenizer: Any, config: Any, n_vocab: int) -> Any:
    """gguf's SpecialVocab on the tokenizer's files (and the model's special ids, as the converter reads
    config.json), with add_bos / add_eos set to what the tokenizer does."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        ids = {f"{t}_token_id": getattr(config, f"{t}_token_id", None) for t in ("bos", "eos", "pad")} if config else {}
        (Path(tmp) / "config.json").write_text(json.dumps({k: v for k, v in ids.items() if isinstance(v, int)}))
        special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=n_vocab)
    with_special = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    for kind, ends in (("bos", lambda ids: ids[:1]), ("eos", lambda ids: ids[-1:])):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        special.add_special_token[kind] = tid is not None and ends(with_special) == [tid] != ends(bare)
    return special
