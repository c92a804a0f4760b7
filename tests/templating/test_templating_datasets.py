"""Datasets: llava JSON (images, missing files, skipping), text files, text calibration, embedded set."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from _templating_helpers import byte_tokenizer
from signround.templating import (
    ConversationDataset,
    DatasetError,
    TextDataset,
    conversation_calibration,
    conversation_texts,
    embedded_dataset,
    embedded_texts,
    load_dataset,
    load_llava_json,
    load_template,
    render,
    text_calibration,
)
from signround.templating.datasets import move_image_to_front


def _write_llava(tmp: Path, records: list[dict], name: str = "data.json") -> Path:
    p = tmp / name
    p.write_text(json.dumps(records))
    return p


def _img(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    return path


def _conv(q: str = "<image>\nWhat is this?") -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": "A red square."}]


def test_llava_json_resolves_images(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    _img(images / "a.png")
    _img(images / "b.png")
    absolute = _img(tmp_path / "elsewhere" / "c.png")
    p = _write_llava(tmp_path, [
        {"id": "s1", "image": "a.png", "conversations": _conv()},
        {"id": "s2", "image": "train2017/b.png", "conversations": _conv("What is this?\n<image>")},  # basename fallback
        {"id": "s3", "image": str(absolute), "conversations": _conv()},
        {"id": "s4", "conversations": _conv("Tell me a joke.")},  # text-only
        {"id": "s5", "image": "a.png", "conversations": _conv("No placeholder here.")},
    ])
    ds = load_llava_json(p, extra_data_dir=images)
    assert [s.id for s in ds.samples] == ["s1", "s2", "s3", "s4", "s5"] and ds.skipped == 0
    assert ds.samples[0].images == (images / "a.png",)
    assert ds.samples[1].images == (images / "b.png",)
    assert ds.samples[1].turns[0].content == "<image>\nWhat is this?"  # moved to the front
    assert ds.samples[2].images == (absolute,)
    assert ds.samples[3].images == ()
    assert ds.samples[4].turns[0].content.startswith("<image>\n")
    assert load_dataset(p, extra_data_dir=images) == ds


def test_llava_images_beside_json_without_extra_dir(tmp_path: Path) -> None:
    _img(tmp_path / "x.jpg")
    ds = load_llava_json(_write_llava(tmp_path, [{"id": 1, "image": "x.jpg", "conversations": _conv()}]))
    assert ds.samples[0].images == (tmp_path / "x.jpg",)


def test_missing_and_unreadable_images_name_file_and_sample(tmp_path: Path) -> None:
    _img(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    records = [
        {"id": "good", "image": "ok.png", "conversations": _conv()},
        {"id": "gone", "image": "missing.png", "conversations": _conv()},
        {"id": "bad", "image": "broken.png", "conversations": _conv()},
    ]
    p = _write_llava(tmp_path, records)
    with pytest.raises(DatasetError) as info:
        load_llava_json(p, extra_data_dir=tmp_path)
    assert "'gone'" in str(info.value) and "missing.png" in str(info.value) and str(p) in str(info.value)
    p2 = _write_llava(tmp_path, [records[0], records[2]], "two.json")
    with pytest.raises(DatasetError, match=r"'bad'.*broken\.png"):
        load_llava_json(p2, extra_data_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 bad sample"):
        ds = load_llava_json(p, extra_data_dir=tmp_path, skip_bad_samples=True)
    assert [s.id for s in ds.samples] == ["good"] and ds.skipped == 2 and len(ds.skipped_reasons) == 2


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", "empty"),
        ("{oops", "invalid JSON"),
        ('{"id": 1}', "JSON list"),
        ("[3]", "record 0 must be an object"),
        ('[{"id": "x", "conversations": []}]', "non-empty list"),
        ('[{"id": "x", "conversations": [{"from": "alien", "value": "hi"}]}]', "unknown role"),
        ('[{"id": "x", "image": 5, "conversations": [{"from": "human", "value": "hi"}]}]', "file name"),
        ('[{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"}]}]', "placeholders"),
    ],
)
def test_malformed_llava_files(tmp_path: Path, content: str, words: str) -> None:
    _img(tmp_path / "a.png")
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DatasetError, match=words) as info:
        load_llava_json(p)
    assert str(p) in str(info.value)


def test_text_files(tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\nstill first\n\n  \n\nsecond doc\n\n\n")
    assert load_dataset(txt).texts == ("first doc\nstill first", "second doc")
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "a"}\n\n{"text": "b", "meta": 1}\n')
    assert load_dataset(jl).texts == ("a", "b")
    js = tmp_path / "c.json"
    js.write_text('["x", " y ", ""]')
    assert load_dataset(js) == TextDataset(("x", "y"), str(js))


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("e.txt", "  \n\n ", "no documents"),
        ("e.jsonl", "", "no documents"),
        ("e.jsonl", '{"txt": "a"}', "line 1"),
        ("e.jsonl", "[1]\n", "line 1"),
        ("e.jsonl", '{"text": "a"}\n{bad', "line 2"),
        ("e.json", "[]", "no documents"),
        ("e.json", '["a", 3]', "item 1"),
        ("e.json", '{"text": "a"}', "JSON list"),
    ],
)
def test_bad_text_files(tmp_path: Path, name: str, content: str, words: str) -> None:
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DatasetError, match=words):
        load_dataset(p)


def test_missing_file_and_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.json")
    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DatasetError, match="'datasets' package is not installed"):
        load_dataset("NeelNanda/pile-10k")


def test_move_image_to_front() -> None:
    assert move_image_to_front("What?\n<image>") == "<image>\nWhat?"
    assert move_image_to_front("<image>\nWhat?") == "<image>\nWhat?"
    assert move_image_to_front("no image") == "no image"


# ------------------------------------------------------------------------------ text calibration


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return byte_tokenizer([], bos="<s>", add_bos=True)


def test_text_calibration_fixed_length_and_deterministic(tok) -> None:  # type: ignore[no-untyped-def]
    docs = embedded_texts().texts
    a = text_calibration(docs, tok, seqlen=64, nsamples=12, seed=3)
    b = text_calibration(docs, tok, seqlen=64, nsamples=12, seed=3)
    c = text_calibration(docs, tok, seqlen=64, nsamples=12, seed=4)
    assert len(a) == 12
    for s in a:
        assert s["input_ids"].shape == (64,) and s["input_ids"].dtype == torch.long
        assert s["attention_mask"].shape == (64,) and bool(s["attention_mask"].all())
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    # long documents give their own first seqlen tokens, starting with BOS as the tokenizer adds it
    assert a[0]["input_ids"][0] == tok.bos_token_id


def test_short_corpus_still_gives_nsamples(tok) -> None:  # type: ignore[no-untyped-def]
    out = text_calibration(["tiny one", "another short text"], tok, seqlen=128, nsamples=8, seed=0)
    assert len(out) == 8 and all(s["input_ids"].shape == (128,) for s in out)
    stream = torch.cat([s["input_ids"] for s in out]).tolist()
    assert tok.eos_token_id in stream  # documents are separated by EOS
    with pytest.raises(DatasetError):
        text_calibration(["", "  "], tok, seqlen=8, nsamples=1)


def test_text_calibration_batches(tok) -> None:  # type: ignore[no-untyped-def]
    from signround.templating import calibration_batches

    out = text_calibration(embedded_texts().texts, tok, seqlen=32, nsamples=5)
    batches = calibration_batches(out, 2)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32), (1, 32)]


# ---------------------------------------------------------------------------------- embedded set


def test_embedded_dataset_offline_and_renderable(tok) -> None:  # type: ignore[no-untyped-def]
    ds = load_dataset("embedded")
    assert isinstance(ds, ConversationDataset) and ds == embedded_dataset()
    with_images = [s for s in ds.samples if s.images]
    assert len(with_images) >= 12 and len(ds.samples) > len(with_images)
    assert len({s.id for s in ds.samples}) == len(ds.samples)
    sizes = {im.size for s in with_images for im in s.images}
    assert len(sizes) > 3  # variable image sizes
    for s in ds.samples:
        placeholders = sum(t.content.count("<image>") for t in s.turns)
        assert placeholders == len(s.images)
        for name in ("qwen2_vl", "llava", "gemma3", "idefics3", "mllama", "phi3_v", "default"):
            assert "{{content}}" not in render(load_template(name), s.turns)
    texts = load_dataset("embedded_text")
    assert isinstance(texts, TextDataset) and len(texts.texts) >= 12
    rendered = conversation_texts(ds, lambda turns: render(load_template("default"), turns))
    assert len(rendered.texts) == len(ds.samples) and not any("<image>" in t for t in rendered.texts)


def test_text_only_conversations_through_basic_processor(tok) -> None:  # type: ignore[no-untyped-def]
    ds = embedded_dataset()
    text_only = ConversationDataset(tuple(s for s in ds.samples if not s.images), "t")
    cal = conversation_calibration(text_only, load_template("default"), tokenizer=tok, processor_name="basic", seqlen=16, nsamples=3)
    assert len(cal.samples) == 3 and all(s["input_ids"].shape == (1, 16) for s in cal.samples)


def test_unreadable_image_at_encode_time(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    from signround.templating import ConversationSample, Turn

    sample = ConversationSample("z", (Turn("user", "<image>\nhi"),), (tmp_path / "vanished.png",))
    ds = ConversationDataset((sample,), "mem")
    with pytest.raises(DatasetError, match=r"'z'.*vanished\.png"):
        conversation_calibration(ds, load_template("llava"), tokenizer=tok, nsamples=1)
