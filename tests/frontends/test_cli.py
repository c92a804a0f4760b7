"""The `signround` command: Typer's CliRunner for behaviour, a subprocess for `python -m signround`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from _templating_helpers import byte_tokenizer
from signround.cli import app
from tiny_models import tiny_text_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer([])
    model = tiny_text_model("llama", vocab_size=len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_quantize_inspect_and_eval(model_dir, tmp_path):
    out = tmp_path / "q"
    report = tmp_path / "report.json"
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), "--group-size", "32", "--iters", "4",
                              "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--report-json", str(report)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()
    assert json.loads(report.read_text())["layers_quantized"] == 14
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["quant_method"] == "auto-round" and info["quantized_layers"] == 14
    assert info["bits_histogram"] == {"4": 14}
    res = runner.invoke(app, ["eval", str(model_dir), "--quantized", str(out), "--seqlen", "64", "--max-windows", "4",
                              "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 2 and all(r["perplexity"] > 1 for r in rows)


def test_dry_run_prints_the_plan_and_writes_nothing(model_dir, tmp_path):
    res = runner.invoke(app, ["quantize", str(model_dir), "--dry-run", "--group-size", "32", "--bits", "3"])
    assert res.exit_code == 0, res.output
    assert "model.layers.0.self_attn.q_proj" in res.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--bits", "9"], "bits"),
    (["--recipe", "nope"], "unknown recipe"),
    (["--layer-config", "/no/such.json"], "does not exist"),
    (["--dataset", "/no/such.jsonl"], "not found"),
])
def test_user_errors_are_one_line_and_exit_2(model_dir, tmp_path, args, needle):
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(tmp_path / "q"), *args])
    assert res.exit_code == 2, res.output
    assert needle in res.output.lower()
    assert "Traceback" not in res.output
    assert not (tmp_path / "q").exists()


def test_refuses_to_overwrite(model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), "--recipe", "rtn", "--group-size", "32"])
    assert res.exit_code == 2 and "not empty" in res.output
    assert (out / "keep.txt").read_text() == "mine"
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(model_dir), "--overwrite", "--recipe", "rtn"])
    assert res.exit_code == 2 and "overlaps the input model" in res.output


def test_missing_model_path():
    res = runner.invoke(app, ["quantize", "/no/such/model", "-o", "/tmp/x"])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_templates_commands(tmp_path):
    res = runner.invoke(app, ["templates", "list"])
    assert res.exit_code == 0 and "qwen2_vl" in res.output.split()
    res = runner.invoke(app, ["templates", "show", "qwen2_vl"])
    assert json.loads(res.stdout)["processor"] == "qwen2_vl"
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]))
    res = runner.invoke(app, ["templates", "render", "qwen2_vl", "--conversation", str(conv)])
    assert res.exit_code == 0 and "<|vision_start|><|image_pad|><|vision_end|>" in res.output and "Hello" in res.output
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"format_user": "no placeholder", "replace_tokens": ["a"]}))
    res = runner.invoke(app, ["templates", "validate", str(bad)])
    assert res.exit_code == 2 and "t.json" in res.output


def test_python_dash_m_is_the_same_command(model_dir):
    a = subprocess.run([sys.executable, "-m", "signround", "templates", "list"], capture_output=True, text=True)
    b = runner.invoke(app, ["templates", "list"])
    assert a.returncode == 0 and a.stdout == b.output
    bad = subprocess.run([sys.executable, "-m", "signround", "quantize", "/no/such", "-o", "/tmp/x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not a directory" in bad.stderr
