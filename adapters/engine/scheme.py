"""How much each layer's loss would grow on each candidate grid, measured on calibration data.

The score of layer ℓ on candidate c (spec/mixed-precision.md, "Sensitivity"):

    s(ℓ, c) = ½ Σ_t Σ_n g_{t,n}² · ((W − Q_c(W)) x_t)_n²

x_t: the layer's input at token t; g_t = ∂L/∂y_t: the gradient of the model's next-token loss
(summed over the calibration tokens) at the layer's output; Q_c: round to nearest on grid c. It
is the layer's RTN output error weighted per token and channel by the diagonal of the output-space
Fisher, the second-order estimate of the loss increase that quantizing ℓ alone causes. One forward
and backward pass per batch; weights take no gradient; each layer's inputs live only for its pass.

With `quantized` (a plan: layer → grid), the passes run on the model with those layers rounded to
nearest on their grids (put back after), so x_t and g_t are the degraded model's, where the errors
of the other quantized layers have compounded; each candidate's error W − Q_c(W) is still taken on
the layer's original weight. This is the re-scoring round of spec/mixed-precision.md §4.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import attrs
import torch
from torch import Tensor, nn

from signround.adapters.hf.placement import move_outside, restore
from signround.rounding import QuantSpec, qdq

Batch = Union[Tensor, Mapping[str, Any]]


@attrs.frozen
class LayerScores:
    """loss: layer name → one score per candidate, in the order asked; tokens: tokens scored;
    seconds: wall time of the scoring passes; device: where they ran."""

    loss: Mapping[str, tuple[float, ...]]
    tokens: int
    seconds: float
    device: str


def _inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    items = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in items.items()}


def _token_loss(logits: Tensor, inputs: Mapping[str, Any]) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over the positions the attention mask keeps."""
    ids = inputs["input_ids"]
    labels = ids[:, 1:].clone()
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        labels[mask[:, 1:] == 0] = -100
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       reduction="sum")
    return loss, int((labels != -100).sum())


def score_layers(model: nn.Module, batches: Iterable[Batch], candidates: Mapping[str, Sequence[QuantSpec]], *,
                 device: torch.device | str | None = None,
                 quantized: Mapping[str, QuantSpec] | None = None) -> LayerScores:
    """Score every named Linear on each of its candidate grids (see the module docstring).

    candidates: layer name → the grids to score it on (each already fitted to the layer's shape).
    batches: calibration batches (input_ids tensors or dicts of model inputs with `input_ids`).
    device: where the passes run (default: where the model is); the whole model is placed there for
    the scoring and put back after. quantized: layer → grid: those Linears are rounded to nearest
    on their grid for the passes (inputs and gradients come from that degraded model), while every
    candidate's error is measured against the layer's original weight. The model's parameters are
    left as they were."""
    params = list(model.parameters())
    if any(p.device.type == "meta" for p in params):
        raise ValueError("scoring layers needs the model's weights in memory; a model streamed from disk "
                         "(weights on the meta device) cannot be scored: load it in RAM")
    modules = dict(model.named_modules())
    missing = [n for n in candidates if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"cannot score {missing[0]!r}: not an nn.Linear of this model")
    quantized = dict(quantized or {})
    missing = [n for n in quantized if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ValueError(f"cannot round {missing[0]!r} for the scoring passes: not an nn.Linear of this model")
    originals: dict[str, Tensor] = {}  # layer → its weight as it was, while the passes see it rounded
    home = params[0].device
    run_on = torch.device(device) if device is not None else home
    grads = [p.requires_grad for p in params]
    totals = {n: torch.zeros(len(c), dtype=torch.float64) for n, c in candidates.items()}
    handles = []

    def on_forward(name: str) -> Any:
        specs = candidates[name]

        def hook(module: nn.Linear, args: tuple[Any, ...], out: Tensor) -> None:
            if not out.requires_grad:
                return
            x = args[0].detach()

            def on_grad(g: Tensor) -> None:
                with torch.no_grad():
                    w = originals.get(name, module.weight).float()
                    delta = torch.cat([w - qdq(w, s).float() for s in specs])  # [C·N, K]
                    y = x.reshape(-1, x.shape[-1]).float() @ delta.t()  # [T, C·N]
                    g2 = g.reshape(-1, g.shape[-1]).float().square().repeat(1, len(specs))
                    per = (g2 * y.square()).reshape(g2.shape[0], len(specs), -1).sum(dim=(0, 2))
                    totals[name].add_(0.5 * per.double().cpu())

            out.register_hook(on_grad)

        return hook

    start = time.perf_counter()
    tokens = 0
    moved: list = []
    try:
        for p in params:
            p.requires_grad_(False)
        moved = move_outside(model, (), run_on)  # back into the CPU tensors they came from, afterwards
        with torch.no_grad():
            for n, spec in quantized.items():
                w = modules[n].weight
                originals[n] = w.detach().clone()
                w.copy_(qdq(originals[n].float(), spec).to(w.dtype))
        # the embeddings' output is where the gradient starts, so no weight takes one
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        handles += [modules[n].register_forward_hook(on_forward(n)) for n in candidates]
        for batch in batches:
            inputs = _inputs(batch, run_on)
            loss, n = _token_loss(model(**inputs, use_cache=False).logits, inputs)
            if n:
                loss.backward()
            tokens += n
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, w in originals.items():
                modules[n].weight.copy_(w)
        originals.clear()
        restore(moved)
        for p, g in zip(params, grads):
            p.requires_grad_(g)
    if tokens == 0:
        raise ValueError("the calibration batches hold no token to score the layers on (every position masked)")
    return LayerScores(loss={n: tuple(float(v) for v in t) for n, t in totals.items()}, tokens=tokens,
                       seconds=time.perf_counter() - start, device=str(run_on))
