"""Template values: JSON round-trips, presets, lookup, and clear errors for malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signround.templating import PLACEHOLDER, Template, TemplateError, list_presets, load_template
from signround.templating.template import preset_dir

SPEC_DIR = Path(__file__).resolve().parents[2] / "spec"
EXPECTED_PRESETS = {"default", "qwen2_vl", "qwen2_5_vl", "llava", "phi3_v", "mllama", "gemma3", "idefics3"}

text = st.text(st.characters(codec="utf-8", exclude_characters="{}"), max_size=12)
fmt = st.builds(lambda a, b: a + PLACEHOLDER + b, text, text)
flat_pairs = st.lists(st.tuples(text.filter(bool), text), max_size=3).map(lambda ps: tuple(ps))


@st.composite
def templates(draw: st.DrawFn) -> Template:
    return Template(
        model_type=draw(text),
        format_user=draw(fmt),
        format_assistant=draw(fmt),
        format_system=draw(fmt),
        format_function=draw(st.one_of(st.just(""), fmt)),
        format_observation=draw(st.one_of(st.just(""), fmt)),
        format_separator=draw(text),
        default_system=draw(text),
        replace_tokens=draw(flat_pairs),
        extra_encode=draw(st.booleans()),
        default_dataset=draw(text),
        processor=draw(st.sampled_from(["basic", "hf", "qwen2_vl", "llava"])),
        prefix=draw(text),
        system_placement=draw(st.sampled_from(["turn", "first_user"])),
        strip_content=draw(st.booleans()),
        replace_rendered=draw(flat_pairs),
    )


@settings(max_examples=60, deadline=None)
@given(templates())
def test_json_round_trip(t: Template) -> None:
    assert Template.from_json(t.to_json()) == t
    assert Template.from_dict(json.loads(t.to_json())) == t


def test_presets_exist_and_are_found_by_model_type() -> None:
    assert EXPECTED_PRESETS <= set(list_presets())
    for name in EXPECTED_PRESETS:
        t = load_template(None, model_type=name)
        assert t.model_type == name
        assert load_template(name) == t
        # a preset file round-trips through the value
        assert Template.from_json((preset_dir() / f"{name}.json").read_bytes()) == t


def test_unknown_model_type_falls_back_to_default() -> None:
    t = load_template(None, model_type="some_new_vlm")
    assert t.model_type == "some_new_vlm"
    assert attrs.evolve(t, model_type="default") == load_template("default")


def test_unknown_template_name_is_an_error_listing_the_presets() -> None:
    # it fell back to `default` silently before (issue 14), and the user got an unrelated processor error
    with pytest.raises(TemplateError, match=r"qwen2_vl_typo.*no such template preset.*presets: .*qwen2_vl"):
        load_template("qwen2_vl_typo")


def test_user_path_and_template_value(tmp_path: Path) -> None:
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"model_type": "mine", "format_user": "U: {{content}}\n", "processor": "basic"}))
    t = load_template(str(p))
    assert t.format_user == "U: {{content}}\n" and t.format_assistant == PLACEHOLDER and t.format_function == ""
    assert t.format_separator == "\n"
    assert load_template(t) is t
    assert load_template(p) == t


@pytest.mark.parametrize(
    ("content", "field", "words"),
    [
        ("{not json", "<root>", "invalid JSON"),
        ("[1, 2]", "<root>", "JSON object"),
        ('{"replace_tokens": ["<image>", "x", "y"]}', "replace_tokens", "even"),
        ('{"replace_tokens": "abc"}', "replace_tokens", "flat list"),
        ('{"replace_tokens": [1, 2]}', "replace_tokens", "flat list"),
        ('{"format_usr": "{{content}}"}', "format_usr", "unknown field"),
        ('{"processor": "nope"}', "processor", "unknown processor"),
        ('{"format_user": "USER: "}', "format_user", "{{content}}"),
        ('{"format_system": "{{content}}{{content}}"}', "format_system", "at most once"),
        ('{"format_observation": "tool says"}', "format_observation", "{{content}}"),
        ('{"extra_encode": "yes"}', "extra_encode", "boolean"),
        ('{"default_system": 3}', "default_system", "string"),
        ('{"system_placement": "last"}', "system_placement", "one of"),
    ],
)
def test_malformed_template_names_file_and_field(tmp_path: Path, content: str, field: str, words: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(TemplateError) as info:
        load_template(str(p))
    err = info.value
    assert err.field == field and err.source == str(p)
    assert str(p) in str(err) and field in str(err) and words in str(err)


def test_missing_template_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="no such template file"):
        load_template(str(tmp_path / "absent.json"))


def test_template_is_frozen() -> None:
    t = load_template("qwen2_vl")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        t.format_user = "x"  # type: ignore[misc]
    with pytest.raises(TemplateError, match="even|flat"):
        Template(replace_tokens=(("a",),))  # type: ignore[arg-type]


def test_json_schema_matches_template_fields() -> None:
    schema = json.loads((SPEC_DIR / "template.schema.json").read_text())
    assert set(schema["properties"]) == {f.name for f in attrs.fields(Template)}
    assert schema["additionalProperties"] is False
    try:
        import jsonschema
    except ImportError:
        return
    for name in EXPECTED_PRESETS:
        jsonschema.validate(json.loads((preset_dir() / f"{name}.json").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"format_usr": "{{content}}"}, schema)


def test_templating_stays_pure() -> None:
    """Design rule: templating imports neither rounding nor adapters."""
    root = Path(__file__).resolve().parents[2] / "templating"
    for path in root.glob("*.py"):
        src = path.read_text()
        for banned in ("signround.rounding", "signround.adapters", "from ..rounding", "from ..adapters"):
            assert banned not in src, f"{path.name} imports {banned}"
