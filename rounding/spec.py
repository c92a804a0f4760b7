"""`QuantSpec`: what grid a weight is rounded onto (bits, grouping, symmetry)."""

from __future__ import annotations

from typing import Any

import attrs

SUPPORTED_DATA_TYPES = ("int",)


def _check_bits(_inst: Any, _attr: Any, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(f"QuantSpec.bits must be an integer from 2 to 8, got {value!r}; "
                         "keep a layer in full precision by leaving it out of quantization instead")


def _check_group_size(_inst: Any, _attr: Any, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value > 0):
        raise ValueError(f"QuantSpec.group_size must be -1 (one group per output channel) or a "
                         f"positive integer such as 32, 64 or 128, got {value!r}")


def _check_data_type(_inst: Any, _attr: Any, value: str) -> None:
    if value not in SUPPORTED_DATA_TYPES:
        raise ValueError(f"QuantSpec.data_type must be one of {SUPPORTED_DATA_TYPES}, got {value!r}")


@attrs.frozen
class QuantSpec:
    """Weight-only integer grid.

    bits: 2..8. group_size: elements along the input dimension that share one scale/zero point,
    or -1 for one group per output row. sym: full-range symmetric grid (zero point 2^(bits-1),
    scales may be negative) versus asymmetric min/max grid with an integer zero point.
    """

    bits: int = attrs.field(default=4, validator=_check_bits)
    group_size: int = attrs.field(default=128, validator=_check_group_size)
    sym: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    data_type: str = attrs.field(default="int", validator=_check_data_type)

    @property
    def maxq(self) -> int:
        """Largest integer code: codes live in [0, 2^bits - 1]."""
        return 2**self.bits - 1

    def effective_group_size(self, in_features: int) -> int:
        """Group size for a layer with `in_features` inputs (-1 or a larger group → whole row)."""
        if self.group_size == -1 or self.group_size >= in_features:
            return in_features
        return self.group_size

    def num_groups(self, in_features: int) -> int:
        g = self.effective_group_size(in_features)
        return -(-in_features // g)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)
