"""The `signround` command line (Typer). Parses and validates arguments, calls the library.

User errors print one line (what is wrong, where, how to fix, in the CLI's option names) and exit
2; `--debug` shows the traceback instead; warnings are one line each. Ctrl-C leaves no partial
output directory (saves are atomic), says what is on disk, and exits 130. `quantize` also takes
auto-round's spellings of its options (`--group_size`, `--bs`, `--model PATH`, `--format a,b`, …).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import click
import typer
from typer.core import TyperCommand

from signround.adapters.checkpoint.formats import DEFAULT_FORMAT, FORMAT_NAMES
from signround.adapters.checkpoint.targets import TARGETS

# Plain click help (not rich panels): option names are never cut, whatever the terminal width.
HELP = {"max_content_width": 120}
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings=HELP,
                  help="Quantize LLMs and VLMs to 2-8-bit weights with sign-gradient rounding (AutoRound).")
templates_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=HELP,
                            help="List, show, validate and render chat templates.")
app.add_typer(templates_app, name="templates")

USER_ERRORS = (ValueError, OSError, KeyError, MemoryError, FloatingPointError)
F = TypeVar("F", bound=Callable[..., Any])
_state: dict[str, Any] = {"debug": False, "output": None, "output_id": None}


#: --format choices: the export formats of the checkpoint format table, nothing else
Format = Enum("Format", {name: name for name in FORMAT_NAMES}, type=str)  # type: ignore[misc]
#: --target choices: the runtimes the loadability check judges
Target = Enum("Target", {name: name for name in TARGETS}, type=str)  # type: ignore[misc]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


# API argument -> CLI option, for messages the library writes in API terms
_CLI_OPTION = {name: "--" + name.replace("_", "-") for name in (
    "overwrite", "low_gpu_mem_usage", "skip_bad_samples", "quant_nontext_module", "trust_remote_code", "batch_size",
    "gradient_accumulate_steps", "nsamples", "seqlen", "iters", "lr", "minmax_lr", "group_size", "bits", "seed",
    "layer_config", "resume_dir", "dataset", "device", "to_quant_block_names", "cache", "extra_data_dir", "template",
    "recipe", "format", "target", "dtype", "target_bits", "candidates", "fuse_groups", "rescore")}
_API_VALUE = re.compile(r"\b(" + "|".join(_CLI_OPTION) + r")=(\{.*?\}\}|\{[^}]*\}|'[^']*'|\"[^\"]*\"|[\w.:/-]+)")
_BARE = re.compile(r"\b(resume_dir|layer_config|extra_data_dir|to_quant_block_names|quant_nontext_module|target_bits)"
                   r"\b(?!=)")


def cli_terms(message: str) -> str:
    """A library message in the CLI's terms: `overwrite=True` -> `--overwrite`, `batch_size=4` ->
    `--batch-size 4`, `layer_config={...}` -> `--layer-config '{...}'`, `pass tokenizer=` -> the
    model directory's files."""
    def option(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        flag = _CLI_OPTION[name]
        if value == "True":
            return flag
        if value == "False":
            return "--asym" if name == "sym" else f"--no-{flag[2:]}"
        if value.startswith("{"):
            return f"{flag} '{value.replace(chr(39), chr(34))}'"
        return f"{flag} {value.strip(chr(39) + chr(34))}"

    message = _API_VALUE.sub(option, message)
    message = _BARE.sub(lambda m: _CLI_OPTION[m.group(1)], message)
    message = message.replace("pass tokenizer=", "the model directory needs its tokenizer files")
    return re.sub(r"pass processor= \(e\.g\. AutoProcessor\.from_pretrained\(path\)\)|pass processor=",
                  "the model directory needs its processor files (preprocessor_config.json)", message)


def _identity(path: Optional[Path]) -> Optional[tuple[int, int]]:
    try:
        st = Path(path).stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)


