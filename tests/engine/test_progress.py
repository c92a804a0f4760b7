"""Progress inside a block: step_batches reports every tuning step; the bar estimates the time left."""

from __future__ import annotations

import io

from rich.console import Console

from signround.adapters.engine import runtime
from signround.adapters.engine.loop import quantize_model
from signround.adapters.engine.progress import BlockProgress
from signround.adapters.engine.report import BlockReport
from signround.rounding import QuantSpec, preset
from tiny_models import random_batches, tiny_text_model


def test_every_tuning_step_is_reported_inside_each_block() -> None:
    model = tiny_text_model("llama")
    seen: list[tuple[int, int]] = []
    with runtime.reporting_steps(lambda t, total: seen.append((t, total))):
        quantize_model(model, random_batches(2, 4, 16), QuantSpec(group_size=32),
                       preset("default", iters=3, nsamples=8, batch_size=4))
    assert seen == [(1, 3), (2, 3), (3, 3)] * 2  # two blocks, three steps each
    seen.clear()
    quantize_model(tiny_text_model("llama"), random_batches(2, 4, 16), QuantSpec(group_size=32),
                   preset("default", iters=3, nsamples=8, batch_size=4))
    assert seen == []  # outside the context nothing is called


def test_the_bar_estimates_the_time_left_for_the_run() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = BlockProgress(4, iters=10, console=Console(file=out, width=200), clock=lambda: now[0])
    assert bar.eta() is None
    now[0] = 5.0
    bar.step(5, 10)  # half a block of four in 5 s: 35 s left
    assert bar.eta() == 35.0
    now[0] = 10.0
    bar.done(BlockReport(name="model.layers.0", layers=("q",), loss_rtn=2.0, loss_tuned=1.0, seconds=10.0, iters=10))
    assert bar.eta() == 30.0
    with bar:
        bar.step(2, 10)
    text = out.getvalue()
    assert "model.layers.0: loss 2 → 1" in text and "block 2/4: step 2/10" in text and "left" in text
