"""The built-in calibration sets: nothing is downloaded.

- `builtin_texts()`: the default text calibration corpus, about 1.6 M characters (397 k SmolLM2
  tokens, more than the default 128 × 2048) of English prose and code from CPython 3.11 (the
  Language Reference topics of `pydoc_data`, standard-library docstrings, IDLE's guide; PSF
  licence, `data/LICENSE-PSF.txt`) plus this project's own documents, read from
  `data/builtin-calibration.jsonl.xz` (built by `tests/bench/build_calibration_corpus.py`; counts and
  provenance in `data/builtin-calibration.json`). Technical English: for another domain or language,
  pass your own data or generate it from the model (`--dataset self`).
- `embedded_dataset()`: image-text conversations, each image drawn by a small deterministic
  function (shapes, colours, text, simple scenes) with Pillow at run time, plus text-only
  conversations; `embedded_texts()`: 16 short documents written for this project (the text default
  before the corpus above; about 900 tokens).
"""

from __future__ import annotations

import lzma
from collections.abc import Callable
from functools import cache
from importlib import resources

import orjson

from PIL import Image, ImageDraw

from signround.templating.datasets import ConversationDataset, ConversationSample, TextDataset
from signround.templating.render import IMAGE_TOKEN, Turn


def _canvas(size: tuple[int, int], colour: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", size, colour)
    return im, ImageDraw.Draw(im)


def _red_circle() -> Image.Image:
    im, d = _canvas((320, 240), "white")
    d.ellipse((100, 60, 220, 180), fill="red", outline="black", width=3)
    return im


def _blue_square_yellow_triangle() -> Image.Image:
    im, d = _canvas((400, 300), "#f0f0f0")
    d.rectangle((40, 80, 180, 220), fill="blue")
    d.polygon([(260, 220), (330, 80), (380, 220)], fill="yellow", outline="black")
    return im


def _traffic_light() -> Image.Image:
    im, d = _canvas((160, 360), "#87ceeb")
    d.rectangle((50, 30, 110, 230), fill="#222222")
    for i, colour in enumerate(("red", "#553300", "#004400")):
        d.ellipse((60, 40 + 65 * i, 100, 80 + 65 * i), fill=colour)
    d.rectangle((75, 230, 85, 360), fill="gray")
    return im


def _stop_sign() -> Image.Image:
    im, d = _canvas((300, 300), "#9fd3ff")
    d.regular_polygon((150, 150, 110), 8, rotation=22.5, fill="#cc0000", outline="white")
    d.text((118, 142), "STOP", fill="white")
    return im


def _house_and_sun() -> Image.Image:
    im, d = _canvas((480, 320), "#a8d8ff")
    d.rectangle((0, 250, 480, 320), fill="#3a9d23")
    d.rectangle((150, 150, 300, 260), fill="#c0392b")
    d.polygon([(135, 150), (225, 80), (315, 150)], fill="#5d4037")
    d.rectangle((205, 200, 245, 260), fill="#6d4c41")
    d.ellipse((390, 20, 450, 80), fill="#ffd700")
    return im


def _tree_field() -> Image.Image:
    im, d = _canvas((360, 360), "#cfe9ff")
    d.rectangle((0, 280, 360, 360), fill="#7cb342")
    for x in (70, 180, 290):
        d.rectangle((x - 8, 200, x + 8, 290), fill="#6d4c41")
        d.ellipse((x - 45, 120, x + 45, 220), fill="#2e7d32")
    return im


def _bar_chart() -> Image.Image:
    im, d = _canvas((420, 300), "white")
    d.line((40, 260, 400, 260), fill="black", width=2)
    d.line((40, 20, 40, 260), fill="black", width=2)
    for i, (h, colour) in enumerate(((80, "#1f77b4"), (180, "#ff7f0e"), (130, "#2ca02c"), (220, "#d62728"))):
        d.rectangle((70 + 80 * i, 260 - h, 120 + 80 * i, 260), fill=colour)
        d.text((88 + 80 * i, 266), "ABCD"[i], fill="black")
    return im


def _number_card() -> Image.Image:
    im, d = _canvas((256, 256), "#fff3c4")
    d.rectangle((20, 20, 236, 236), outline="#333333", width=4)
    d.text((100, 110), "42", fill="black", font_size=40)
    return im


def _stripes() -> Image.Image:
    im, d = _canvas((300, 200), "white")
    for i, colour in enumerate(("red", "orange", "yellow", "green", "blue", "purple")):
        d.rectangle((0, 33 * i, 300, 33 * (i + 1)), fill=colour)
    return im


def _checkerboard() -> Image.Image:
    im, d = _canvas((256, 256), "white")
    for r in range(8):
        for c in range(8):
            if (r + c) % 2:
                d.rectangle((32 * c, 32 * r, 32 * c + 31, 32 * r + 31), fill="black")
    return im


def _night_sky() -> Image.Image:
    im, d = _canvas((480, 270), "#0b1d3a")
    d.ellipse((360, 30, 430, 100), fill="#f5f3ce")
    d.ellipse((380, 25, 440, 90), fill="#0b1d3a")  # crescent
    for k in range(40):
        x, y = (k * 97) % 470 + 5, (k * 53) % 200 + 5
        d.point((x, y), fill="white")
    d.rectangle((0, 230, 480, 270), fill="#101010")
    return im


def _three_balls() -> Image.Image:
    im, d = _canvas((360, 200), "#dddddd")
    for i, colour in enumerate(("green", "green", "purple")):
        d.ellipse((30 + 110 * i, 60, 110 + 110 * i, 140), fill=colour)
    return im


def _clock() -> Image.Image:
    im, d = _canvas((300, 300), "white")
    d.ellipse((30, 30, 270, 270), outline="black", width=6)
    d.line((150, 150, 150, 70), fill="black", width=6)   # minute hand at 12
    d.line((150, 150, 210, 150), fill="black", width=8)  # hour hand at 3
    return im


def _boat() -> Image.Image:
    im, d = _canvas((400, 280), "#bde0fe")
    d.rectangle((0, 190, 400, 280), fill="#1d4e89")
    d.polygon([(120, 190), (280, 190), (250, 225), (150, 225)], fill="#8d5524")
    d.line((200, 60, 200, 190), fill="#333333", width=4)
    d.polygon([(204, 65), (204, 180), (280, 180)], fill="white")
    return im


def _ask(image_fn: Callable[[], Image.Image], *qa: str) -> tuple[Callable[[], Image.Image], tuple[str, ...]]:
    return image_fn, qa


# Each entry: an image-drawing function and alternating question/answer turns about it.
_IMAGE_CONVERSATIONS = (
    _ask(_red_circle, "What shape is in the picture, and what colour is it?",
         "A red circle with a black outline, centred on a white background."),
    _ask(_blue_square_yellow_triangle, "Describe the shapes you see.",
         "On the left there is a blue square; on the right a yellow triangle outlined in black, on a light grey background.",
         "Which shape has more corners?", "The square: it has four corners, the triangle has three."),
    _ask(_traffic_light, "Which light is on?", "The top light is on, and it is red, so traffic has to stop."),
    _ask(_stop_sign, "What does the sign say?", "It is a red octagonal sign with the word STOP written in white."),
    _ask(_house_and_sun, "Describe this scene.",
         "A small red house with a brown roof and a door stands on green grass under a blue sky; a yellow sun shines in the top right corner."),
    _ask(_tree_field, "How many trees are there?", "Three trees stand in a row on a grassy field.",
         "What season might it be?", "Their leaves are full and green, so it looks like late spring or summer."),
    _ask(_bar_chart, "Which bar in the chart is the tallest?",
         "Bar D, the red one on the right, is the tallest; bar A, the blue one, is the shortest."),
    _ask(_number_card, "What number is written on the card?", "The card shows the number 42 inside a dark border."),
    _ask(_stripes, "List the colours from top to bottom.", "Red, orange, yellow, green, blue and purple: the colours of a rainbow."),
    _ask(_checkerboard, "What pattern is this?",
         "A black-and-white checkerboard of eight by eight squares, like a chess board."),
    _ask(_night_sky, "Is this picture taken during the day or at night?",
         "At night: the sky is dark blue, there is a crescent moon and many small stars."),
    _ask(_three_balls, "How many balls are green?", "Two of the three balls are green; the one on the right is purple."),
    _ask(_clock, "What time does the clock show?", "The short hand points to three and the long hand to twelve, so it is three o'clock."),
    _ask(_boat, "What is in the water?", "A small wooden sailing boat with a white sail floats on dark blue water."),
)

_TEXT_CONVERSATIONS = (
    ("Why is the sky blue?",
     "Sunlight contains all colours. Air molecules scatter short wavelengths much more strongly than long ones, "
     "so blue light is scattered across the whole sky and reaches our eyes from every direction."),
    ("Give me a short recipe for pancakes.",
     "Whisk one egg with a cup of milk, stir in a cup of flour, a spoon of sugar and a pinch of salt, "
     "then fry ladles of batter in a buttered pan until bubbles form, flip, and cook one more minute."),
    ("Write a Python function that returns the square of a number.",
     "def square(x):\n    return x * x"),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Translate 'good morning' into Spanish and German.", "Spanish: buenos días. German: guten Morgen."),
    ("Explain in one sentence what a prime number is.",
     "A prime number is a whole number greater than one whose only divisors are one and itself."),
)

_TEXTS = (
    "The river starts as a thin stream high in the mountains, fed by melting snow each spring. As it flows "
    "downhill it gathers water from dozens of small creeks, cuts a deep valley through the rock, and slows "
    "down only when it reaches the wide plain, where farmers have used it for irrigation for centuries.",
    "A good cup of tea depends on three things: fresh water, the right temperature and patience. Green tea "
    "prefers water well below boiling, while black tea can take it hot. Leaving the leaves too long makes "
    "the drink bitter, so it is worth using a timer the first few times.",
    "In a binary search, the algorithm compares the target with the middle element of a sorted list. If "
    "they differ, the half that cannot contain the target is discarded and the search continues on the "
    "remaining half. Because the range halves at every step, a list of a million items needs about twenty "
    "comparisons.",
    "The library on the corner opened in 1911. Its reading room has tall windows facing south, long oak "
    "tables and green lamps. On rainy afternoons it fills with students, retired engineers reading "
    "newspapers, and children looking for books about dinosaurs and space.",
    "Bees communicate the direction of food with a dance. A worker returning to the hive walks in a figure "
    "of eight, waggling her body along the straight part; the angle of that run relative to vertical tells "
    "the others the angle between the food and the sun, and its length tells them the distance.",
    "To change a bicycle tyre, first release the brake and remove the wheel. Use two levers to lift one "
    "side of the tyre over the rim, pull out the inner tube, and find the puncture. Check the inside of the "
    "tyre for glass or thorns before fitting a new tube and pumping it up to the pressure printed on the side.",
    "Weather forecasts combine observations from stations, balloons, ships and satellites with numerical "
    "models of the atmosphere. The models divide the air into a grid and step the equations of fluid motion "
    "forward in time. Small errors grow, which is why forecasts beyond about ten days lose most of their skill.",
    "Quantization stores the weights of a neural network with fewer bits, for example four instead of "
    "sixteen. Each group of weights shares a scale and a zero point, and every weight is rounded to one of "
    "sixteen levels. Choosing whether to round up or down with care, instead of to the nearest level, can "
    "recover much of the accuracy lost.",
    "The old harbour town is quiet in winter. Fishing boats stay tied to the pier, the cafés close early and "
    "the wind carries the smell of salt and wood smoke through narrow streets. In summer the same streets "
    "are crowded with visitors, ice cream stands and music from open windows.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
    "chloroplasts of plant cells, where chlorophyll absorbs mostly red and blue light and reflects green, "
    "which is why leaves look green to us.",
    "A spreadsheet is a grid of cells, each holding a number, some text or a formula. Formulas refer to "
    "other cells, so changing one value updates every total that depends on it. This simple idea made "
    "personal computers useful to accountants, scientists and shop owners alike.",
    "Mount Everest rises 8,849 metres above sea level on the border between Nepal and China. Climbers "
    "usually spend weeks acclimatising at base camp and intermediate camps, because the air at the summit "
    "holds only about a third of the oxygen available at sea level.",
    "When you learn a new language, short daily practice beats long weekly sessions. Reading simple stories, "
    "repeating phrases aloud and talking with native speakers, even with mistakes, build the habit of "
    "thinking in the language rather than translating every word.",
    "The museum's new exhibition shows clocks from five centuries: sundials, water clocks, pendulum clocks "
    "with carved wooden cases, early pocket watches and a quartz clock from 1969. A guide explains how each "
    "invention made timekeeping more precise by a factor of ten or more.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "# The loop keeps only the last two values, so it runs in linear time and constant memory.",
    "Volcanoes form where molten rock reaches the surface. Along the Pacific Ring of Fire, one tectonic "
    "plate slides beneath another and melts; in Hawaii, a hot spot deep in the mantle feeds lava through "
    "the moving plate, leaving a chain of islands that grow older towards the north-west.",
)


@cache
def _images() -> tuple[Image.Image, ...]:
    return tuple(fn() for fn, _ in _IMAGE_CONVERSATIONS)


def embedded_dataset() -> ConversationDataset:
    """The embedded image-text conversations (14 drawn images) plus text-only conversations.

    Images are drawn once per process and shared; treat them as read-only.
    """
    samples: list[ConversationSample] = []
    for k, ((_, qa), image) in enumerate(zip(_IMAGE_CONVERSATIONS, _images())):
        turns = [Turn("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(qa)]
        turns[0] = Turn("user", IMAGE_TOKEN + "\n" + turns[0].content)
        samples.append(ConversationSample(f"embedded-image-{k:02d}", tuple(turns), (image,)))
    for k, (q, a) in enumerate(_TEXT_CONVERSATIONS):
        samples.append(ConversationSample(f"embedded-text-{k:02d}", (Turn("user", q), Turn("assistant", a))))
    return ConversationDataset(tuple(samples), "embedded")


def embedded_texts() -> TextDataset:
    """Plain documents written for this project (prose, instructions, code) for text calibration."""
    return TextDataset(_TEXTS, "embedded_text")


BUILTIN_CORPUS = "builtin-calibration.jsonl.xz"


@cache
def _builtin_records() -> tuple[tuple[str, str], ...]:
    raw = lzma.decompress((resources.files("signround.templating") / "data" / BUILTIN_CORPUS).read_bytes())
    return tuple((r["source"], r["text"]) for r in map(orjson.loads, raw.splitlines()))


def builtin_texts() -> TextDataset:
    """The default text calibration corpus (see the module docstring), in its stored order;
    `text_calibration` shuffles it by the recipe's seed."""
    return TextDataset(tuple(text for _, text in _builtin_records()), "builtin")
