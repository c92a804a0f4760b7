"""`signround quantize` with bad or unusual inputs (issue 14): what overwrite may replace, checks
before the model loads and before tuning, auto-round's spellings, messages in CLI terms, one-line
warnings, the summary before tuning, Ctrl-C reporting what is on disk, locks, help width."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from signround.adapters.checkpoint.files import dir_lock
from signround.adapters.frontends import arguments
from signround.adapters.frontends.facade import AutoRound
from signround.adapters.hf import model_io
from signround.cli import app
from tiny_models import save_tiny_text_model

runner = CliRunner()
FAST = ["--group-size", "32", "--iters", "2", "--nsamples", "4", "--seqlen", "32", "--batch-size", "4"]
RTN = ["--group-size", "32", "--recipe", "rtn"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def checkpoint(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "q"
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(out), *RTN])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def no_load(monkeypatch):
    """The model must not be loaded: the check under test runs before."""
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(model_io, "load_model", refuse)


def quantize(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["quantize", *map(str, args)])


def one_error_line(res, needle: str, code: int = 2) -> str:  # type: ignore[no-untyped-def]
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], res.output
    return errors[0]


# --- 1. overwrite replaces only a previous checkpoint, never the run's inputs -----------------------

def test_overwrite_of_the_working_directory_is_refused(model_dir, tmp_path, monkeypatch, no_load):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    res = quantize(model_dir, "-o", ".", "--overwrite", *RTN)
    one_error_line(res, "is not a quantized checkpoint")
    assert "--overwrite only replaces a previous signround/auto-round checkpoint" in res.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_output_holding_the_runs_inputs_is_refused_up_front(model_dir, tmp_path, no_load):
    data = tmp_path / "work"
    data.mkdir()
    (data / "calib.txt").write_text("some text\n\nmore text")
    (data / "lc.json").write_text('{"q_proj": {"bits": 8}}')
    res = quantize(model_dir, "-o", data, "--overwrite", "--dataset", data / "calib.txt", *FAST)
    one_error_line(res, "an input of this run")
    res = quantize(model_dir, "-o", data, "--overwrite", "--layer-config", data / "lc.json", *FAST)
    one_error_line(res, "an input of this run")
    assert sorted(p.name for p in data.iterdir()) == ["calib.txt", "lc.json"]


def test_overwrite_replaces_a_previous_checkpoint_and_errors_speak_cli(model_dir, checkpoint):
    res = quantize(model_dir, "-o", checkpoint, *RTN)
    line = one_error_line(res, "holds a quantized checkpoint")
    assert "pass --overwrite to replace it" in line and "overwrite=True" not in line
    before = (checkpoint / "config.json").stat().st_ino
    res = quantize(model_dir, "-o", checkpoint, "--overwrite", *RTN)
    assert res.exit_code == 0, res.output
    assert (checkpoint / "config.json").stat().st_ino != before


# --- 7. checks before the model loads, the rest before tuning; --dry-run runs them -------------------

def test_resume_dir_equal_to_the_output_is_refused_up_front(model_dir, tmp_path, no_load):
    res = quantize(model_dir, "-o", tmp_path / "q", "--resume-dir", tmp_path / "q", *FAST)
    one_error_line(res, "--resume-dir")
    assert not (tmp_path / "q").exists()


def test_read_only_output_parent_is_refused_up_front(model_dir, tmp_path, monkeypatch, no_load):
    def read_only(directory: Path) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(arguments, "_probe_write", read_only)
    res = quantize(model_dir, "-o", tmp_path / "ro" / "q", *FAST)
    one_error_line(res, "is not writable (Read-only file system)")


def test_report_json_into_a_directory_is_refused_and_a_missing_folder_is_created(model_dir, tmp_path, monkeypatch):
    res = runner.invoke(app, ["quantize", str(model_dir), "-o", str(tmp_path / "q"), "--report-json", str(tmp_path),
                              *RTN])
    one_error_line(res, "is a directory")
    report = tmp_path / "reports" / "run1" / "report.json"  # the checkpoint was saved, then exit 2, before
    res = quantize(model_dir, "-o", tmp_path / "q", "--report-json", report, *FAST)
    assert res.exit_code == 0, res.output
    summary = json.loads(report.read_text())
    assert summary["settings"]["calibration"]["source"] == "builtin"
    settings = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["signround_settings"]
    assert settings["calibration"] == summary["settings"]["calibration"]
    assert settings["recipe"]["iters"] == 2 and settings["device"]["device"] == "cpu"


@pytest.mark.parametrize("args, needle", [
    (["--group-size", "48", "--recipe", "rtn"], "no layer would be quantized"),  # divides no layer width
    (["--layer-config", '{"q_prj": {"bits": 8}}', "--recipe", "rtn", "--group-size", "32"], "near matches: q_proj"),
    (["--layer-config", '{"lm_head|mlp.down_proj": {"bits": 8}}', "--recipe", "rtn", "--group-size", "32"], "lm_head"),
])
def test_problems_with_the_loaded_model_stop_before_tuning_and_dry_run_finds_them(model_dir, tmp_path, args, needle):
    for extra in ([], ["--dry-run"]):
        res = quantize(model_dir, "-o", tmp_path / "q", *args, *extra)
        one_error_line(res, needle)
        assert not (tmp_path / "q").exists()


def test_dry_run_checks_the_output_and_prints_the_settings(model_dir, tmp_path, checkpoint):
    res = quantize(model_dir, "-o", checkpoint, "--dry-run", *FAST)
    one_error_line(res, "holds a quantized checkpoint")
    res = quantize(model_dir, "-o", tmp_path / "q", "--dry-run", *FAST)
    assert res.exit_code == 0, res.output
    assert "source builtin, kind text, samples 4, seqlen 32" in " ".join(res.output.split())
    assert "nothing was tuned or written" in res.output and not (tmp_path / "q").exists()


# --- 9. broken model directories, devices: one line naming the file -----------------------------------

@pytest.mark.parametrize("damage, needle", [
    ("config", "config.json: not valid JSON"),
    ("truncated", "model.safetensors: truncated"),
    ("no-weights", "has no weights"),
    ("no-tokenizer", "has no tokenizer files"),
])
def test_broken_model_directories_are_one_line_errors(model_dir, tmp_path, damage, needle, no_load):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    if damage == "config":
        (broken / "config.json").write_text('{"model_type": "llama",')
    elif damage == "truncated":
        w = broken / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
    elif damage == "no-weights":
        (broken / "model.safetensors").unlink()
    else:
        (broken / "tokenizer.json").unlink()
    one_error_line(quantize(broken, "-o", tmp_path / "q", *FAST), needle)


@pytest.mark.parametrize("device, needle", [("mps", "not supported"), ("0,1", "torchrun")])
def test_unsupported_devices_are_refused_before_loading(model_dir, tmp_path, device, needle, no_load):
    one_error_line(quantize(model_dir, "-o", tmp_path / "q", "--device", device, *FAST), needle)


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "calib.csv"], ".jsonl"),  # went to the Hub for 32 s before
    (["--template", "qwen2_vl_typo"], "presets:"),
])
def test_unknown_dataset_extension_and_template_name(model_dir, tmp_path, args, needle, no_load):
    one_error_line(quantize(model_dir, "-o", tmp_path / "q", *args, *FAST), needle)


def test_eval_window_of_zero_tokens_is_refused_by_the_parser(model_dir, no_load):
    res = runner.invoke(app, ["eval", str(model_dir), "--seqlen", "0"])  # ZeroDivisionError before
    assert res.exit_code == 2 and "Traceback" not in res.output and "--seqlen" in res.output


# --- auto-round users' habits --------------------------------------------------------------------------

def test_auto_round_spellings(model_dir, tmp_path):
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "--model", str(model_dir), "--output_dir", str(out), "--group_size", "32",
                              "--bs", "4", "--nsample", "4", "--seq_len", "32", "--iters", "0", "--asym",
                              "--format", "auto_round,auto_gptq", "--disable_opt_rtn", "--fp_layers", "down_proj",
                              "--low_gpu_mem_usage", "--scheme", "W3A16"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["auto-gptq", "auto-round"]
    qc = json.loads((out / "auto-round" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 32, False)
    assert qc["extra_config"]["model.layers.0.mlp.down_proj"] == {"bits": 16}


def test_warnings_are_one_clean_line(model_dir, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    res = quantize(model_dir, "-o", tmp_path / "q", "--dataset", tiny, *FAST)
    assert res.exit_code == 0, res.output
    warns = [line for line in res.output.splitlines() if "repeated" in line]
    assert len(warns) == 1 and warns[0].startswith("warning: ") and "UserWarning" not in res.output
    assert "(--nsamples)" not in warns[0] and "nsamples" in warns[0]


def test_trust_remote_code_is_loud(model_dir, tmp_path):
    res = quantize(model_dir, "--dry-run", "--trust-remote-code", *RTN)
    assert res.exit_code == 0, res.output
    assert "warning: --trust-remote-code" in res.output


def test_help_is_not_cut_at_80_columns():
    res = runner.invoke(app, ["quantize", "--help"], terminal_width=80)
    assert res.exit_code == 0
    for option in ("--gradient-accumulate-steps", "--enable-minmax-tuning / --disable-minmax-tuning", "--output-dir",
                   "--to-quant-block-names", "--low-gpu-mem-usage", "--resume-dir"):
        assert option in res.output
    assert "auto-round's spellings work too" in res.output


# --- 4. locks; 10. Ctrl-C says what is on disk ------------------------------------------------------

def test_a_second_run_on_a_locked_output_stops(model_dir, tmp_path):
    out = tmp_path / "q"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with dir_lock(out):
                os.write(write, b"x")
                signal.pause()
        finally:
            os._exit(0)
    assert os.read(read, 1) == b"x"
    try:
        one_error_line(quantize(model_dir, "-o", out, *RTN), "is in use by another signround run")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not out.exists()


def test_ctrl_c_after_the_rename_reports_the_checkpoint(model_dir, tmp_path, monkeypatch):
    save = AutoRound.save_quantized

    def save_then_interrupt(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        save(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoRound, "save_quantized", save_then_interrupt)
    res = quantize(model_dir, "-o", tmp_path / "q", *RTN)
    one_error_line(res, "holds the complete new checkpoint", code=130)
    assert "nothing was written" not in res.output

    def interrupt(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoRound, "save_quantized", interrupt)
    res = quantize(model_dir, "-o", tmp_path / "q", "--overwrite", *RTN)
    one_error_line(res, "nothing was written", code=130)
    assert "is as it was" in res.output
