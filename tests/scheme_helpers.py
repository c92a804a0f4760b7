"""The layer sensitivity score computed by hand, for the scoring tests (tests/engine/test_scheme.py, test_rescore.py)."""

from __future__ import annotations

from typing import Optional

import torch

from signround.rounding import QuantSpec, qdq


def score_by_hand(model: torch.nn.Module, batches, name: str, spec: QuantSpec,
                  weight: Optional[torch.Tensor] = None) -> float:
    """½ Σ_t Σ_n (∂L/∂y)² ((W − Q(W)) x)²: x and ∂L/∂y from `model`'s passes (autograd.grad at the layer's
    output), W = `weight` (default the layer's own)."""
    layer = model.get_submodule(name)
    w = (layer.weight if weight is None else weight).detach()
    total = 0.0
    for ids in batches:
        seen = {}
        h = layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
        with torch.enable_grad():
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            (g,) = torch.autograd.grad(loss, seen["y"])
        h.remove()
        y = seen["x"].detach() @ (w - qdq(w, spec)).t()
        total += 0.5 * float((g.square() * y.square()).sum())
    return total
