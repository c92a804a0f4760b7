"""The built wheel holds one import name, `signround`, with its presets, and works on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(out), str(ROOT)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"wheel build failed: {res.stderr[-2000:]}")
    (whl,) = out.glob("signround-*.whl")
    return whl


def test_wheel_has_one_top_level_name_and_the_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("signround-")}
    assert tops == {"signround"}
    for preset in ("default", "qwen2_vl", "qwen2_5_vl", "llava", "phi3_v", "mllama", "gemma3", "idefics3"):
        assert f"signround/templates/{preset}.json" in names
    assert not any(n.startswith("signround/tests/") for n in names)


def test_unpacked_wheel_imports_and_finds_presets(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = ("import signround, signround.templating as t; "
            "assert signround.__file__.startswith(%r); print(len(t.list_presets()))" % str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) >= 8
