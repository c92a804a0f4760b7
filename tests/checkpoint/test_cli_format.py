"""`signround quantize --format`: the choices are the export formats of the format table, checked by
the parser before anything is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from signround.adapters.checkpoint.formats import FORMAT_NAMES
from signround.adapters.hf import model_io
from signround.cli import Format, app

runner = CliRunner()


def test_format_choices_come_from_the_table() -> None:
    assert tuple(f.value for f in Format) == FORMAT_NAMES


@pytest.mark.parametrize("bad", ["fake", "gguf"])
def test_unknown_format_rejected_by_the_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    def no_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before --format was checked")

    monkeypatch.setattr(model_io, "load_model", no_load)
    res = runner.invoke(app, ["quantize", str(tmp_path / "model"), "-o", str(tmp_path / "q"), "--format", bad])
    assert res.exit_code == 2, res.output
    assert "Invalid value for '--format'" in res.output and bad in res.output
    assert not (tmp_path / "q").exists()
