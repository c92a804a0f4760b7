"""Resume after a crash: a run stopped after k finished blocks, rerun on the same store, replays
exactly those k blocks and ends with the checkpoint of an uninterrupted run, bit for bit."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from safetensors.torch import load_file

from _templating_helpers import byte_tokenizer
from signround.adapters import quantize_model
from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.engine.report import BlockResult
from signround.adapters.engine.resume import ResumeStore
from signround.adapters.frontends.facade import AutoRound
from signround.rounding import QuantSpec, preset
from tiny_models import random_batches, tiny_text_model

LAYERS = 4
SPEC = QuantSpec(bits=4, group_size=32)
RECIPE = preset("default", iters=20, nsamples=8, seqlen=32, batch_size=4)


class _Interrupted(Exception):
    """Stands in for a crash between two blocks."""


@attrs.define
class _CountingStore(ResumeStore):
    """A ResumeStore that counts what it does and, with `stop_after`, fails right after that many saves."""

    stop_after: int = 0
    saves: int = 0
    loads: int = 0

    def save(self, result: BlockResult) -> None:
        super().save(result)
        self.saves += 1
        if self.saves == self.stop_after:
            raise _Interrupted

    def load(self, block: str) -> BlockResult:
        self.loads += 1
        return super().load(block)


def _run(store: ResumeStore | None):
    model = tiny_text_model("llama", num_hidden_layers=LAYERS)
    _, report = quantize_model(model, random_batches(2, 4, 32), SPEC, RECIPE, resume=store)
    return model, report


def _checkpoint(model, report, path: Path) -> dict[str, torch.Tensor]:
    save_quantized(model, report.layers, path)
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("k", [1, 3])
def test_interrupted_run_resumes_to_a_bit_identical_checkpoint(tmp_path: Path, k: int) -> None:
    ref_model, ref_report = _run(None)

    first = _CountingStore.open(tmp_path / "resume", "run")
    first.stop_after = k
    with pytest.raises(_Interrupted):
        _run(first)
    assert first.saves == k and first.loads == 0 and first.finished() == k

    second = _CountingStore.open(tmp_path / "resume", "run")
    model, report = _run(second)
    assert second.loads == k and second.saves == LAYERS - k
    assert [b.source for b in report.blocks] == ["replayed"] * k + ["tuned"] * (LAYERS - k)
    assert [b.loss_tuned for b in report.blocks] == [b.loss_tuned for b in ref_report.blocks]
    for (ka, va), (kb, vb) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    a, b = _checkpoint(ref_model, ref_report, tmp_path / "ref"), _checkpoint(model, report, tmp_path / "out")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_facade_replays_its_own_store_and_refuses_other_arguments(tmp_path: Path) -> None:
    tok = byte_tokenizer([])
    kw = dict(group_size=32, iters=5, nsamples=8, seqlen=32, batch_size=4, progress=False,
              resume_dir=tmp_path / "resume")
    first = tiny_text_model("llama", vocab_size=len(tok))
    AutoRound(first, tok, **kw).quantize()
    second = tiny_text_model("llama", vocab_size=len(tok))
    report = AutoRound(second, tok, **kw).quantize()
    assert {b.source for b in report.blocks} == {"replayed"}
    assert all(torch.equal(va, vb) for va, vb in zip(first.state_dict().values(), second.state_dict().values()))
    with pytest.raises(ValueError, match="different arguments"):
        AutoRound(tiny_text_model("llama", vocab_size=len(tok)), tok, **{**kw, "group_size": 64}).quantize()


def test_a_store_from_other_arguments_is_refused(tmp_path: Path) -> None:
    ResumeStore.open(tmp_path / "r", "run-a")
    ResumeStore.open(tmp_path / "r", "run-a")  # same run: fine
    with pytest.raises(ValueError, match="different arguments"):
        ResumeStore.open(tmp_path / "r", "run-b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        ResumeStore.open(tmp_path / "busy", "run-a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        AutoRound(tiny_text_model("llama"), None, recipe="rtn", resume_dir=tmp_path / "file", progress=False)
