"""`RoundingParams`: the learnable state of one quantized layer (v, alpha, beta)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from signround.rounding.spec import QuantSpec


@attrs.frozen
class RoundingParams:
    """Per-layer tunables, all float32.

    v: rounding offset per weight element, shape of the weight [out, in]; starts at 0 and is not
    clamped (the decaying lr schedule keeps it within about ±0.5).
    alpha / beta: per-group scales of the min / max side of the range, [out, groups]; start at 1
    and are clamped to [0, 1], so tuning can only shrink the range.
    """

    v: Tensor
    alpha: Tensor
    beta: Tensor

    @classmethod
    def zeros(cls, weight_shape: tuple[int, ...] | torch.Size, spec: QuantSpec,
              device: torch.device | str | None = None) -> "RoundingParams":
        """The starting point (v = 0, alpha = beta = 1): exactly round-to-nearest."""
        out_features, in_features = weight_shape
        groups = spec.num_groups(in_features)
        return cls(
            v=torch.zeros(out_features, in_features, dtype=torch.float32, device=device),
            alpha=torch.ones(out_features, groups, dtype=torch.float32, device=device),
            beta=torch.ones(out_features, groups, dtype=torch.float32, device=device),
        )

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return (self.v, self.alpha, self.beta)

    def map(self, fn) -> "RoundingParams":  # noqa: ANN001 - fn: Tensor -> Tensor
        """Apply `fn` to each tensor and return a new RoundingParams."""
        return RoundingParams(fn(self.v), fn(self.alpha), fn(self.beta))
