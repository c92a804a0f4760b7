"""The text GGUF's tokenizer for SentencePiece-style vocabularies (`gguf_vocab.py`): llama.cpp's `llama`
model written from tiny Llama-2 / Gemma 3 style tokenizers (transformers 5 LlamaTokenizer /
GemmaTokenizer: a BPE with byte fallback) and a Unigram, read back with gguf's reader; a Python copy
of llama.cpp's SPM merge (llm_tokenizer_spm: the adjacent pair whose joined piece scores highest,
leftmost first; unknown characters as <0xXX> bytes) tokenizes as transformers does on those scores.
Real llama.cpp on real Gemma-3-270M: tests/checkpoint/llama_cpp_check.py gemma3-270m (not CI)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from checkpoint_helpers import rtn_state, tiny_tokenizer
from tiny_models import tiny_text_model

from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.gguf_vocab import add_tokenizer
from signround.rounding import QuantSpec

gguf = pytest.importorskip("gguf")
T = gguf.TokenType
TEXT = ["the cat sat on the mat", "a cat and a hat", "that mat is flat", "the rat ate the oat"] * 10
BYTES = [f"<0x{i:02X}>" for i in range(256)]
TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def _trained(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece-BPE-shaped vocabulary: specials, the 256 byte pieces, then trained ▁-pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=60, show_progress=False))
    model = json.loads(tk.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + BYTES)}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    return vocab, [tuple(m) for m in model["merges"]]


def llama2_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import LlamaTokenizer

    vocab, merges = _trained(["<unk>", "<s>", "</s>"])
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # Llama-2 starts with <s>
    tok.add_tokens(["<image>"])  # LLaVA-1.5's, a plain added token
    tok.chat_template = TEMPLATE
    return tok


def gemma3_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import GemmaTokenizer

    vocab, merges = _trained(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    tok.add_tokens(["<start_of_image>", "\u2581\u2581"])  # Gemma's are added without `special`
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def _fields(tokenizer, vocab_size: int = 0, config=None):  # type: ignore[no-untyped-def]
    """add_tokenizer into a GGUF with no tensors; its tokenizer fields as Python values."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        assert add_tokenizer(writer, tokenizer, vocab_size, config) is None
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        reader = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def spm_tokenize(text: str, tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> list[int]:
    """llama.cpp's llm_tokenizer_spm on one raw-text fragment (no special tokens in it)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (T.NORMAL, T.UNKNOWN, T.BYTE, T.USER_DEFINED)}
    text = (" " + text if space_prefix else text).replace(" ", "\u2581")
    symbols = list(text)
    while True:
        best = None
        for j in range(len(symbols) - 1):
            piece = symbols[j] + symbols[j + 1]
            if piece in ids and (best is None or scores[ids[piece]] > scores[ids[best[1]]]):
                best = (j, piece)
        if best is None:
            break
        symbols[best[0]: best[0] + 2] = [best[1]]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


@pytest.mark.parametrize("style", ["llama2", "gemma3"])
def test_spm_tokens_scores_types_and_specials_round_trip(style: str) -> None:
    tok = llama2_tokenizer() if style == "llama2" else gemma3_tokenizer()
    f = _fields(tok, vocab_size=len(tok) + 3)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == len(tok) + 3  # padded to the model's vocab_size
    assert tokens[-3:] == [f"[PAD{len(tok) + i}]" for i in range(3)] and set(types[-3:]) == {T.UNUSED}
    backend = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [tuple(m) for m in backend["merges"]]
    first = {}
    for r, (a, b) in enumerate(merges):
        first.setdefault(a + b, r)
    added = tok.added_tokens_decoder
    for piece, i in tok.get_vocab().items():
        if i in added:  # special: CONTROL; others USER_DEFINED with ▁ written as a space
            assert types[i] == (T.CONTROL if added[i].special else T.USER_DEFINED), piece
            assert tokens[i] == (piece if added[i].special else piece.replace("\u2581", " ")) and scores[i] == -1000
        elif piece in BYTES:
            assert (tokens[i], types[i], scores[i]) == (piece, T.BYTE, 0.0)
        else:
            assert tokens[i] == piece and types[i] == T.NORMAL
            assert scores[i] == (-first[piece] if piece in first else -len(merges)), piece
    assert f["tokenizer.ggml.add_space_prefix"] is (style == "llama2")  # Metaspace prepends ▁, Gemma's Replace does not
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id")):
        assert f[f"tokenizer.ggml.{kind}_token_id"] == getattr(tok, key)
    adds_bos = tok("cat").input_ids[0] == tok.bos_token_id  # what the tokenizer does, the file says
    assert f["tokenizer.ggml.add_bos_token"] is adds_bos is (style == "llama2")
    assert f["tokenizer.ggml.add_eos_token"] is False
    if style == "llama2":
        assert f["tokenizer.chat_template"] == TEMPLATE
    else:
        assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    # llama.cpp's SPM merge on these scores splits text as transformers' BPE does (é: byte fallback)
    for text in ["the cat sat on the mat", "that hat ate a rat", "mat the flat oat", "cat é"]:
        ours = spm_tokenize(text, tokens, scores, types, f["tokenizer.ggml.add_space_prefix"])
        assert ours == tok(text, add_special_tokens=False).input_ids, text


def test_unigram_scores_are_its_own_and_it_is_warned_about() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(b, 0.0) for b in BYTES] + [
        ("\u2581the", -1.5), ("\u2581cat", -2.0), ("\u2581", -3.0), ("t", -4.0), ("h", -4.5), ("e", -5.0)]
    tk = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with pytest.warns(UserWarning, match="Unigram"):
        f = _fields(tok)
    assert f["tokenizer.ggml.tokens"][: len(pieces)] == [p for p, _ in pieces]
    np.testing.assert_array_equal(f["tokenizer.ggml.scores"][len(pieces) - 6: len(pieces)],
                                  np.float32([s for _, s in pieces[-6:]]))
    assert f["tokenizer.ggml.token_type"][0] == T.CONTROL  # an added special token, as the converter writes <unk>
    assert f["tokenizer.ggml.token_type"][3] == T.BYTE and f["tokenizer.ggml.add_space_prefix"] is True


def _spm_variant(normalizer=None, byte_pieces: bool = True):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + (BYTES if byte_pieces else []) + ["\u2581", "a"])}
    tk = Tokenizer(models.BPE(vocab, [], byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizer or normalizers.Prepend("\u2581"),
                                          normalizers.Replace(" ", "\u2581")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_what_llama_cpp_cannot_tokenize_is_refused_with_the_reason(tmp_path: Path) -> None:
    """No silent wrong vocabulary: normalization llama.cpp's SPM does not do, no byte pieces to fall
    back to, a word-level vocabulary; the file is written without a tokenizer and the export says why."""
    from tokenizers import normalizers

    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    assert add_tokenizer(writer, _spm_variant(), 0) is None  # Llama-2's own normalizer (Prepend + Replace)
    assert "normalizer NFKC" in add_tokenizer(writer, _spm_variant(normalizers.NFKC()), 0)
    assert "byte fallback" in add_tokenizer(writer, _spm_variant(byte_pieces=False), 0)
    assert "WordLevel" in add_tokenizer(writer, tiny_tokenizer(), 0)
    model = tiny_text_model("llama")
    with pytest.warns(UserWarning, match=r"no tokenizer metadata was written.*normalizer NFKC"):
        save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "q", format="gguf:q4_0",
                       tokenizer=_spm_variant(normalizers.NFKC()), inplace=False)
    reader = gguf.GGUFReader(str(tmp_path / "q" / "model-q4_0.gguf"))
    assert not any(k.startswith("tokenizer.") for k in reader.fields)


def test_export_writes_the_spm_vocab_padded_to_the_embedding(tmp_path: Path) -> None:
    tok = llama2_tokenizer()
    model = tiny_text_model("llama", vocab_size=len(tok) + 5)
    save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "q", format="gguf:q4_0",
                   tokenizer=tok, inplace=False)
    reader = gguf.GGUFReader(str(tmp_path / "q" / "model-q4_0.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    rows = {t.name: t for t in reader.tensors}["token_embd.weight"].shape[1]
    assert len(tokens) == rows == len(tok) + 5 and reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
