"""Resume after a crash: SIGKILL mid-run, rerun with the same arguments, get the same checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _templating_helpers import byte_tokenizer
from signround.adapters.engine.resume import ResumeStore
from tiny_models import tiny_text_model

LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-4")
    tok = byte_tokenizer([])
    tiny_text_model("llama", vocab_size=len(tok), num_hidden_layers=LAYERS).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cmd(model_dir: Path, out: Path, resume: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "signround", "quantize", str(model_dir), "-o", str(out), "--group-size", "32",
           "--iters", "60", "--nsamples", "16", "--seqlen", "64", "--batch-size", "4"]
    return cmd + (["--resume-dir", str(resume)] if resume else [])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_killed_run_resumes_to_a_bit_identical_checkpoint(model_dir, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(model_dir, ref, None), check=True, capture_output=True)

    resume = tmp_path / "resume"
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(model_dir, out, resume), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(list(resume.glob("*.safetensors"))) if resume.is_dir() else 0
        if 1 <= done < LAYERS:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = len(list(resume.glob("*.safetensors")))
    assert 1 <= finished < LAYERS
    assert not out.exists()  # nothing checkpoint-like was left behind

    res = subprocess.run(_cmd(model_dir, out, resume), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_store_from_other_arguments_is_refused(tmp_path):
    ResumeStore.open(tmp_path / "r", "run-a")
    ResumeStore.open(tmp_path / "r", "run-a")  # same run: fine
    with pytest.raises(ValueError, match="different arguments"):
        ResumeStore.open(tmp_path / "r", "run-b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        ResumeStore.open(tmp_path / "busy", "run-a")
