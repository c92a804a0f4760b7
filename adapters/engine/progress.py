"""What front ends show while and after quantizing, with rich: a progress bar over blocks
(per-block loss before/after, fed by quantize_model's `on_block`) and a final summary. The engine
itself prints nothing; the facade and the CLI use these."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from signround.adapters.engine.report import BlockReport, QuantReport


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{x:.3g}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class BlockProgress:
    """`with BlockProgress(total, iters, enabled) as bar:` then `quantize_model(..., on_block=bar.done)`
    under `runtime.reporting_steps(bar.step)`: one line per finished block (loss RTN → tuned) and,
    inside a block, the tuning step and an estimate of the time left for the whole run. Silent when
    disabled."""

    def __init__(self, total: int, iters: int = 0, enabled: bool = True, console: Optional[Console] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.enabled = enabled
        self.total, self.iters = total, iters
        self.console = console or Console(stderr=True)
        self._clock = clock
        self._start = clock()
        self._blocks_done = 0
        self._steps_done = 0  # inside the current block
        self._progress = Progress(TextColumn("[bold]quantize"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.description}"),
                                  console=self.console, disable=not enabled, transient=False)
        self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> "BlockProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def eta(self) -> Optional[float]:
        """Seconds left for the run, from the share of tuning steps done so far (None before any)."""
        per_block = max(self.iters, 1)
        done = self._blocks_done * per_block + min(self._steps_done, per_block)
        if done <= 0:
            return None
        elapsed = self._clock() - self._start
        return elapsed * (self.total * per_block - done) / done

    def step(self, t: int, steps: int) -> None:
        """After tuning step t of `steps` in the current block."""
        self._steps_done = t
        if self.iters != steps:
            self.iters = steps
        eta = self.eta()
        text = (f"block {self._blocks_done + 1}/{self.total}: step {t}/{steps}"
                + (f", about {_duration(eta)} left" if eta is not None else ""))
        self._progress.update(self._task, description=text)

    def done(self, block: BlockReport) -> None:
        self._blocks_done += 1
        self._steps_done = 0
        note = {"tuned": " (kept RTN)" if block.kept_rtn else "", "rounded": " (RTN, no data)",
                "replayed": " (replayed from the resume store)", "not_called": " (not called: kept fp)"}[block.source]
        text = f"{block.name}: loss {_fmt(block.loss_rtn)} → {_fmt(block.loss_tuned)}{note} ({block.seconds:.1f}s)"
        eta = self.eta() if self._blocks_done < self.total else None
        self._progress.update(self._task, advance=1,
                              description=text + (f", about {_duration(eta)} left" if eta is not None else ""))
        if self.enabled:
            self._progress.console.print(text, highlight=False)


def print_settings(settings: Mapping[str, Any], console: Optional[Console] = None) -> None:
    """What a run will do, before tuning: calibration, recipe, grid, layers, device and cache."""
    console = console or Console(stderr=True)
    table = Table(title="signround will", show_header=False)
    for key, value in settings.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
        table.add_row(key, str(value))
    console.print(table)


def print_summary(report: QuantReport, console: Optional[Console] = None) -> None:
    """Layers quantized/skipped, mean loss RTN → tuned, time, peak memory."""
    console = console or Console(stderr=True)
    s = report.summary()
    table = Table(title="signround", show_header=False)
    table.add_row("blocks", f"{len(report.blocks)} in {', '.join(report.block_name_to_quantize)}")
    fp = report.kept_fp()
    table.add_row("layers", f"{len(report.layers)} quantized, {fp['layers']} kept in full precision")
    moe = report.experts()
    if moe["quantized"] or moe["kept_in_full_precision"]:
        table.add_row("MoE experts", f"{moe['quantized']} expert layer(s) quantized, {moe['kept_in_full_precision']} "
                      f"kept in full precision, {moe['not_routed']} of experts no calibration token reached (RTN)")
    if fp["other_in_blocks"]:
        first = next(n for n, why in report.other_weights.items() if not why.startswith("outside"))
        table.add_row("not quantized", f"{fp['other_in_blocks']} other weight(s) inside the blocks, kept in full "
                      f"precision: {first} ({report.other_weights[first]}), …")
    if fp["outside_blocks"]:
        names = [n for n, why in report.other_weights.items() if why.startswith("outside")]
        table.add_row("outside blocks", f"{len(names)} weight(s) kept in full precision ({', '.join(names[:3])}"
                      f"{' …' if len(names) > 3 else ''})")
    table.add_row("mean block loss", f"{_fmt(s['mean_loss_rtn'])} (RTN) → {_fmt(s['mean_loss_tuned'])} (tuned)")
    kept = sum(b.kept_rtn for b in report.blocks)
    if kept:
        table.add_row("kept RTN", f"{kept} block(s): the tuned weights scored worse than RTN on all samples")
    table.add_row("time", f"{report.seconds:.1f} s on {report.device}")
    if report.peak_memory_bytes is not None:
        table.add_row("peak memory", f"{report.peak_memory_bytes / 2**30:.2f} GiB ({report.peak_memory_kind})")
    console.print(table)


def print_plan(plan: Any, console: Optional[Console] = None) -> None:
    """`--dry-run`: every layer that would be quantized with its grid, and every weight in the blocks
    kept fp and why."""
    console = console or Console()
    other = {n: why for n, why in plan.other_weights.items() if not why.startswith("outside")}
    title = f"plan: {len(plan.quantize)} layers quantized, {len(plan.skipped) + len(other)} kept in full precision"
    table = Table(title=title)
    for col in ("layer", "bits", "group", "sym", "note"):
        table.add_column(col)
    for name, spec in plan.quantize.items():
        table.add_row(name, str(spec.bits), str(spec.group_size), str(spec.sym), "")
    for name, why in {**plan.skipped, **other}.items():
        table.add_row(name, "16", "-", "-", why)
    console.print(table)
