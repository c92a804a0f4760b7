"""The built-in text corpus (size, licence, no repeats at the default recipe), lazy tokenization,
the repeat warning, self-generated calibration, dataset names and extensions, turns without text."""

from __future__ import annotations

import hashlib
import json
import lzma
import warnings
from importlib import resources
from pathlib import Path

import pytest
import torch

from _templating_helpers import byte_tokenizer
from signround.templating import (DatasetError, SelfGenerated, builtin_texts, embedded_texts, load_dataset,
                                  self_calibration, text_calibration_set)
from tiny_models import tiny_text_model

DATA = resources.files("signround.templating") / "data"


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return byte_tokenizer([], bos="<s>", add_bos=True)


def test_the_corpus_covers_the_default_recipe_without_repeats() -> None:
    # the old default was 926 tokens, cycled ~283 times to fill 128 x 2048 (issue 14)
    manifest = json.loads((DATA / "builtin-calibration.json").read_text())
    assert manifest["tokens"]["total"] >= 128 * 2048  # measured with SmolLM2's tokenizer when it was built
    assert manifest["tokens"]["longest_document"] < 2048  # every document fits a default sample: none is cut
    raw = lzma.decompress((DATA / manifest["file"]).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == manifest["sha256"]
    texts = builtin_texts().texts
    assert len(texts) == manifest["documents"] and len(set(texts)) == len(texts)
    assert sum(map(len, texts)) == manifest["characters"] > 1_000_000
    licence = (DATA / "LICENSE-PSF.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence
    assert load_dataset("builtin").source == "builtin"


class CountingTokenizer:
    def __init__(self, tok) -> None:  # type: ignore[no-untyped-def]
        self.tok, self.calls = tok, 0
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text: str):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.tok(text)


def test_only_as_much_text_as_needed_is_tokenized(tok) -> None:  # type: ignore[no-untyped-def]
    counting = CountingTokenizer(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no repeat warning
        cal = text_calibration_set(builtin_texts().texts, counting, seqlen=256, nsamples=8, seed=0, source="builtin")
    assert len(cal.samples) == 8 and cal.repeats == 1.0 and cal.distinct_tokens == 8 * 256
    assert counting.calls < 20  # of ~2160 documents


def test_a_small_corpus_says_how_often_it_repeats(tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.warns(UserWarning, match=r"embedded_text: \d+ distinct tokens fill 8 samples × 1024 tokens = 8192, "
                                         r"so the text is repeated \d+\.\d×"):
        cal = text_calibration_set(embedded_texts().texts, tok, seqlen=1024, nsamples=8, source="embedded_text")
    assert cal.repeats > 1 and cal.distinct_tokens < 8 * 1024
    assert "repeated" in cal.note()


def test_self_generated_samples_are_seeded_and_whole(tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny_text_model("llama", vocab_size=len(tok))
    model.train()
    state = torch.random.get_rng_state()
    a = self_calibration(model, tok, nsamples=3, seqlen=12, seed=5, batch_size=2)
    b = self_calibration(model, tok, nsamples=3, seqlen=12, seed=5, batch_size=2)
    c = self_calibration(model, tok, nsamples=3, seqlen=12, seed=6, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training  # nothing else touched
    assert [s["input_ids"].shape for s in a.samples] == [(12,)] * 3
    assert all(int(s["input_ids"][0]) == tok.bos_token_id for s in a.samples)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.samples, b.samples))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.samples, c.samples))
    assert a.source == "self" and a.distinct_tokens == 36
    assert isinstance(load_dataset("self"), SelfGenerated)


@pytest.mark.parametrize("name, needle", [
    ("calib.csv", "no such dataset file or name"),
    ("pile", "built-in names: builtin, embedded, embedded_text, self"),
])
def test_unknown_names_and_extensions_name_what_exists(name: str, needle: str) -> None:
    with pytest.raises(DatasetError, match=needle) as err:
        load_dataset(name)
    assert ".jsonl" in str(err.value)


def test_an_existing_file_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "calib.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match=r"extension '\.parquet', which is not a dataset format"):
        load_dataset(tmp_path / "calib.parquet")
    with pytest.raises(DatasetError, match="is a directory"):
        load_dataset(tmp_path)


def test_a_llava_turn_without_text_names_the_sample_and_turn(tmp_path: Path) -> None:
    p = tmp_path / "llava.json"
    p.write_text(json.dumps([{"id": "s1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}]))
    with pytest.raises(DatasetError, match=r"llava\.json: sample 's1': turn 1 \(from 'gpt'\) has no text"):
        load_dataset(p)
    p.write_text(json.dumps([{"id": "s2", "conversations": [{"role": "user", "value": "hi"},
                                                             {"from": "gpt", "content": "hello"}]}]))
    (sample,) = load_dataset(p).samples
    assert [t.content for t in sample.turns] == ["hi", "hello"]
