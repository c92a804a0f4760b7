"""Before/after evaluation of a model and its quantized checkpoint.

- perplexity on text, in non-overlapping windows;
- next-token loss on image-text conversations;
- generation accuracy on a local image-question-answer set (llava-style JSON: the last assistant
  turn of each record is the reference answer): exact match and contains, after `normalize_answer`,
  plus the quantized model's agreement with the original's answers; every sample kept for a JSON file;
- optionally, `lm-eval` tasks run on the loaded models (`pip install signround[lm-eval]`; local task
  files through `include_path`).

Long loops show a progress bar with an ETA on stderr (stdout stays clean for `--json`).
"""

from __future__ import annotations

import math
import os
import re
import string
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import attrs
import torch
from torch import Tensor


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _dtype_of(model: Any) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


# ----------------------------------------------------------------------------------------- progress


class Progress:
    """A rich progress display on stderr (bar, done/total, elapsed, ETA), or nothing when disabled."""

    def __init__(self, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled
        self._bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console or Console(stderr=True),
                            transient=console is None)

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def track(self, items: Iterable[Any], total: int, description: str) -> Iterator[Any]:
        if self._bar is None:
            yield from items
            return
        task = self._bar.add_task(description, total=total)
        for item in items:
            yield item
            self._bar.advance(task)


QUIET = Progress(False)


# ----------------------------------------------------------------------------------------- losses


def _token_nll(logits: Tensor, labels: Tensor, mask: Optional[Tensor]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            reduction="none").reshape(target.shape)
    if mask is not None:
        m = mask[:, 1:].to(nll.dtype)
        return float((nll * m).sum()), int(m.sum())
    return float(nll.sum()), target.numel()


def _windows(token_ids: Tensor, seqlen: int, max_windows: Optional[int]) -> Tensor:
    if token_ids.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(token_ids.shape)}")
    n = token_ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of "
                         f"{seqlen}; give a longer text or a smaller seqlen")
    return token_ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def perplexity(model: Any, token_ids: Tensor, *, seqlen: int = 512, max_windows: Optional[int] = None,
               batch_size: int = 4, progress: Progress = QUIET, description: str = "perplexity") -> float:
    """Perplexity of `model` on a 1-D tensor of token ids, in non-overlapping windows of `seqlen`."""
    windows = _windows(token_ids, seqlen, max_windows)
    device = _device_of(model)
    total, count = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in progress.track(starts, len(starts), description):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        s, c = _token_nll(logits, ids, None)
        total, count = total + s, count + c
    return math.exp(total / count)


def _to_model(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()
            if isinstance(v, Tensor)}


@torch.no_grad()
def multimodal_loss(model: Any, batches: Iterable[Mapping[str, Tensor]], *, progress: Progress = QUIET,
                    description: str = "image-text loss") -> float:
    """Mean next-token loss over image-text batches (padding excluded via attention_mask)."""
    device, dtype = _device_of(model), _dtype_of(model)
    batches = list(batches)
    total, count = 0.0, 0
    for batch in progress.track(batches, len(batches), description):
        inputs = _to_model(batch, device, dtype)
        logits = model(**inputs, use_cache=False).logits
        s, c = _token_nll(logits, inputs["input_ids"], inputs.get("attention_mask"))
        total, count = total + s, count + c
    if count == 0:
        raise ValueError("no tokens to evaluate: the image-text set is empty")
    return total / count


# ----------------------------------------------------------------------------------------- question answering