def _interrupted() -> str:
    """What Ctrl-C leaves on disk: a save is atomic, so the output is either the new checkpoint
    (the interrupt came after the rename) or what was there before."""
    out = _state.get("output")
    if out is None:
        return "interrupted; nothing was written"
    from signround.adapters.checkpoint.files import not_a_checkpoint

    now = _identity(out)
    if now is not None and now != _state.get("output_id") and not_a_checkpoint(out) is None:
        return f"interrupted after the save: {out} holds the complete new checkpoint"
    before = "is as it was" if _state.get("output_id") is not None else "was not created"
    return f"interrupted; nothing was written: {out} {before} (saves are atomic)"


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                      line: Any = None) -> None:
    text = " ".join(str(message).split())
    typer.secho(f"warning: {cli_terms(text)}", err=True, fg=typer.colors.YELLOW)


def user_errors(fn: F) -> F:
    """Turn library errors caused by the user's input into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            _fail(_interrupted(), 130)
        except USER_ERRORS as err:
            if _state["debug"]:
                raise
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            _fail(cli_terms(" ".join(str(msg).split())))

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    _state.update(debug=debug, output=None, output_id=None)
    if not debug:
        warnings.showwarning = _one_line_warning


# auto-round's option spellings (its 0.16 CLI) -> ours; others differ from ours only by "_" for "-"
MODEL = "<model>"
AUTO_ROUND_ALIASES = {
    "--model": MODEL, "--model_name": MODEL, "--model_name_or_path": MODEL, "--bit": "--bits",
    "--train_bs": "--batch-size", "--bs": "--batch-size", "--seq_len": "--seqlen", "--nsample": "--nsamples",
    "--device_map": "--device", "--devices": "--device", "--formats": "--format", "--iter": "--iters",
    "--model_dtype": "--dtype", "--ignore_layers": "--fp-layers", "--no-enable_minmax_tuning": "--disable-minmax-tuning",
    "--no-enable_quanted_input": "--disable-quanted-input", "--disable_trust_remote_code": "--no-trust-remote-code",
}
#: auto-round flags that ask for what signround does anyway (plain RTN, multimodal detection, low CPU memory)
AUTO_ROUND_NO_OPS = ("--disable_opt_rtn", "--mllm", "--low_cpu_mem_usage")


def auto_round_spellings(args: List[str], known: set[str]) -> List[str]:
    """`args` with auto-round's spellings rewritten to ours: `--group_size 32` -> `--group-size 32`,
    `--bs 4` -> `--batch-size 4`, `--model PATH` -> PATH, `--format a,b` -> `--format a --format b`."""
    out: List[str] = []
    model: List[str] = []
    it = iter(args)
    for arg in it:
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in AUTO_ROUND_NO_OPS:
            continue
        name = AUTO_ROUND_ALIASES.get(name, name)
        if name not in known and name != MODEL and name.replace("_", "-") in known:
            name = name.replace("_", "-")
        if name == MODEL:
            model.append(value if eq else next(it, ""))
            continue
        if name == "--format":
            raw = value if eq else next(it, "")
            for f in (x.strip() for x in raw.split(",")):
                if f:
                    out += ["--format", f]
            continue
        out.append(f"{name}={value}" if eq else name)
    return model + out


class AutoRoundSpellings(TyperCommand):
    """A command that also takes auto-round's spellings of its options (`auto_round_spellings`)."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        known = {o for p in self.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        return super().parse_args(ctx, auto_round_spellings(list(args), known))


AUTO_ROUND_EPILOG = ("auto-round's spellings work too: --model PATH, --output_dir, --group_size, --batch_size/--bs/"
                     "--train_bs, --seq_len, --nsample, --device_map, --format a,b, --layer_config (a file or JSON "
                     "text), --fp_layers/--ignore_layers, --scheme W4A16, --to_quant_block_names, --low_gpu_mem_usage, "
                     "--minmax_lr, --gradient_accumulate_steps, --disable_minmax_tuning, --disable_quanted_input, "
                     "--not_use_best_mse, --disable_amp, --quant_nontext_module, --extra_data_dir, --model_dtype, "
                     "--max_shard_size, --disable_trust_remote_code, …")
SCHEME = re.compile(r"W([2-8])A16(?:G(\d+))?", re.IGNORECASE)


