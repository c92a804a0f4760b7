"""Calibration data sources: llava-style JSON conversations and plain-text corpora.

Reading files is the only I/O. Loaders validate eagerly, so a bad dataset fails before any
model work starts, with an error naming the file (and the sample id / line).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import attrs
import orjson

from signround.templating.images import ImageError, ImageSource, check_image
from signround.templating.render import IMAGE_TOKEN, ConversationError, Turn, normalize


class DatasetError(ValueError):
    """A dataset file or sample is malformed; the message names the file and the sample."""


@attrs.frozen
class ConversationSample:
    """One image-text (or text-only) conversation; `<image>` sits at the start of its turn."""

    id: str
    turns: tuple[Turn, ...]
    images: tuple[ImageSource, ...] = ()


@attrs.frozen
class ConversationDataset:
    """Conversations plus how many records were skipped as bad (only with skip_bad_samples)."""

    samples: tuple[ConversationSample, ...]
    source: str
    skipped: int = 0
    skipped_reasons: tuple[str, ...] = ()


@attrs.frozen
class TextDataset:
    """Plain documents for text-decoder calibration."""

    texts: tuple[str, ...]
    source: str


Dataset = Union[ConversationDataset, TextDataset]


def move_image_to_front(text: str) -> str:
    """`"What is it?\\n<image>"` -> `"<image>\\nWhat is it?"` (as LLaVA training data is read)."""
    if IMAGE_TOKEN not in text or text.startswith(IMAGE_TOKEN):
        return text
    count = text.count(IMAGE_TOKEN)
    rest = text.replace(IMAGE_TOKEN, "").strip()
    return (IMAGE_TOKEN + "\n") * count + rest


def _resolve_image(name: str, json_path: Path, extra_data_dir: str | Path | None) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    if extra_data_dir is not None:
        base = Path(extra_data_dir).expanduser()
        if (base / p).exists() or not (base / p.name).exists():
            return base / p
        return base / p.name  # COCO-style dumps keep only the basename
    return json_path.parent / p


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read dataset file ({err.strerror or err})") from None
    if not raw.strip():
        raise DatasetError(f"{path}: dataset file is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise DatasetError(f"{path}: invalid JSON ({err})") from None


def _llava_record(rec: Any, index: int, path: Path, extra_data_dir: str | Path | None) -> ConversationSample:
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{path}: record {index} must be an object, got {type(rec).__name__}")
    sid = str(rec.get("id", index))
    where = f"{path}: sample {sid!r}"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    try:
        turns = normalize(conv)
    except ConversationError as err:
        raise DatasetError(f"{where}: {err}") from None
    raw_images = rec.get("image", rec.get("images"))
    names = [] if raw_images in (None, "", []) else ([raw_images] if isinstance(raw_images, str) else raw_images)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{where}: 'image' must be a file name or a list of file names")
    images = tuple(_resolve_image(n, path, extra_data_dir) for n in names)
    for img in images:
        try:
            check_image(img)
        except ImageError as err:
            raise DatasetError(f"{where}: {err}") from None
    turns = tuple(attrs.evolve(t, content=move_image_to_front(t.content)) for t in turns)
    placeholders = sum(t.content.count(IMAGE_TOKEN) for t in turns)
    if images and placeholders == 0:  # an image with no placeholder goes before the first user turn
        first = next((i for i, t in enumerate(turns) if t.role == "user"), 0)
        t = turns[first]
        turns = turns[:first] + (attrs.evolve(t, content=(IMAGE_TOKEN + "\n") * len(images) + t.content),) + turns[first + 1 :]
    elif placeholders != len(images):
        raise DatasetError(f"{where}: {placeholders} '<image>' placeholders but {len(images)} images")
    return ConversationSample(sid, turns, images)


def load_llava_json(
    path: str | Path, *, extra_data_dir: str | Path | None = None, skip_bad_samples: bool = False
) -> ConversationDataset:
    """Read `[{"id", "image"?, "conversations": [{"from", "value"}, ...]}, ...]`.

    Relative image names resolve under `extra_data_dir` (its basename is tried too), else beside
    the JSON file; absolute paths are used as they are. A record without `image` is text-only.
    A bad record (missing/unreadable image, wrong types) raises `DatasetError` naming the file and
    sample id, unless `skip_bad_samples`: then it is left out and counted in `skipped`.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a llava dataset must be a JSON list of records, got {type(data).__name__}")
    samples: list[ConversationSample] = []
    reasons: list[str] = []
    for i, rec in enumerate(data):
        try:
            samples.append(_llava_record(rec, i, path, extra_data_dir))
        except DatasetError as err:
            if not skip_bad_samples:
                raise
            reasons.append(str(err))
    if reasons:
        warnings.warn(f"{path}: skipped {len(reasons)} bad sample(s) of {len(data)}; first: {reasons[0]}", stacklevel=2)
    if not samples:
        raise DatasetError(f"{path}: no usable samples" + (f" ({len(reasons)} skipped as bad)" if reasons else ""))
    return ConversationDataset(tuple(samples), str(path), len(reasons), tuple(reasons))


