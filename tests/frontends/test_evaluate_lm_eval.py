"""The optional lm-eval bridge: a local task file over local JSON data, run on both models by
`signround eval --lm-eval-tasks` (skipped when lm-eval is not installed; it is an extra, not a test
dependency: it brings ~40 packages, scipy and scikit-learn among them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from signround.adapters.frontends import evaluate
from signround.cli import app

runner = CliRunner()

TASK = """task: signround_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
DOCS = [{"question": "Is fire hot?", "choices": ["yes", "no"], "answer": 0},
        {"question": "Is ice hot?", "choices": ["yes", "no"], "answer": 1},
        {"question": "Two plus two is", "choices": ["four", "five", "six"], "answer": 0}]


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    import torch
    from _templating_helpers import byte_tokenizer
    from checkpoint_helpers import rtn_state
    from tiny_models import tiny_text_model

    from signround.adapters.checkpoint.export import save_quantized
    from signround.rounding import QuantSpec

    torch.manual_seed(0)
    tok = byte_tokenizer([])
    model = tiny_text_model("llama", vocab_size=len(tok))
    fp = tmp_path / "fp"
    model.save_pretrained(fp)
    tok.save_pretrained(fp)
    q = save_quantized(model, rtn_state(model, QuantSpec(4, 32, True)), tmp_path / "q", inplace=False, tokenizer=tok)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.json").write_text(json.dumps(DOCS))
    (tasks / "local_mc.yaml").write_text(TASK.format(data=tasks / "docs.json"))
    return fp, q, tasks


def test_missing_lm_eval_is_one_clear_error(dirs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fp, _, tasks = dirs
    monkeypatch.setattr(evaluate, "lm_eval_available", lambda: False)
    res = runner.invoke(app, ["eval", str(fp), "--lm-eval-tasks", "signround_local_mc", "--lm-eval-include", str(tasks)])
    assert res.exit_code == 2 and "pip install 'signround[lm-eval]'" in res.output


@pytest.mark.slow
def test_local_task_on_both_models(dirs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fp, q, tasks = dirs
    res = runner.invoke(app, ["eval", str(fp), "--quantized", str(q), "--lm-eval-tasks", "signround_local_mc",
                              "--lm-eval-include", str(tasks), "--seqlen", "32", "--max-windows", "1", "--no-progress",
                              "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    for r in rows:
        scores = r["lm_eval"]["signround_local_mc"]
        assert scores["sample_len"] == 3 and scores["acc"] in (0, 1 / 3, 2 / 3, 1)
        assert r["seconds"]["lm_eval"] > 0
    # the bridge on the in-memory original gives the CLI's numbers (nothing else was scored)
    from signround.adapters.hf.model_io import load_model

    loaded = load_model(fp)
    direct = evaluate.lm_eval_scores(loaded.model, loaded.tokenizer, ["signround_local_mc"], include_path=tasks)
    assert direct == rows[0]["lm_eval"]
    with pytest.raises(ValueError, match="does not know task"):
        evaluate.lm_eval_scores(loaded.model, loaded.tokenizer, ["no_such_task_here"], include_path=tasks)
