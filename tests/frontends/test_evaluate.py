"""`signround eval`: question-answer accuracy on a local llava-style set, one table / JSON for every
number, the progress display, and the scoring rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from signround.adapters.frontends.evaluate import (Generations, Progress, QASample, normalize_answer, perplexity,
                                                   print_comparison, qa_records, qa_summary, score_answer)
from signround.cli import app

runner = CliRunner()


# ------------------------------------------------------------------ scoring


@pytest.mark.parametrize(("prediction", "reference", "exact", "contains"), [
    ("Red.", "red", True, True),
    ("The red circle", "red circle", True, True),
    ("It is a red circle.", "red circle", False, True),
    ("reddish", "red", False, False),  # whole words only
    ("blue", "red", False, False),
    ("", "", False, False),  # an empty reference never matches
])
def test_score_answer(prediction: str, reference: str, exact: bool, contains: bool) -> None:
    assert score_answer(prediction, reference) == {"exact": exact, "contains": contains}


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Big, RED   circle!! ") == "big red circle"


def test_summary_and_records_agree() -> None:
    samples = [QASample(str(i), f"q{i}", ref, "prompt") for i, ref in enumerate(["red", "two", "a square"])]
    original = Generations(("Red", "2", "square"), 6, 2.0)
    quant = Generations(("red", "two apples", "circle"), 9, 3.0)
    s = qa_summary(samples, quant, original)
    assert s["qa_samples"] == 3 and s["qa_exact_match"] == pytest.approx(1 / 3)
    assert s["qa_contains"] == pytest.approx(2 / 3) and s["qa_agreement"] == pytest.approx(1 / 3)
    assert s["qa_tokens_per_s"] == pytest.approx(3.0)
    recs = qa_records(samples, {"original": original, "quantized": quant})
    assert recs[1] == {"id": "1", "question": "q1", "reference": "two", "images": [],
                       "original": {"answer": "2", "exact": False, "contains": False},
                       "quantized": {"answer": "two apples", "exact": False, "contains": True}}
    assert sum(r["quantized"]["exact"] for r in recs) / 3 == s["qa_exact_match"]


def test_progress_shows_an_eta() -> None:
    from rich.console import Console

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(16, 16)

        def forward(self, input_ids, use_cache=False):  # type: ignore[no-untyped-def]
            return type("Out", (), {"logits": self.emb(input_ids)})()

    buf = io.StringIO()
    bar = Progress(console=Console(file=buf, force_terminal=True, width=120))
    with bar:
        ppl = perplexity(Tiny(), torch.randint(0, 16, (200,)), seqlen=10, batch_size=2, progress=bar,
                         description="ppl windows")
    assert ppl > 1
    out = buf.getvalue()
    assert "ppl windows" in out and "10/10" in out and "eta" in out


def test_table_has_every_metric() -> None:
    from rich.console import Console

    rows = [{"model": "fp", "perplexity": 10.0, "qa_exact_match": 0.5, "qa_contains": 0.75,
             "lm_eval": {"t": {"acc": 0.5, "acc_stderr": 0.1}}},
            {"model": "q", "perplexity": 11.0, "qa_exact_match": 0.25, "qa_contains": 0.5, "qa_agreement": 0.5,
             "lm_eval": {"t": {"acc": 0.25, "acc_stderr": 0.1}}, "kernels": {"int4_cpu": 14}}]
    buf = io.StringIO()
    print_comparison(rows, console=Console(file=buf, width=200))
    out = buf.getvalue()
    for needle in ("QA exact", "QA contains", "QA = original", "t acc", "+10.0%", "25.0%", "int4_cpu × 14", "0.2500"):
        assert needle in out, needle
    assert "acc_stderr" not in out


# ------------------------------------------------------------------ end to end on a tiny LLaVA


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from checkpoint_helpers import rtn_state
    from vlm_helpers import llava_parts

    from signround.adapters.checkpoint.export import save_quantized
    from signround.rounding import QuantSpec

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("qa")
    tok, proc, model = llava_parts()
    fp = root / "fp"
    model.save_pretrained(fp)
    tok.save_pretrained(fp)
    proc.save_pretrained(fp)
    small = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[0] % 32]
    results = rtn_state(model, QuantSpec(4, 32, True), blocks=["model.language_model.layers"], skip=small)
    assert results
    q = save_quantized(model, results, root / "q", inplace=False, tokenizer=tok, processor=proc)
    for name, color in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))):
        Image.new("RGB", (32, 32), color).save(root / name)
    data = [
        {"id": "img-red", "image": "red.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]},
        {"id": "img-blue", "image": "blue.png",
         "conversations": [{"from": "human", "value": "What color is this?\n<image>"}, {"from": "gpt", "value": "blue"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    ]
    (root / "qa.json").write_text(json.dumps(data))
    return fp, q, root


def _eval(fp: Path, q: Path, qa: Path, out: Path, *extra: str) -> list[dict]:
    res = runner.invoke(app, ["eval", str(fp), "--quantized", str(q), "--qa", str(qa), "--qa-out", str(out),
                              "--max-new-tokens", "6", "--seqlen", "32", "--max-windows", "2", "--no-progress",
                              "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_qa_before_after_end_to_end(llava_dirs: tuple[Path, Path, Path]) -> None:
    fp, q, root = llava_dirs
    rows = _eval(fp, q, root / "qa.json", root / "answers.json", "--image-text", str(root / "qa.json"))
    original, quant = rows
    for r in rows:
        assert r["qa_samples"] == 3 and r["perplexity"] > 1 and r["image_text_loss"] > 0
        assert 0 <= r["qa_exact_match"] <= r["qa_contains"] <= 1
        assert r["qa_new_tokens"] > 0 and r["seconds"]["qa"] > 0
    assert "qa_agreement" not in original and 0 <= quant["qa_agreement"] <= 1
    assert quant["kernels"] == {"dequant": 5}  # float32 on the CPU: the reference
    recs = json.loads((root / "answers.json").read_text())
    assert [r["id"] for r in recs] == ["img-red", "img-blue", "text"]
    assert recs[0]["images"][0].endswith("red.png")
    assert sum(r["quantized"]["exact"] for r in recs) / 3 == quant["qa_exact_match"]
    # the original's own answers as references: it must score exact on each (deterministic greedy decoding,
    # same prompts), so the scores read what was generated for the right sample
    data = json.loads((root / "qa.json").read_text())
    keep = []
    for rec, r in zip(data, recs):
        if normalize_answer(r["original"]["answer"]):
            rec["conversations"][-1]["value"] = r["original"]["answer"]
            keep.append(rec)
    assert keep, "the tiny model answered nothing but punctuation"
    (root / "qa_self.json").write_text(json.dumps(keep))
    rows = _eval(fp, q, root / "qa_self.json", root / "answers_self.json")
    assert rows[0]["qa_exact_match"] == 1.0 and rows[0]["qa_samples"] == len(keep)
    assert rows[1]["qa_exact_match"] == rows[1]["qa_agreement"]


def test_qa_set_needs_reference_answers(llava_dirs: tuple[Path, Path, Path]) -> None:
    fp, _, root = llava_dirs
    bad = root / "no_answer.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "hi"}]}]))
    res = runner.invoke(app, ["eval", str(fp), "--qa", str(bad), "--no-progress"])
    assert res.exit_code == 2 and "sample 'x'" in res.output and "reference answer" in res.output
    res = runner.invoke(app, ["eval", str(fp), "--qa-out", str(root / "x.json")])
    assert res.exit_code == 2 and "--qa-out needs --qa" in res.output


def test_eval_kernel_choice_is_checked(llava_dirs: tuple[Path, Path, Path]) -> None:
    fp, q, _ = llava_dirs
    res = runner.invoke(app, ["eval", str(fp), "--quantized", str(q), "--kernel", "fastest", "--no-progress"])
    assert res.exit_code == 2 and "unknown kernel 'fastest'" in res.output
