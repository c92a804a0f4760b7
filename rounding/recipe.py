"""`Recipe`: how hard to tune (iterations, learning rates, calibration size), with named presets."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import orjson


def _positive(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Recipe.{attr.name} must be a positive integer, got {value!r}")


def _non_negative(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Recipe.{attr.name} must be an integer >= 0 (0 = plain RTN), got {value!r}")


def _optional_lr(_inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Recipe.{attr.name} must be a positive number or None (default), got {value!r}")


@attrs.frozen
class Recipe:
    """Tuning hyper-parameters. Defaults are the reference's (AutoRound 0.16) defaults.

    lr None means 1/iters; minmax_lr None means lr. iters 0 is round-to-nearest on the same grid.
    """

    iters: int = attrs.field(default=200, validator=_non_negative)
    lr: Optional[float] = attrs.field(default=None, validator=_optional_lr)
    minmax_lr: Optional[float] = attrs.field(default=None, validator=_optional_lr)
    nsamples: int = attrs.field(default=128, validator=_positive)
    seqlen: int = attrs.field(default=2048, validator=_positive)
    batch_size: int = attrs.field(default=8, validator=_positive)
    gradient_accumulate_steps: int = attrs.field(default=1, validator=_positive)
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    use_best: bool = True
    seed: int = 42
    amp: bool = True

    @property
    def resolved_lr(self) -> float:
        """Learning rate of the rounding offsets `v`."""
        if self.lr is not None:
            return float(self.lr)
        return 1.0 / self.iters if self.iters > 0 else 0.0

    @property
    def resolved_minmax_lr(self) -> float:
        """Learning rate of the range scales alpha/beta."""
        return float(self.minmax_lr) if self.minmax_lr is not None else self.resolved_lr

    def for_bits(self, bits: int) -> "Recipe":
        """The recipe as applied to layers of `bits`: with lr left at its default, long runs
        (iters >= 1000) of 2-3-bit layers take lr = 2/iters, as the reference (0.16) does."""
        if self.lr is None and self.iters >= 1000 and bits <= 3:
            return attrs.evolve(self, lr=2.0 / self.iters)
        return self

    @property
    def is_rtn(self) -> bool:
        return self.iters == 0

    def to_json(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> "Recipe":
        raw = orjson.loads(data)
        if not isinstance(raw, dict):
            raise ValueError(f"a recipe must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**raw)


PRESETS: dict[str, Recipe] = {
    "default": Recipe(),
    "light": Recipe(iters=50, lr=5e-3),
    "best": Recipe(iters=1000, nsamples=512),
    "rtn": Recipe(iters=0),
}


def preset(name: str, **overrides: Any) -> Recipe:
    """A named recipe (`default`, `light`, `best`, `rtn`), optionally with fields overridden."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(PRESETS)}") from None
    return attrs.evolve(base, **overrides) if overrides else base