def _modality_weights(text: Optional[str]) -> Optional[dict[str, float]]:
    """`image=0.5,text=1` → {"image": 0.5, "text": 1.0} (None when not given)."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"{part!r}: expected NAME=NUMBER, e.g. image=0.5,text=1",
                                     param_hint="--modality-weights")
    return out


@app.command()
def version() -> None:
    """Print the installed signround version."""
    from signround import __version__

    typer.echo(__version__)


@app.command(cls=AutoRoundSpellings, epilog=AUTO_ROUND_EPILOG)
@user_errors
def quantize(
    model_path: Path = typer.Argument(..., help="Local Hugging Face model directory (or --model PATH)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", "--output-dir", help="Where to write the checkpoint."),
    bits: Optional[int] = typer.Option(None, help="Weight bits, 2-8 (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Inputs per scale; -1 = per output channel (default 128)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Full-range symmetric (default) or asymmetric grid."),
    scheme: Optional[str] = typer.Option(None, help="auto-round scheme name: W4A16, W3A16, W2A16, W8A16, W2A16G64, "
                                         "… (sets bits and group size; --bits/--group-size win)."),
    data_type: str = typer.Option("int", help="Weight data type; int is the one there is."),
    recipe: str = typer.Option("default", help="Preset: default, light, best, rtn."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Tuning iterations per block (0 = RTN)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the rounding offsets (default 1/iters)."),
    minmax_lr: Optional[float] = typer.Option(None, help="Learning rate of the range scales (default lr)."),
    nsamples: Optional[int] = typer.Option(None, help="Calibration samples."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration sample."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per tuning step."),
    gradient_accumulate_steps: Optional[int] = typer.Option(None, help="Sub-batches per step."),
    seed: Optional[int] = typer.Option(None, help="Random seed (sample order, self-generated data)."),
    minmax_tuning: Optional[bool] = typer.Option(None, "--enable-minmax-tuning/--disable-minmax-tuning",
                                                 help="Tune the range scales too (default on)."),
    quanted_input: Optional[bool] = typer.Option(None, "--enable-quanted-input/--disable-quanted-input",
                                                 help="Feed each block the quantized chain's outputs (default on)."),
    not_use_best_mse: bool = typer.Option(False, "--not-use-best-mse", help="Keep the last iterate instead of the best."),
    disable_amp: bool = typer.Option(False, "--disable-amp", help="Tune in float32 on accelerators (no bf16 autocast)."),
    dataset: Optional[str] = typer.Option(None, help="Calibration data: a .json (llava or list of strings), .jsonl or "
                                          ".txt file; builtin (the default: built-in text corpus), embedded "
                                          "(built-in image-text), self (text sampled from the model, seeded)."),
    extra_data_dir: Optional[Path] = typer.Option(None, help="Directory the dataset's image paths resolve against."),
    template: Optional[str] = typer.Option(None, help="Chat template: preset name or JSON file (default: by model type)."),
    quant_nontext_module: bool = typer.Option(False, help="Also quantize vision blocks (needs image-text data)."),
    loss_weighting: Optional[str] = typer.Option(None, help="modality: weight image-token and text positions "
                                                 "apart in the text decoder's block loss (off by default; "
                                                 "image-text data)."),
    modality_weights: Optional[str] = typer.Option(None, help="Weights for --loss-weighting modality, e.g. "
                                                   "image=0.5,text=1 (the default)."),
    layer_config: Optional[str] = typer.Option(None, help="JSON file or JSON text: {layer name or regex: {bits, "
                                               "group_size, sym}}; every key must match a layer."),
    fp_layers: Optional[str] = typer.Option(None, help="Comma-separated layer names or regexes kept in full precision."),
    to_quant_block_names: Optional[str] = typer.Option(None, help="Comma-separated block lists to quantize (names "
                                                       "or regexes; default: discovered)."),
    quant_lm_head: bool = typer.Option(False, "--quant-lm-head", help="Also quantize lm_head (rounded to nearest; "
                                       "same as --layer-config '{\"lm_head\": {}}'; a tied lm_head is refused)."),
    nblocks: int = typer.Option(1, help="Blocks tuned together (1 is the one supported)."),
    scale_dtype: str = typer.Option("fp16", help="Scale dtype in the checkpoint (fp16 is the one written)."),
    device: Optional[str] = typer.Option(None, help="cuda, cuda:1, 0 (= cuda:0), xpu, hpu, cpu (default: best available)."),
    dtype: str = typer.Option("auto", help="Load dtype: auto, bfloat16, float16, float32."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code/--no-trust-remote-code",
                                           help="Run the model directory's own Python code to load it (off)."),
    low_gpu_mem_usage: bool = typer.Option(False, help="Less accelerator memory: calibration activations on the "
                                            "CPU, each step in sub-batches of at most 4096 tokens (same maths)."),
    cache: str = typer.Option("auto", help="Where calibration activations live: auto (pinned host memory on CUDA, "
                              "streamed ahead), device, host, disk (memory-mapped files in TMPDIR)."),
    stream_from_disk: bool = typer.Option(False, "--stream-from-disk", help="Read each block from the model's "
                                          "safetensors when its turn comes and write it out as it finishes: the model "
                                          "need not fit in RAM."),
    max_gpu_memory: Optional[str] = typer.Option(None, help="Accelerator memory budget (24GiB, 80GB, or auto): "
                                                 "settings that fit are chosen, or the run is refused before work."),
    max_cpu_memory: Optional[str] = typer.Option(None, help="CPU RAM budget (64GiB, or auto): may stream the model "
                                                 "from disk and put the cache on disk."),
    format: List[Format] = typer.Option([Format(DEFAULT_FORMAT)], "--format", help="Checkpoint format (repeatable, "
                                        "or a comma list)."),
    target: List[Target] = typer.Option([], "--target", help="Runtime that must load the checkpoint (repeatable): "
                                        "an unloadable plan fails before any work; vllm also aligns fused q/k/v "
                                        "and gate/up layers."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard."),
    skip_bad_samples: bool = typer.Option(False, help="Skip dataset samples with missing images instead of failing."),
    overwrite: bool = typer.Option(False, help="Replace a previous quantized checkpoint at the output (never other "
                                   "files)."),
    dry_run: bool = typer.Option(False, help="Run every check, print the plan and the settings, tune nothing "
                                 "(with --target-bits the search runs: it reads the calibration data)."),
    report_json: Optional[Path] = typer.Option(None, help="Also write the run report as JSON here."),
    resume_dir: Optional[Path] = typer.Option(None, help="Keep each finished block here; rerun with the same "
                                              "arguments to continue after a crash."),
    target_bits: Optional[float] = typer.Option(None, help="Mixed precision: choose each layer's grid among "
                                                "--candidates so the average stored bits per weight (scales and zero "
                                                "points counted, as `signround inspect` reports) is at most this, "
                                                "with the lowest estimated loss."),
    candidates: Optional[str] = typer.Option(None, help="Comma-separated grids for --target-bits (default "
                                             "W2G64,W3G64,W4G128,W8G128; W4G128asym for asym)."),
    fuse_groups: bool = typer.Option(True, "--fuse-groups/--no-fuse-groups", help="With --target-bits: q/k/v and "
                                     "gate/up (fused by vLLM) take one grid together (default on)."),
    rescore: Optional[int] = typer.Option(None, help="With --target-bits: score again this many rounds on the model "
                                          "with the last plan rounded to nearest, so 2-bit errors that compound "
                                          "through the blocks count (default 0: score the full-precision model "
                                          "only; each round costs one more scoring pass; measured worse after "
                                          "tuning on Gemma-3-270M, see spec/mixed-precision.md)."),
    plan_out: Optional[Path] = typer.Option(None, help="With --target-bits: write the chosen plan here as a "
                                            "layer_config JSON (edit it and pass it back with --layer-config)."),
) -> None:
    """Quantize MODEL_PATH and save the checkpoint.

    Every check that needs no model runs before it loads (paths, files, values), the rest before
    tuning; --dry-run runs exactly these checks."""
    from signround.adapters.checkpoint.files import clean_stale_temporaries, dir_lock
    from signround.adapters.engine.progress import print_plan, print_settings
    from signround.adapters.frontends import arguments as checks
    from signround.adapters.frontends.facade import build_quantizer
    from signround.adapters.hf.model_io import load_model, parse_dtype
    from signround.rounding import QuantSpec
    from signround.templating import load_dataset, load_template

    if output is None and not dry_run:
        raise ValueError("--output is required (where to write the checkpoint), unless --dry-run")
    if scheme is not None:
        m = SCHEME.fullmatch(scheme.strip())
        if m is None:
            raise ValueError(f"--scheme {scheme!r}: signround quantizes weights to int (W2A16 … W8A16, optionally "
                             "with G32/G64/G128); activation, fp8 and mx schemes are not supported")
        bits = int(m.group(1)) if bits is None else bits
        group_size = int(m.group(2) or 128) if group_size is None else group_size
    if data_type.lower() not in ("int", "int_sym", "int_asym"):
        raise ValueError(f"--data-type {data_type!r}: signround quantizes weights to int only")
    if nblocks != 1:
        raise ValueError(f"--nblocks {nblocks}: signround tunes one block at a time (--nblocks 1)")
    if scale_dtype.lower() not in ("fp16", "float16"):
        raise ValueError(f"--scale-dtype {scale_dtype!r}: checkpoints store fp16 scales (--scale-dtype fp16)")
    spec = QuantSpec(bits=4 if bits is None else bits, group_size=128 if group_size is None else group_size, sym=sym)
    overrides = {k: v for k, v in dict(iters=iters, lr=lr, minmax_lr=minmax_lr, nsamples=nsamples, seqlen=seqlen,
                                        batch_size=batch_size, gradient_accumulate_steps=gradient_accumulate_steps,
                                        seed=seed, enable_minmax_tuning=minmax_tuning,
                                        enable_quanted_input=quanted_input, use_best=False if not_use_best_mse else None,
                                        amp=False if disable_amp else None).items() if v is not None}
    checks.resolve_recipe(recipe, **overrides)
    checks.check_device(device)
    load_dtype = parse_dtype(dtype)
    formats = list(dict.fromkeys(f.value for f in format))
    # -- before the model loads: its files, the inputs, the output --------------------------------
    checks.check_model_dir(model_path)
    layers = checks.read_layer_config(layer_config) if layer_config else {}
    if fp_layers:
        layers = {**{name.strip(): {"bits": 16} for name in fp_layers.split(",") if name.strip()}, **layers}
    if quant_lm_head:
        layers.setdefault("lm_head", {})
    data = load_dataset(dataset, extra_data_dir=extra_data_dir, skip_bad_samples=skip_bad_samples) if dataset else None
    tmpl = load_template(template) if template else None
    if extra_data_dir is not None and not extra_data_dir.is_dir():
        raise FileNotFoundError(f"--extra-data-dir {str(extra_data_dir)!r} is not a directory")
    inputs = [Path(p) for p in (dataset, layer_config, template) if p and Path(p).exists()]
    inputs += [p for p in (extra_data_dir, resume_dir) if p is not None]
    if resume_dir is not None:
        checks.check_resume_dir(resume_dir, output=output)
    if output is not None:
        checks.check_output_dir(output, overwrite=overwrite, protect=[model_path], inputs=inputs)
    if report_json is not None:
        checks.check_report_path(report_json)
    if plan_out is not None:
        if target_bits is None:
            raise ValueError("--plan-out writes the plan --target-bits chooses: pass --target-bits too")
        if plan_out.is_dir():
            raise IsADirectoryError(f"--plan-out {str(plan_out)!r} is a directory; give a file path such as plan.json")
        if output is not None and (plan_out.resolve() == output.resolve() or output.resolve() in plan_out.resolve().parents):
            raise ValueError(f"--plan-out {str(plan_out)!r} lies in the output {str(output)!r}, which the save replaces "
                             "whole; write the plan elsewhere")
        checks.check_creatable(plan_out, "--plan-out")
    from signround.adapters.engine import env as signround_env

    with contextlib.ExitStack() as held:
        # A second run on the same output or resume store stops here. Under torchrun only rank 0
        # writes, so only rank 0 holds the locks (the other ranks of this run would find them held).
        if not dry_run and signround_env.read().rank == 0:
            assert output is not None
            held.enter_context(dir_lock(output))
            clean_stale_temporaries(output)
            if resume_dir is not None:
                held.enter_context(dir_lock(resume_dir, "resume_dir"))
        if trust_remote_code:
            typer.secho(f"warning: --trust-remote-code: loading {model_path} runs the Python code in that directory "
                        "with your permissions; use it only for a model you trust", err=True, fg=typer.colors.YELLOW)
        loaded = load_model(model_path, dtype=load_dtype, trust_remote_code=trust_remote_code,
                            stream=stream_from_disk or max_cpu_memory is not None)  # a skeleton: blocks stay on disk
        # -- the loaded model: layer_config keys, what is left to quantize, the weights -----------
        quantizer = build_quantizer(
            loaded, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, recipe=recipe, dataset=data,
            extra_data_dir=extra_data_dir, template=tmpl, quant_nontext_module=quant_nontext_module,
            loss_weighting=loss_weighting, modality_weights=_modality_weights(modality_weights),
            layer_config=layers or None, to_quant_block_names=to_quant_block_names, device=device,
            low_gpu_mem_usage=low_gpu_mem_usage, cache=cache, skip_bad_samples=skip_bad_samples,
            resume_dir=resume_dir, target=[t.value for t in target], format=formats, stream_from_disk=stream_from_disk,
            max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, target_bits=target_bits,
            candidates=candidates, fuse_groups=fuse_groups, rescore=rescore, **overrides)
        mixed_plan = quantizer.mixed_plan() if target_bits is not None else None  # scores and solves; tunes nothing
        if mixed_plan is not None:
            typer.echo("\n".join(mixed_plan.describe()))
            if plan_out is not None:
                plan_out.parent.mkdir(parents=True, exist_ok=True)
                plan_out.write_bytes(mixed_plan.to_json())
                typer.echo(f"plan written to {plan_out} (pass it back with --layer-config {plan_out})")
        if dry_run:
            print_plan(quantizer.plan())
            print_settings(quantizer.settings())
            typer.echo("\n".join(quantizer.memory_plan().describe()))
            typer.echo("dry run: every check passed; nothing was tuned or written")
            return
        assert output is not None
        if quantizer.config.stream:  # blocks are written as they finish
            _state.update(output=output.resolve(), output_id=_identity(output))
            paths = quantizer.quantize_and_save(output, format=formats if len(formats) > 1 else formats[0],
                                                overwrite=overwrite, max_shard_size=max_shard_size)
            report = quantizer.report
        else:
            report = quantizer.quantize()
            _state.update(output=output.resolve(), output_id=_identity(output))
            paths = quantizer.save_quantized(output, format=formats if len(formats) > 1 else formats[0],
                                             overwrite=overwrite, max_shard_size=max_shard_size)
        _state.update(output=None)
        if report_json is not None:
            report_json.parent.mkdir(parents=True, exist_ok=True)
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
    seqlen: int = typer.Option(512, min=1, help="Perplexity window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, min=1, help="Evaluate at most this many windows."),
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


@app.command("gguf-mix")
@user_errors
def gguf_mix(
    model: Path = typer.Argument(..., help="A model directory (config.json; no weights are read)."),
    format: Format = typer.Option(..., "--format", help="A k-quant GGUF format: gguf:q2_k_s, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s or q5_k_m."),
) -> None:
    """llama.cpp's layer mix for a k-quant GGUF format as --layer-config JSON (which layers take Q6_K / Q4_K;
    spec/format.md, "GGUF")."""
    import json

    from signround.adapters.checkpoint.gguf import llama_cpp_mix
    from signround.adapters.hf.streaming import skeleton

    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model}: not a model directory (no config.json)")
    typer.echo(json.dumps(llama_cpp_mix(format.value, skeleton(model)), indent=1))


@app.command()
@user_errors
def demo(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Keep the demo checkpoint here (default: a temp dir)."),
    iters: Optional[int] = typer.Option(None, help="Tuning iterations per block (default 20: about three minutes "
                                        "on 2 CPU cores)."),
    bits: Optional[int] = typer.Option(None, help="Weight bits (default 3, where plain rounding visibly breaks)."),
    group_size: int = typer.Option(64, help="Group size (SmolLM2's width 576 is not a multiple of 128)."),
) -> None:
    """Quantize a small SmolVLM-shaped model end to end on built-in data; print full precision, RTN and
    SignRound side by side."""
    from signround.adapters.frontends.demo import DEMO_BITS, DEMO_ITERS, run_demo

    run_demo(output=output, iters=DEMO_ITERS if iters is None else iters, bits=DEMO_BITS if bits is None else bits,
             group_size=group_size)


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
    low_gpu_mem_usage: bool = typer.Option(False, help="Ours: cache on the CPU, steps in sub-batches of ≤ 4096 tokens."),
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