_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def _texts_from_json(data: Any, path: Path) -> list[str]:
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a text dataset must be a JSON list of strings, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise DatasetError(f"{path}: item {i} must be a string (or an object with a 'text' string), got {type(item).__name__}")
        out.append(item)
    return out


def load_text_file(path: str | Path) -> TextDataset:
    """Documents from `.txt` (blank-line separated), `.jsonl` (`text` field) or `.json` (list of strings)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        texts = _texts_from_json(_read_json(path), path)
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"{path}: cannot read text dataset ({err})") from None
        if suffix == ".jsonl":
            texts = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    raise DatasetError(f"{path}: line {n}: invalid JSON ({err})") from None
                if not isinstance(obj, Mapping) or not isinstance(obj.get("text"), str):
                    raise DatasetError(f"{path}: line {n}: expected an object with a 'text' string")
                texts.append(obj["text"])
        else:
            texts = _BLANK_LINES.split(raw.replace("\r\n", "\n"))
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise DatasetError(f"{path}: no documents (file is empty or blank)")
    return TextDataset(tuple(texts), str(path))


def _is_llava(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and isinstance(data[0], Mapping) and "conversations" in data[0]


def load_hf_text(name: str, *, split: str = "train", text_field: str = "text") -> TextDataset:
    """A Hugging Face `datasets` text set (only if that package is installed and the data reachable)."""
    try:
        import datasets as hf_datasets  # optional; never required
    except ImportError:
        raise DatasetError(
            f"{name!r} is not a file, a known name, or loadable: the 'datasets' package is not installed"
        ) from None
    try:
        ds = hf_datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth, missing data: all end here
        raise DatasetError(f"{name!r}: could not load with the datasets package ({type(err).__name__}: {err})") from None
    if text_field not in ds.column_names:
        raise DatasetError(f"{name!r}: no {text_field!r} column (columns: {ds.column_names})")
    return TextDataset(tuple(t for t in ds[text_field] if isinstance(t, str) and t.strip()), name)


def load_dataset(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    extra_data_dir: str | Path | None = None,
    skip_bad_samples: bool = False,
) -> Dataset:
    """Resolve a dataset by name or path.

    - None / "embedded" / "default": the embedded image-text set (`embedded.embedded_dataset`);
      "embedded_text": its plain-text documents;
    - a `.json` file: llava records (objects with `conversations`) or a list of strings;
    - `.jsonl` / `.txt` files: text documents;
    - anything else: a `datasets` name, only when that package is installed (no Hub otherwise).
    """
    from signround.templating import embedded

    name = None if name_or_path is None else os.fspath(name_or_path)
    if name in (None, "embedded", "default"):
        return embedded.embedded_dataset()
    if name == "embedded_text":
        return embedded.embedded_texts()
    path = Path(name).expanduser()
    if path.suffix.lower() in (".json", ".jsonl", ".txt") or path.exists():
        if not path.is_file():
            raise DatasetError(f"{path}: dataset file not found")
        if path.suffix.lower() == ".json":
            data = _read_json(path)
            if _is_llava(data):
                return load_llava_json(path, extra_data_dir=extra_data_dir, skip_bad_samples=skip_bad_samples)
            texts = tuple(t.strip() for t in _texts_from_json(data, path) if t.strip())
            if not texts:
                raise DatasetError(f"{path}: no documents (the list is empty or blank)")
            return TextDataset(texts, str(path))
        return load_text_file(path)
    return load_hf_text(name)


def conversation_texts(dataset: ConversationDataset, render_fn: Any) -> TextDataset:
    """Render each conversation (image placeholders removed) to text for text-only calibration."""
    texts = []
    for s in dataset.samples:
        turns = tuple(attrs.evolve(t, content=t.content.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")) for t in s.turns)
        texts.append(render_fn(turns))
    return TextDataset(tuple(texts), dataset.source)


__all__: Sequence[str] = (
    "ConversationDataset",
    "ConversationSample",
    "Dataset",
    "DatasetError",
    "TextDataset",
    "conversation_texts",
    "load_dataset",
    "load_hf_text",
    "load_llava_json",
    "load_text_file",
    "move_image_to_front",
)
