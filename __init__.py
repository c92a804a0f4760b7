"""signround: sign-gradient rounding (AutoRound/SignRound) for multimodal and text LLMs."""

__version__ = "0.1.0"

from signround.rounding import QuantSpec, Recipe, RoundingParams, preset  # noqa: E402

__all__ = ["QuantSpec", "Recipe", "RoundingParams", "__version__", "preset"]
