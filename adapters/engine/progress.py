"""What front ends show while and after quantizing, with rich: a progress bar over blocks
(per-block loss before/after, fed by quantize_model's `on_block`) and a final summary. The engine
itself prints nothing; the facade and the CLI use these."""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from signround.adapters.engine.report import BlockReport, QuantReport


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{x:.3g}"


class BlockProgress:
    """`with BlockProgress(total, enabled) as bar: quantize_model(..., on_block=bar.done)`; silent
    when disabled."""

    def __init__(self, total: int, enabled: bool = True, console: Optional[Console] = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress = Progress(TextColumn("[bold]quantize"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.description}"),
                                  console=self.console, disable=not enabled, transient=False)
        self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> "BlockProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def done(self, block: BlockReport) -> None:
        note = {"tuned": " (kept RTN)" if block.kept_rtn else "", "rounded": " (RTN, no data)",
                "replayed": " (replayed from the resume store)", "not_called": " (not called: kept fp)"}[block.source]
        text = f"{block.name}: loss {_fmt(block.loss_rtn)} → {_fmt(block.loss_tuned)}{note} ({block.seconds:.1f}s)"
        self._progress.update(self._task, advance=1, description=text)
        if self.enabled:
            self._progress.console.log(text)


def print_summary(report: QuantReport, console: Optional[Console] = None) -> None:
    """Layers quantized/skipped, mean loss RTN → tuned, time, peak memory."""
    console = console or Console(stderr=True)
    s = report.summary()
    table = Table(title="signround", show_header=False)
    table.add_row("blocks", f"{len(report.blocks)} in {', '.join(report.block_name_to_quantize)}")
    table.add_row("layers", f"{len(report.layers)} quantized, {len(report.skipped)} kept in full precision")
    table.add_row("mean block loss", f"{_fmt(s['mean_loss_rtn'])} (RTN) → {_fmt(s['mean_loss_tuned'])} (tuned)")
    kept = sum(b.kept_rtn for b in report.blocks)
    if kept:
        table.add_row("kept RTN", f"{kept} block(s): the tuned weights scored worse than RTN on all samples")
    table.add_row("time", f"{report.seconds:.1f} s on {report.device}")
    if report.peak_memory_bytes is not None:
        table.add_row("peak memory", f"{report.peak_memory_bytes / 2**30:.2f} GiB ({report.peak_memory_kind})")
    console.print(table)


def print_plan(plan: Any, console: Optional[Console] = None) -> None:
    """`--dry-run`: every layer that would be quantized with its grid, and every layer kept fp and why."""


    console = console or Console()
    table = Table(title=f"plan: {len(plan.quantize)} layers quantized, {len(plan.skipped)} kept in full precision")
    for col in ("layer", "bits", "group", "sym", "note"):
        table.add_column(col)
    for name, spec in plan.quantize.items():
        table.add_row(name, str(spec.bits), str(spec.group_size), str(spec.sym), "")
    for name, why in plan.skipped.items():
        table.add_row(name, "16", "-", "-", why)
    console.print(table)
