"""`signround demo` (the README's first command) end to end, shrunk: a random 2-layer decoder, 1 iteration."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from signround.adapters.frontends import assets, demo


@pytest.mark.slow
def test_demo_prints_rtn_and_signround_side_by_side(tmp_path, monkeypatch) -> None:
    random_smollm2 = assets.random_smollm2
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)
    monkeypatch.setattr(assets, "random_smollm2", lambda: random_smollm2(num_layers=2))
    monkeypatch.setattr(demo, "CALIB", dict(nsamples=4, seqlen=32, batch_size=4))
    monkeypatch.setattr(demo, "IMAGE_SAMPLES", 2)
    out = io.StringIO()
    result = demo.run_demo(output=tmp_path / "q", iters=1, console=Console(file=out, width=160))
    text = out.getvalue()
    assert result["layers"] == 14 and (tmp_path / "q" / "config.json").is_file()
    assert "W3 G64" in text and "RTN" in text and "SignRound wins back" in text