@attrs.frozen
class QASample:
    """One question with its reference answer: `prompt` is the conversation up to the answer, rendered
    with the generation prompt; `images` are the sample's image sources."""

    id: str
    question: str
    reference: str
    prompt: str
    images: tuple[Any, ...] = ()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed:
    ``"The Red circle."`` → ``"red circle"``."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def score_answer(prediction: str, reference: str) -> dict[str, bool]:
    """exact: the normalised prediction equals the normalised reference; contains: the normalised
    reference occurs in the normalised prediction as whole words (an empty reference never matches)."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    return {"exact": bool(r) and p == r, "contains": bool(r) and f" {r} " in f" {p} "}


def _generation_prompt(template: Any, turns: Sequence[Any], tokenizer: Any, processor: Any) -> str:
    """The conversation rendered up to where the answer starts (the chat-template choice of
    `templating.encode_conversation`, with a generation prompt instead of a final message)."""
    from signround.templating import PLACEHOLDER, render

    if not template.extra_encode:
        owner = tokenizer if getattr(tokenizer, "chat_template", None) else processor
        if getattr(owner, "chat_template", None):
            msgs = [{"role": t.role if t.role in ("system", "user", "assistant") else "user", "content": t.content}
                    for t in turns]
            return owner.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return render(template, turns) + template.format_assistant.split(PLACEHOLDER, 1)[0]


def qa_samples(dataset: Any, template: Any, *, tokenizer: Any, processor: Any) -> list[QASample]:
    """Question-answer samples of a `ConversationDataset` whose records end with an assistant turn."""
    from signround.templating import DatasetError

    out = []
    for s in dataset.samples:
        if not s.turns or s.turns[-1].role != "assistant" or len(s.turns) < 2:
            raise DatasetError(f"{dataset.source}: sample {s.id!r}: a question-answer record must end with the "
                               "reference answer (an assistant/gpt turn after the question)")
        question = next((t.content for t in reversed(s.turns[:-1]) if t.role == "user"), "")
        prompt = _generation_prompt(template, s.turns[:-1], tokenizer, processor)
        out.append(QASample(s.id, question.replace("<image>", "").strip(), s.turns[-1].content, prompt, s.images))
    return out


@attrs.frozen
class Generations:
    """What one model answered, with the time and tokens it took."""

    answers: tuple[str, ...]
    new_tokens: int
    seconds: float


@torch.no_grad()
def generate_answers(model: Any, samples: Sequence[QASample], *, tokenizer: Any, processor: Any,
                     processor_name: str, max_new_tokens: int = 32, progress: Progress = QUIET,
                     description: str = "answers") -> Generations:
    """Greedy answers, one sample at a time (no padding to confound the comparison)."""
    from signround.templating import get_processor, open_image

    proc = get_processor(processor_name)
    device, dtype = _device_of(model), _dtype_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers, new_tokens, t0 = [], 0, time.perf_counter()
    for s in progress.track(samples, len(samples), description):
        images = [open_image(img) for img in s.images]
        enc = proc(s.prompt, images, tokenizer=tokenizer, processor=processor, seqlen=None, truncation=False,
                   max_pixels=_max_pixels())
        inputs = _to_model(enc, device, dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[0, inputs["input_ids"].shape[1]:]
        new_tokens += int(new.numel())
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return Generations(tuple(answers), new_tokens, time.perf_counter() - t0)


def _max_pixels() -> int:
    from signround.templating import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS


def qa_summary(samples: Sequence[QASample], gen: Generations, original: Optional[Generations] = None) -> dict[str, Any]:
    """exact-match and contains rates (and agreement with the original model's answers)."""
    scores = [score_answer(a, s.reference) for a, s in zip(gen.answers, samples)]
    n = len(scores)
    out: dict[str, Any] = {"qa_samples": n, "qa_exact_match": sum(s["exact"] for s in scores) / n,
                           "qa_contains": sum(s["contains"] for s in scores) / n,
                           "qa_new_tokens": gen.new_tokens, "qa_seconds": gen.seconds,
                           "qa_tokens_per_s": gen.new_tokens / gen.seconds if gen.seconds > 0 else None}
    if original is not None:
        out["qa_agreement"] = sum(normalize_answer(a) == normalize_answer(b)
                                  for a, b in zip(gen.answers, original.answers)) / n
    return out


def qa_records(samples: Sequence[QASample], generations: Mapping[str, Generations]) -> list[dict[str, Any]]:
    """One JSON record per sample: id, question, reference, and per model its answer and scores."""
    out = []
    for i, s in enumerate(samples):
        rec: dict[str, Any] = {"id": s.id, "question": s.question, "reference": s.reference,
                               "images": [str(img) for img in s.images if isinstance(img, (str, os.PathLike))]}
        for name, gen in generations.items():
            rec[name] = {"answer": gen.answers[i], **score_answer(gen.answers[i], s.reference)}
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------- lm-eval


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_scores(model: Any, tokenizer: Any, tasks: Sequence[str], *, include_path: Optional[Any] = None,
                   limit: Optional[float] = None, batch_size: int = 1) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on an already loaded model: {task: {metric: value}} (lm-eval's "none" filter
    name dropped: ``acc,none`` → ``acc``). include_path: a folder of local task YAML files."""
    if not lm_eval_available():
        raise ValueError("the lm-eval bridge needs the lm-eval package: pip install 'signround[lm-eval]'")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device_of(model)))
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval does not know task(s) {unknown}" +
                         ("" if include_path else "; pass the folder of your task YAML files as include_path"))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        scores[task] = {k.removesuffix(",none"): float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return scores


# ----------------------------------------------------------------------------------------- before / after


def _text_ids(tokenizer: Any, text: Optional[Any]) -> Tensor:
    from pathlib import Path

    from signround.templating.heldout import HELDOUT_TEXT

    if text is None:
        body = HELDOUT_TEXT
    else:
        p = Path(text)
        if not p.is_file():
            raise FileNotFoundError(f"evaluation text {str(p)!r} does not exist")
        body = p.read_text(encoding="utf-8", errors="replace")
    return torch.tensor(tokenizer(body)["input_ids"], dtype=torch.long)


def _image_text_batches(data: Any, template: Any, tokenizer: Any, processor: Any) -> list[dict[str, Tensor]]:
    from signround.templating import conversation_calibration
    from signround.templating.calibration import calibration_batches

    if processor is None:
        raise ValueError("image-text evaluation needs the model's processor, and none could be loaded from the model "
                         "directory (save it there with processor.save_pretrained)")
    calib = conversation_calibration(data, template, tokenizer=tokenizer, processor=processor, seqlen=None,
                                     truncation=False, nsamples=len(getattr(data, "samples", ())) or 1, seed=0)
    return calibration_batches(calib.samples, 1, pad_token_id=tokenizer.pad_token_id or 0, flat_keys=calib.flat_keys)


@attrs.frozen
class Evaluation:
    """rows: one dict of numbers per model (original first); qa: the per-sample records (empty without a
    question-answer set)."""

    rows: list[dict[str, Any]]
    qa: list[dict[str, Any]] = attrs.field(factory=list)


def evaluate_models(model_path: Any, quantized: Optional[Any] = None, *, text: Optional[Any] = None,
                    image_text: Optional[Any] = None, qa: Optional[Any] = None, extra_data_dir: Optional[Any] = None,
                    template: Optional[Any] = None, seqlen: int = 512, max_windows: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None, max_new_tokens: int = 32, max_qa: Optional[int] = None,
                    lm_eval_tasks: Sequence[str] = (), lm_eval_include: Optional[Any] = None,
                    lm_eval_limit: Optional[float] = None, kernel: str = "auto", progress: bool | Progress = False,
                    device: Optional[str] = None) -> Evaluation:
    """Every number for the model at `model_path` and, when given, its quantized checkpoint, evaluated
    one after the other on the same data (the original is freed before the checkpoint is loaded)."""
    from signround.adapters.checkpoint.kernels import check_kernel_name, model_report
    from signround.adapters.checkpoint.loader import load_quantized
    from signround.adapters.hf.model_io import load_model
    from signround.templating import load_dataset, load_template

    check_kernel_name(kernel)
    if lm_eval_tasks and not lm_eval_available():
        raise ValueError("--lm-eval-tasks needs the lm-eval package: pip install 'signround[lm-eval]'")
    bar = progress if isinstance(progress, Progress) else Progress(progress)
    t0 = time.perf_counter()
    loaded = load_model(model_path, dtype=dtype)
    model = loaded.model.to(device) if device else loaded.model
    tokenizer, processor = loaded.tokenizer, loaded.processor
    load_seconds = time.perf_counter() - t0
    tmpl = load_template(template, getattr(model.config, "model_type", None))
    ids = _text_ids(tokenizer, text)
    batches = None
    if image_text is not None:
        batches = _image_text_batches(load_dataset(image_text, extra_data_dir=extra_data_dir), tmpl, tokenizer,
                                      processor)
    samples: list[QASample] = []
    if qa is not None:
        samples = qa_samples(load_dataset(qa, extra_data_dir=extra_data_dir), tmpl, tokenizer=tokenizer,
                             processor=processor)[:max_qa]
    generations: dict[str, Generations] = {}

    def row(name: str, key: str, m: Any, seconds_load: float) -> dict[str, Any]:
        timings = {"load": seconds_load}
        out: dict[str, Any] = {"model": name, "dtype": str(_dtype_of(m)).removeprefix("torch."),
                               "device": str(_device_of(m))}
        t = time.perf_counter()
        out["perplexity"] = perplexity(m, ids, seqlen=seqlen, max_windows=max_windows, progress=bar,
                                       description=f"{key}: perplexity")
        out["perplexity_windows"] = int(_windows(ids, seqlen, max_windows).shape[0])
        out["perplexity_seqlen"] = seqlen
        timings["perplexity"] = time.perf_counter() - t
        if batches is not None:
            t = time.perf_counter()
            out["image_text_loss"] = multimodal_loss(m, batches, progress=bar, description=f"{key}: image-text loss")
            out["image_text_samples"] = len(batches)
            timings["image_text"] = time.perf_counter() - t
        if samples:
            gen = generate_answers(m, samples, tokenizer=tokenizer, processor=processor, processor_name=tmpl.processor,
                                   max_new_tokens=max_new_tokens, progress=bar, description=f"{key}: answers")
            generations[key] = gen
            out.update(qa_summary(samples, gen, generations.get("original") if key != "original" else None))
            timings["qa"] = gen.seconds
        if lm_eval_tasks:
            t = time.perf_counter()
            out["lm_eval"] = lm_eval_scores(m, tokenizer, lm_eval_tasks, include_path=lm_eval_include,
                                            limit=lm_eval_limit)
            timings["lm_eval"] = time.perf_counter() - t
        out["seconds"] = timings
        return out

    with bar:
        rows = [row(f"{model_path} (original)", "original", model, load_seconds)]
        if quantized is not None:
            del model, loaded
            t = time.perf_counter()
            qmodel = load_quantized(quantized, dtype=dtype, cache_weights=True, kernel=kernel,
                                    device=device or "cpu")
            qrow = row(f"{quantized} (quantized)", "quantized", qmodel, time.perf_counter() - t)
            qrow["kernels"] = model_report(qmodel).counts
            rows.append(qrow)
    return Evaluation(rows, qa_records(samples, generations) if samples else [])


def compare_models(model_path: Any, quantized: Optional[Any] = None, **kwargs: Any) -> list[dict[str, Any]]:
    """The rows of `evaluate_models` (perplexity and the other numbers, original first)."""
    return evaluate_models(model_path, quantized, **kwargs).rows


_COLUMNS = (("perplexity", "perplexity", "{:.3f}", True), ("image_text_loss", "image-text loss", "{:.4f}", True),
            ("qa_exact_match", "QA exact", "{:.1%}", False), ("qa_contains", "QA contains", "{:.1%}", False),
            ("qa_agreement", "QA = original", "{:.1%}", False), ("qa_tokens_per_s", "gen tok/s", "{:.1f}", False))


def print_comparison(rows: list[dict[str, Any]], console: Any = None) -> None:
    """One table: a row per model, every metric side by side (relative change against the original for
    perplexity and loss), lm-eval metrics as extra columns, and the quantized model's kernels."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("model")
    cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lm_cols = sorted({(t, m) for r in rows for t, ms in r.get("lm_eval", {}).items() for m in ms
                      if not m.endswith("_stderr")})
    for _, title, _, _ in cols:
        table.add_column(title)
    for task, metric in lm_cols:
        table.add_column(f"{task} {metric}")
    has_kernels = any("kernels" in r for r in rows)
    if has_kernels:
        table.add_column("kernels")
    base = rows[0] if rows else {}
    for r in rows:
        cells = [r["model"]]
        for key, _, fmt, relative in cols:
            v = r.get(key)
            cell = "-" if v is None else fmt.format(v)
            if relative and v is not None and r is not base and base.get(key):
                cell += f" ({(v / base[key] - 1) * 100:+.1f}%)"
            cells.append(cell)
        for task, metric in lm_cols:
            v = r.get("lm_eval", {}).get(task, {}).get(metric)
            cells.append("-" if v is None else f"{v:.4f}")
        if has_kernels:
            cells.append(", ".join(f"{k} × {n}" for k, n in r.get("kernels", {}).items()) or "-")
        table.add_row(*cells)
    (console or Console()).print(table)
