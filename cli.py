"""The `signround` command line (Typer). Parses and validates arguments, calls the library.

User errors print one line (what is wrong, where, how to fix) and exit 2; `--debug` shows the
traceback instead. Ctrl-C leaves no partial output directory (saves are atomic) and exits 130.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer

from signround.adapters.checkpoint.formats import DEFAULT_FORMAT, FORMAT_NAMES
from signround.adapters.checkpoint.targets import TARGETS

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Quantize LLMs and VLMs to 2-8-bit weights with sign-gradient rounding (AutoRound).")
templates_app = typer.Typer(no_args_is_help=True, help="List, show, validate and render chat templates.")
app.add_typer(templates_app, name="templates")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, KeyError, MemoryError, FloatingPointError)
F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": False}


#: --format choices: the export formats of the checkpoint format table, nothing else
Format = Enum("Format", {name: name for name in FORMAT_NAMES}, type=str)  # type: ignore[misc]
#: --target choices: the runtimes the loadability check judges
Target = Enum("Target", {name: name for name in TARGETS}, type=str)  # type: ignore[misc]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn library errors caused by the user's input into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            _fail("interrupted; nothing was written (saves are atomic)", 130)
        except USER_ERRORS as err:
            if _state["debug"]:
                raise
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            _fail(str(msg))

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    _state["debug"] = debug


@app.command()
def version() -> None:
    """Print the installed signround version."""
    from signround import __version__

    typer.echo(__version__)


@app.command()
@user_errors
def quantize(
    model_path: Path = typer.Argument(..., help="Local Hugging Face model directory."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the checkpoint."),
    bits: int = typer.Option(4, help="Weight bits (2-8)."),
    group_size: int = typer.Option(128, help="Inputs per scale; -1 = per output channel."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Full-range symmetric (default) or asymmetric grid."),
    recipe: str = typer.Option("default", help="Preset: default, light, best, rtn."),
    iters: Optional[int] = typer.Option(None, help="Tuning iterations per block (0 = RTN)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the rounding offsets (default 1/iters)."),
    minmax_lr: Optional[float] = typer.Option(None, help="Learning rate of the range scales (default lr)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration samples."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration sample."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per tuning step."),
    gradient_accumulate_steps: Optional[int] = typer.Option(None, help="Sub-batches per step."),
    seed: Optional[int] = typer.Option(None, help="Random seed (sample order)."),
    dataset: Optional[str] = typer.Option(None, help="Calibration data: llava JSON, .txt, .jsonl, JSON list; default: built-in set."),
    extra_data_dir: Optional[Path] = typer.Option(None, help="Directory the dataset's image paths resolve against."),
    template: Optional[str] = typer.Option(None, help="Chat template: preset name or JSON file (default: by model type)."),
    quant_nontext_module: bool = typer.Option(False, help="Also quantize vision blocks (needs image-text data)."),
    layer_config: Optional[Path] = typer.Option(None, help="JSON file: {layer name or regex: {bits, group_size, sym}}."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, xpu, hpu, cpu (default: best available)."),
    dtype: str = typer.Option("auto", help="Load dtype: auto, bfloat16, float16, float32."),
    low_gpu_mem_usage: bool = typer.Option(False, help="Keep calibration activations on the CPU."),
    cache: str = typer.Option("auto", help="Where calibration activations live: auto (pinned host memory on CUDA, "
                              "streamed ahead), device, host."),
    format: List[Format] = typer.Option([Format(DEFAULT_FORMAT)], "--format", help="Checkpoint format (repeatable)."),
    target: List[Target] = typer.Option([], "--target", help="Runtime that must load the checkpoint (repeatable): "
                                        "an unloadable plan fails before any work; vllm also aligns fused q/k/v "
                                        "and gate/up layers."),
    skip_bad_samples: bool = typer.Option(False, help="Skip dataset samples with missing images instead of failing."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    dry_run: bool = typer.Option(False, help="Print the plan (blocks, layers, bits) and exit."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the run report as JSON here."),
    resume_dir: Optional[Path] = typer.Option(None, help="Keep each finished block here; rerun with the same "
                                              "arguments to continue after a crash."),
) -> None:
    """Quantize MODEL_PATH and save the checkpoint."""
    from signround.adapters.frontends.facade import build_quantizer, check_output_dir, read_layer_config
    from signround.adapters.hf.model_io import load_model, parse_dtype
    from signround.adapters.engine.progress import print_plan

    if output is None and not dry_run:
        raise ValueError("--output is required (where to write the checkpoint), unless --dry-run")
    overrides = {k: v for k, v in dict(iters=iters, lr=lr, minmax_lr=minmax_lr, nsamples=nsamples, seqlen=seqlen,
                                        batch_size=batch_size, gradient_accumulate_steps=gradient_accumulate_steps,
                                        seed=seed).items() if v is not None}
    formats = list(dict.fromkeys(f.value for f in format))
    if output is not None:
        check_output_dir(output, overwrite=overwrite, protect=[model_path])
    loaded = load_model(model_path, dtype=parse_dtype(dtype))
    quantizer = build_quantizer(
        loaded, bits=bits, group_size=group_size, sym=sym, recipe=recipe, dataset=dataset,
        extra_data_dir=extra_data_dir, template=template, quant_nontext_module=quant_nontext_module,
        layer_config=read_layer_config(layer_config) if layer_config else None, device=device,
        low_gpu_mem_usage=low_gpu_mem_usage, cache=cache, skip_bad_samples=skip_bad_samples, resume_dir=resume_dir,
        target=[t.value for t in target], format=formats, **overrides)
    if dry_run:
        print_plan(quantizer.plan())
        return
    report = quantizer.quantize()
    assert output is not None
    paths = quantizer.save_quantized(output, format=formats if len(formats) > 1 else formats[0], overwrite=overwrite)
    if report_json is not None:
        report_json.write_bytes(report.to_json())
    for p in paths.values() if isinstance(paths, dict) else [paths]:
        typer.echo(f"saved {p}")


@app.command("eval")
@user_errors
def eval_(
    model_path: Path = typer.Argument(..., help="The full-precision model directory."),
    quantized: Optional[Path] = typer.Option(None, help="A quantized checkpoint of the same model to compare."),
    text: Optional[Path] = typer.Option(None, help="Text file for perplexity (default: built-in held-out text)."),
    image_text: Optional[Path] = typer.Option(None, help="llava JSON for image-text loss."),
    qa: Optional[str] = typer.Option(None, help="Question-answer set for generation accuracy: llava JSON whose records "
                                     "end with the reference answer (the last gpt turn), or 'embedded'."),
    qa_out: Optional[Path] = typer.Option(None, help="Write each question's answers and scores (per model) as JSON here."),
    max_new_tokens: int = typer.Option(32, help="Tokens generated per question."),
    max_qa: Optional[int] = typer.Option(None, help="Answer at most this many questions."),
    extra_data_dir: Optional[Path] = typer.Option(None, help="Directory the image paths resolve against."),
    template: Optional[str] = typer.Option(None, help="Chat template for the image-text and question sets."),
    seqlen: int = typer.Option(512, help="Perplexity window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate at most this many windows."),
    dtype: str = typer.Option("auto", help="Load dtype of both models (auto: each checkpoint's own)."),
    device: Optional[str] = typer.Option(None, help="Run on this device (default: cpu)."),
    kernel: str = typer.Option("auto", help="Quantized layers' kernel: auto, int4_tinygemm, int4_cpu, int8, dequant."),
    lm_eval_tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-eval tasks run on both models "
                                                "(needs `pip install signround[lm-eval]`)."),
    lm_eval_include: Optional[Path] = typer.Option(None, help="Folder of local lm-eval task YAML files."),
    lm_eval_limit: Optional[float] = typer.Option(None, help="lm-eval: at most this many documents per task "
                                                  "(a fraction when < 1)."),
    progress: bool = typer.Option(True, help="Progress bar with ETA on stderr."),
    json_out: bool = typer.Option(False, "--json", help="Print every number as JSON (a list of rows) instead of a table."),
) -> None:
    """Perplexity, image-text loss, question-answer accuracy (and lm-eval tasks) of a model, side by side
    with its quantized checkpoint."""
    from signround.adapters.frontends.evaluate import evaluate_models, print_comparison
    from signround.adapters.hf.model_io import parse_dtype

    tasks = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
    if qa_out is not None and qa is None:
        raise ValueError("--qa-out needs --qa (the question-answer set to answer)")
    result = evaluate_models(model_path, quantized, text=text, image_text=image_text, qa=qa,
                             extra_data_dir=extra_data_dir, template=template, seqlen=seqlen, max_windows=max_windows,
                             dtype=parse_dtype(dtype), max_new_tokens=max_new_tokens, max_qa=max_qa,
                             lm_eval_tasks=tasks, lm_eval_include=lm_eval_include, lm_eval_limit=lm_eval_limit,
                             kernel=kernel, progress=progress, device=device)
    import orjson

    if qa_out is not None:
        qa_out.write_bytes(orjson.dumps(result.qa, option=orjson.OPT_INDENT_2))
    if json_out:
        typer.echo(orjson.dumps(result.rows, option=orjson.OPT_INDENT_2).decode())
    else:
        print_comparison(result.rows)
        if qa_out is not None:
            typer.echo(f"per-question answers: {qa_out}")


@app.command()
@user_errors
def inspect(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory written by signround or auto-round."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    runtime: bool = typer.Option(False, "--runtime", help="Also tell which kernel each layer runs on this machine "
                                 "(torch's int4/int8 kernels or the dequantizing reference; probes included)."),
    device: Optional[str] = typer.Option(None, help="With --runtime: cpu, cuda, cuda:1 (default: cuda when available)."),
    dtype: str = typer.Option("auto", help="With --runtime: compute dtype (default: the checkpoint's, as the loader)."),
) -> None:
    """Format, bits per layer, group sizes, sizes, and which layers stayed in full precision."""
    from signround.adapters.checkpoint.inspect import inspect_checkpoint, print_inspection

    info = inspect_checkpoint(checkpoint)
    if runtime:
        from signround.adapters.checkpoint.kernels import checkpoint_runtime
        from signround.adapters.hf.model_io import parse_dtype

        info["runtime"] = checkpoint_runtime(checkpoint, info, device=device, dtype=parse_dtype(dtype))
    if json_out:
        import orjson

        typer.echo(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    else:
        print_inspection(info)
        if runtime:
            from signround.adapters.checkpoint.kernels import print_runtime_plan

            print_runtime_plan(info["runtime"])


@app.command()
@user_errors
def demo(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Keep the demo checkpoint here (default: a temp dir)."),
    iters: int = typer.Option(20, help="Tuning iterations per block."),
    bits: int = typer.Option(4, help="Weight bits."),
    group_size: int = typer.Option(64, help="Group size (SmolLM2's width 576 is not a multiple of 128)."),
) -> None:
    """Quantize a small SmolVLM-shaped model end to end on built-in data; print before/after."""
    from signround.adapters.frontends.demo import run_demo

    run_demo(output=output, iters=iters, bits=bits, group_size=group_size)


@app.command()
@user_errors
def bench(
    dims: str = typer.Option("2b", help="Block dimensions: 2b (Qwen2-VL-2B text), 8b (Llama-3-8B), "
                             "70b (Llama-3-70B), tiny (seconds on a CPU)."),
    layers: Optional[int] = typer.Option(None, help="Decoder blocks (default: the preset's)."),
    hidden: Optional[int] = typer.Option(None, help="Hidden size."),
    intermediate: Optional[int] = typer.Option(None, help="MLP width."),
    heads: Optional[int] = typer.Option(None, help="Attention heads."),
    kv_heads: Optional[int] = typer.Option(None, help="Key/value heads."),
    vocab: Optional[int] = typer.Option(None, help="Vocabulary size."),
    model_type: Optional[str] = typer.Option(None, help="Decoder architecture (default qwen2; llama, …)."),
    iters: Optional[int] = typer.Option(None, help="Tuning iterations per block (default 200)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration samples (default 128)."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per sample (default 2048)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per step (default 8)."),
    bits: Optional[int] = typer.Option(None, help="Weight bits (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Group size (default 128)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the random model and data (default 0)."),
    device: Optional[str] = typer.Option(None, help="Device (default: best available)."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype on accelerators: bfloat16 (default), float16, "
                                        "float32; always float32 on the CPU."),
    low_gpu_mem_usage: bool = typer.Option(False, help="Ours: keep the activation cache on the CPU."),
    cache: Optional[str] = typer.Option(None, help="Ours: where the activation cache lives: auto, device, host "
                                        "(default: the engine's)."),
    reference: bool = typer.Option(True, help="Also run the auto-round package, when installed, and print ratios."),
    reference_low_mem: bool = typer.Option(False, help="Also run auto-round with its low_gpu_mem_usage."),
    profile: Optional[Path] = typer.Option(None, help="CUDA: profile one block's tuning steps into this "
                                           "directory (ops table, memory snapshot)."),
    profile_iters: Optional[int] = typer.Option(None, help="Tuning steps under the profiler (default 25)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every number as JSON here."),
) -> None:
    """Per-block tuning time and peak memory on a random model of real block dimensions, vs auto-round."""
    from signround.adapters.frontends.bench import BenchConfig, run_bench

    cfg = BenchConfig.preset(dims, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                             kv_heads=kv_heads, vocab=vocab, model_type=model_type, iters=iters, nsamples=nsamples,
                             seqlen=seqlen, batch_size=batch_size, bits=bits, group_size=group_size, seed=seed,
                             device=device, dtype=dtype, low_gpu_mem_usage=low_gpu_mem_usage, cache=cache, reference=reference,
                             reference_low_mem=reference_low_mem, profile=profile, profile_iters=profile_iters)
    run_bench(cfg, json_out=json_out)


@templates_app.command("list")
def templates_list() -> None:
    """Preset template names."""
    from signround.templating import list_presets

    for name in list_presets():
        typer.echo(name)


@templates_app.command("show")
@user_errors
def templates_show(name: str = typer.Argument(..., help="Preset name or JSON path.")) -> None:
    """Print a template as JSON."""
    from signround.templating import load_template

    typer.echo(load_template(name).to_json().decode())


@templates_app.command("validate")
@user_errors
def templates_validate(file: Path = typer.Argument(..., help="Template JSON file.")) -> None:
    """Check a template file; prints `ok` or one error naming the field."""
    from signround.templating.template import read_template

    t = read_template(file)
    typer.echo(f"ok: {file} (model_type {t.model_type!r}, processor {t.processor!r})")


@templates_app.command("render")
@user_errors
def templates_render(
    file: str = typer.Argument(..., help="Template preset name or JSON file."),
    conversation: Path = typer.Option(..., help="JSON file: a list of turns ({from, value} or {role, content})."),
) -> None:
    """Render a conversation through a template and print the text."""
    import orjson

    from signround.templating import load_template, render

    if not conversation.is_file():
        raise FileNotFoundError(f"conversation file {str(conversation)!r} does not exist")
    try:
        turns = orjson.loads(conversation.read_bytes())
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{conversation}: not valid JSON ({err})") from None
    if isinstance(turns, dict) and "conversations" in turns:
        turns = turns["conversations"]
    sys.stdout.write(render(load_template(file), turns))
    sys.stdout.write("\n")


def main() -> None:
    app(prog_name="signround")
