"""Chat templates as frozen values, loaded from and saved to JSON.

A `Template` says how each turn of a conversation becomes text: one format string per role,
with `{{content}}` where the turn's text goes. Presets live in the package's `templates/*.json`
and are found by `model_type`; a user can pass the path of their own JSON file. The format is
specified in `spec/templates.md` (JSON Schema: `spec/template.schema.json`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import orjson

PLACEHOLDER = "{{content}}"

_FORMAT_FIELDS = (
    "format_user",
    "format_assistant",
    "format_system",
    "format_function",
    "format_observation",
)
# Formats that must carry the placeholder when given (function/observation may be "" = dropped).
_PLACEHOLDER_REQUIRED = ("format_user", "format_assistant", "format_system")
SYSTEM_PLACEMENTS = ("turn", "first_user")


class TemplateError(ValueError):
    """A template file or value is malformed; the message names the file and the field."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source, self.field, self.problem = source, field, problem
        super().__init__(f"{source}: field {field!r}: {problem}")


def _pairs(flat: Any, source: str, field: str) -> tuple[tuple[str, str], ...]:
    if isinstance(flat, tuple) and all(isinstance(p, tuple) for p in flat):
        flat = [x for p in flat for x in p]
    if not isinstance(flat, (list, tuple)) or not all(isinstance(x, str) for x in flat):
        raise TemplateError(source, field, "must be a flat list of strings [old1, new1, old2, new2, ...]")
    if len(flat) % 2:
        raise TemplateError(source, field, f"must have an even length (pairs old, new); got {len(flat)} items")
    if any(old == "" for old in flat[::2]):
        raise TemplateError(source, field, "an 'old' string must not be empty")
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


@attrs.frozen(kw_only=True)
class Template:
    """One model family's chat format. Immutable; `attrs.evolve` makes a changed copy.

    Fields follow AutoRound's template JSON (`replace_tokens` is kept as pairs here and written
    back as the flat list). `prefix`, `system_placement`, `strip_content` and `replace_rendered`
    are our additions, needed to reproduce gemma3 and idefics3 exactly (see spec/templates.md).
    """

    model_type: str = "user_define"
    format_user: str = PLACEHOLDER
    format_assistant: str = PLACEHOLDER
    format_system: str = PLACEHOLDER
    format_function: str = ""
    format_observation: str = ""
    format_separator: str = "\n"
    default_system: str = ""
    replace_tokens: tuple[tuple[str, str], ...] = ()
    extra_encode: bool = False
    default_dataset: str = "embedded"
    processor: str = "basic"
    prefix: str = ""
    system_placement: str = "turn"
    strip_content: bool = False
    replace_rendered: tuple[tuple[str, str], ...] = ()

    def __attrs_post_init__(self) -> None:
        _validate(self, source="<Template>")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, replacement pairs flattened."""
        d = attrs.asdict(self, recurse=False)
        for key in ("replace_tokens", "replace_rendered"):
            d[key] = [x for pair in d[key] for x in pair]
        return d

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Template:
        """Build from the JSON form; raises `TemplateError` naming `source` and the bad field."""
        if not isinstance(data, dict):
            raise TemplateError(source, "<root>", f"must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in attrs.fields(cls)}
        for key in data:
            if key not in known:
                raise TemplateError(source, key, f"unknown field (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {}
        for f in attrs.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("replace_tokens", "replace_rendered"):
                value = _pairs(value, source, f.name)
            elif f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise TemplateError(source, f.name, f"must be a boolean, got {value!r}")
            elif not isinstance(value, str):
                raise TemplateError(source, f.name, f"must be a string, got {type(value).__name__}")
            kwargs[f.name] = value
        try:
            return cls(**kwargs)
        except TemplateError as err:  # re-raise naming the file instead of "<Template>"
            raise TemplateError(source, err.field, err.problem) from None

    @classmethod
    def from_json(cls, text: bytes | str, source: str = "<json>") -> Template:
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as err:
            raise TemplateError(source, "<root>", f"invalid JSON: {err}") from None
        return cls.from_dict(data, source)


def _validate(t: Template, source: str) -> None:
    from signround.templating.processors import PROCESSORS  # late: processors import this module

    for name in (*_FORMAT_FIELDS, "format_separator", "default_system", "model_type", "prefix", "processor"):
        if not isinstance(getattr(t, name), str):
            raise TemplateError(source, name, "must be a string")
    for name in _FORMAT_FIELDS:
        value = getattr(t, name)
        count = value.count(PLACEHOLDER)
        if count > 1:
            raise TemplateError(source, name, f"contains {PLACEHOLDER} {count} times; at most once")
        if count == 0 and (name in _PLACEHOLDER_REQUIRED or value != ""):
            raise TemplateError(source, name, f"must contain {PLACEHOLDER} (or be \"\" for function/observation)")
    for name in ("replace_tokens", "replace_rendered"):
        _pairs(getattr(t, name), source, name)
    if t.system_placement not in SYSTEM_PLACEMENTS:
        raise TemplateError(source, "system_placement", f"must be one of {SYSTEM_PLACEMENTS}, got {t.system_placement!r}")
    if t.processor not in PROCESSORS:
        raise TemplateError(source, "processor", f"unknown processor {t.processor!r}; registered: {sorted(PROCESSORS)}")


def preset_dir() -> Path:
    """The folder holding the preset JSON files shipped with the package."""
    return Path(str(resources.files("signround") / "templates"))


def list_presets() -> tuple[str, ...]:
    """Names (model types) of the shipped presets."""
    return tuple(sorted(p.stem for p in preset_dir().glob("*.json")))


def read_template(path: str | Path) -> Template:
    """Load one template JSON file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TemplateError(str(path), "<file>", f"cannot read: {err.strerror or err}") from None
    return Template.from_json(raw, source=str(path))


def load_template(name_or_path: str | Path | Template | None = None, model_type: str | None = None) -> Template:
    """Resolve a template: a `Template`, a JSON path, a preset name, else the preset for `model_type`.

    A name given that is neither a preset nor a file is a `TemplateError` listing the presets. With
    no name, a `model_type` without a preset falls back to `default` with `model_type` set to it
    (as AutoRound does). A path that does not exist is an error.
    """
    if isinstance(name_or_path, Template):
        return name_or_path
    if name_or_path is not None:
        text = str(name_or_path)
        if text.endswith(".json") or Path(text).is_file() or "/" in text or "\\" in text:
            if not Path(text).is_file():
                raise TemplateError(text, "<file>", "no such template file")
            return read_template(text)
        if not (preset_dir() / f"{text}.json").is_file():
            raise TemplateError(text, "<name>", "no such template preset or file; presets: "
                                f"{', '.join(list_presets())} (or give the path of a template JSON file)")
        wanted = text
    else:
        wanted = model_type or "default"
    preset = preset_dir() / f"{wanted}.json"
    if preset.is_file():
        return read_template(preset)
    fallback = read_template(preset_dir() / "default.json")
    return attrs.evolve(fallback, model_type=wanted)
