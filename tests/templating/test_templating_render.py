"""Rendering: hypothesis properties, and every preset against its family's own chat template."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _templating_helpers import (
    GEMMA3_CHAT_TEMPLATE,
    IDEFICS3_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    MLLAMA_CHAT_TEMPLATE,
    PHI3_V_CHAT_TEMPLATE,
    byte_tokenizer,
    needs_qwen,
    qwen_tokenizer,
)
from signround.templating import PLACEHOLDER, ConversationError, Template, Turn, load_template, normalize, render

# Formats use only upper-case letters and punctuation; turn texts are "[i]" + lower-case letters,
# so each turn's text can only come from that turn.
FMT_CHARS = st.text(st.sampled_from("ABCXYZ<>|/: \n"), max_size=8)
fmt = st.builds(lambda a, b: a + PLACEHOLDER + b, FMT_CHARS, FMT_CHARS)
ROLES = ["user", "assistant", "function", "observation"]


@st.composite
def plain_templates(draw: st.DrawFn) -> Template:
    return Template(
        format_user=draw(fmt), format_assistant=draw(fmt), format_system=draw(fmt),
        format_function=draw(fmt), format_observation=draw(fmt),
        default_system=draw(st.one_of(st.just(""), st.just("[sys]default"))), prefix=draw(FMT_CHARS),
    )


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 6))
    style = draw(st.sampled_from(["llava", "chat"]))
    turns = []
    if draw(st.booleans()):
        turns.append(("system", "[s]" + draw(st.text("abcdefgh", max_size=10))))
    for i in range(n):
        turns.append((draw(st.sampled_from(ROLES)), f"[{i}]" + draw(st.text("abcdefgh", max_size=10))))
    llava_role = {"user": "human", "assistant": "gpt", "system": "system", "function": "function", "observation": "observation"}
    if style == "llava":
        return [{"from": llava_role[r], "value": c} for r, c in turns]
    return [{"role": r, "content": c} for r, c in turns]


def _contents(conv: list[dict[str, Any]]) -> list[str]:
    return [m.get("value", m.get("content")) for m in conv]


@settings(max_examples=150, deadline=None)
@given(plain_templates(), conversations())
def test_each_turn_once_in_order_and_no_placeholder_left(t: Template, conv: list[dict[str, Any]]) -> None:
    out = render(t, conv)
    assert PLACEHOLDER not in out
    assert out.startswith(t.prefix)
    texts = _contents(conv)
    has_system = normalize(conv)[0].role == "system"
    if not has_system and t.default_system:
        texts = [t.default_system, *texts]
    pos = -1
    for text in texts:
        assert out.count(text) == 1, (text, out)
        assert out.index(text) > pos
        pos = out.index(text)


@settings(max_examples=100, deadline=None)
@given(plain_templates(), conversations(), st.lists(st.tuples(st.text("abcdefgh", min_size=1, max_size=3), st.text("XYZ", max_size=3)), max_size=3))
def test_replacements_apply_to_contents(t: Template, conv: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> None:
    with_pairs = attrs.evolve(t, replace_tokens=tuple(pairs))
    out = render(with_pairs, conv)
    # same as replacing inside each content first
    def rep(s: str) -> str:
        for old, new in pairs:
            s = s.replace(old, new)
        return s
    pre = [dict(m, **({"value": rep(m["value"])} if "value" in m else {"content": rep(m["content"])})) for m in conv]
    assert out == render(attrs.evolve(t, default_system=rep(t.default_system)), pre)
    # formats hold no lower-case letters and the replacements add none: no 'old' survives
    if pairs:
        old, _ = pairs[-1]
        assert old not in out


@settings(max_examples=50, deadline=None)
@given(plain_templates(), conversations())
def test_render_is_pure(t: Template, conv: list[dict[str, Any]]) -> None:
    before = copy.deepcopy(conv)
    assert render(t, conv) == render(t, conv) == render(t, normalize(conv))
    assert conv == before


def test_function_and_observation_dropped_when_format_empty() -> None:
    t = Template(format_user="U:{{content}};", format_assistant="A:{{content}};")
    out = render(t, [{"role": "user", "content": "q"}, {"role": "tool", "content": "obs"}, {"role": "assistant", "content": "a"}])
    assert out == "U:q;A:a;"


def test_list_content_and_roles() -> None:
    t = load_template("default")
    out = render(t, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
    assert out == "<image>\nhi\n"
    with pytest.raises(ConversationError, match="unknown role"):
        render(t, [{"from": "narrator", "value": "x"}])
    with pytest.raises(ConversationError, match="turn 0"):
        render(t, [{"text": "x"}])
    with pytest.raises(ConversationError, match="content"):
        render(t, [{"role": "user", "content": 3}])
    with pytest.raises(ConversationError):
        render(t, "just a string")  # type: ignore[arg-type]


@pytest.mark.parametrize("speaker, text", [("from", "value"), ("role", "content"), ("role", "value"),
                                           ("from", "content"), ("role", "text")])
def test_every_turn_spelling_keeps_its_text(speaker: str, text: str) -> None:
    # {"role", "value"} rendered as empty chat frames before (issue 14): the text was silently dropped
    t = load_template("default")
    conv = [{speaker: "human" if speaker == "from" else "user", text: "What is 2+2?"},
            {speaker: "gpt" if speaker == "from" else "assistant", text: "Four."}]
    assert normalize(conv) == (Turn("user", "What is 2+2?"), Turn("assistant", "Four."))
    assert "What is 2+2?" in render(t, conv) and "Four." in render(t, conv)


@pytest.mark.parametrize("turn", [{"role": "user"}, {"from": "gpt", "content": None}, {"role": "user", "valeu": "x"}])
def test_a_turn_without_text_is_an_error_naming_it(turn: dict) -> None:
    conv = [{"role": "system", "content": "Be brief."}, turn]
    with pytest.raises(ConversationError, match=r"turn 1 .*has no text.*value, content, text"):
        normalize(conv)


def test_system_first_user_placement() -> None:
    t = load_template("gemma3")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render(t, conv) == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"


# ----------------------------------------------------------------- presets against HF chat templates

IMG_Q = "<image>\nWhat is in this picture?"


def _ours(conv: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in conv]


def _hf(conv: list[tuple[str, str]], image_form: str | None = None) -> list[dict[str, Any]]:
    """HF-style messages: '<image>\\n' prefixes become image parts (or the family's string tag)."""
    out = []
    for role, content in conv:
        if image_form is not None:
            out.append({"role": role, "content": content.replace("<image>", image_form)})
            continue
        parts: list[dict[str, str]] = []
        while content.startswith("<image>\n"):
            parts.append({"type": "image"})
            content = content[len("<image>\n"):]
        parts.append({"type": "text", "text": content})
        out.append({"role": role, "content": parts})
    return out


CONVS = {
    "image_qa": [("user", IMG_Q), ("assistant", "A red circle on a white background.")],
    "multi_turn": [("user", IMG_Q), ("assistant", "A house."), ("user", "What colour is the roof?"), ("assistant", "Brown.")],
    "two_images": [("user", "<image>\n<image>\nCompare the pictures."), ("assistant", "The left one is darker.")],
    "system": [("system", "You are a careful describer."), ("user", IMG_Q), ("assistant", "A boat.")],
    "text_only": [("user", "Why is the sky blue?"), ("assistant", "Rayleigh scattering.")],
}

# family -> (chat template, tokenizer specials, bos, conversations known to match, HF image form)
FAMILIES = {
    "llava": (LLAVA_CHAT_TEMPLATE, ["<image>"], None, ["image_qa", "multi_turn", "two_images", "system", "text_only"], None),
    "idefics3": (IDEFICS3_CHAT_TEMPLATE, ["<image>", "<end_of_utterance>", "<|im_start|>"], None,
                 ["image_qa", "multi_turn", "two_images", "system", "text_only"], None),
    "gemma3": (GEMMA3_CHAT_TEMPLATE, ["<start_of_image>", "<start_of_turn>", "<end_of_turn>"], "<bos>",
               ["image_qa", "multi_turn", "two_images", "system", "text_only"], None),
    # Llama-3.2-Vision: images and system messages do not mix there, and its text-only branch adds a
    # dated system header; the preset targets image conversations (see spec/templates.md).
    "mllama": (MLLAMA_CHAT_TEMPLATE, ["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               ["image_qa", "multi_turn", "two_images"], None),
    "phi3_v": (PHI3_V_CHAT_TEMPLATE, ["<|image_1|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"], None,
               ["image_qa", "multi_turn", "system", "text_only"], "<|image_1|>"),
}


@pytest.mark.parametrize(("family", "conv_name"), [(f, c) for f, spec in FAMILIES.items() for c in spec[3]])
def test_preset_matches_family_chat_template(family: str, conv_name: str) -> None:
    chat_template, specials, bos, _, image_form = FAMILIES[family]
    tok = byte_tokenizer(specials, bos=bos, chat_template=chat_template)
    conv = CONVS[conv_name]
    expected = tok.apply_chat_template(_hf(conv, image_form), tokenize=False)
    if bos:
        assert expected.startswith(bos)
        expected = expected[len(bos):]  # our rendering leaves BOS to the tokenizer
    assert render(load_template(family), _ours(conv)) == expected


@needs_qwen
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_qwen_presets_match_hf_chat_template(family: str, conv_name: str) -> None:
    tok = qwen_tokenizer()
    conv = CONVS[conv_name]
    expected = tok.apply_chat_template(_hf(conv), tokenize=False)
    ours = render(load_template(family), _ours(conv))
    assert ours == expected
    assert tok(ours).input_ids == tok.apply_chat_template(_hf(conv), tokenize=True, return_dict=True)["input_ids"]
