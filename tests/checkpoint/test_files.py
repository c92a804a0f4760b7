"""What a save may replace, the lock on an output or resume directory, stale temporaries, permissions."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from signround.adapters.checkpoint import files
from signround.adapters.checkpoint.files import (Locked, atomic_dir, check_replaceable, dir_lock, not_a_checkpoint,
                                                 stale_temporaries)


def fake_checkpoint(path: Path, method: str = "auto-round") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": method}}))
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "quantization_config.json"):
        (path / name).write_text("{}")
    return path


def test_only_a_quantized_checkpoint_is_replaceable(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    assert not_a_checkpoint(ckpt) is None
    assert not_a_checkpoint(fake_checkpoint(tmp_path / "gptq", "gptq")) is None
    both = tmp_path / "both"  # several formats: one checkpoint per sub-folder
    fake_checkpoint(both / "auto-round")
    fake_checkpoint(both / "auto-gptq", "gptq")
    assert not_a_checkpoint(both) is None
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert "no config.json" in not_a_checkpoint(mine)
    fp = fake_checkpoint(tmp_path / "fp")  # a full-precision model: no quantization_config
    (fp / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "no quantization_config" in not_a_checkpoint(fp)
    (ckpt / "train.py").write_text("")  # a user's file beside a checkpoint
    assert "train.py" in not_a_checkpoint(ckpt)


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_deletes_other_files(tmp_path: Path, overwrite: bool) -> None:
    # before issue 14, overwrite replaced any directory (-o . --overwrite deleted the working directory)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.jsonl").write_text("{}")
    with pytest.raises(FileExistsError, match="not a quantized checkpoint" if overwrite else "not empty"):
        with atomic_dir(mine, overwrite=overwrite) as tmp:
            (tmp / "config.json").write_text("{}")
    assert (mine / "data.jsonl").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_a_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="holds a quantized checkpoint; pass overwrite=True"):
        check_replaceable(ckpt)
    with atomic_dir(ckpt, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (ckpt / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries, no lock file left


def test_checkpoint_folders_get_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # mkdtemp gave 0700
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644


def test_stale_temporaries_of_ours_are_removed_by_the_next_save(tmp_path: Path) -> None:
    # a SIGKILL during a save leaves .NAME.tmp-* (tens of GB for a big model); the next save removes it
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-4242-abcd"
    stale.mkdir()
    save_file({"w": torch.zeros(2)}, str(stale / "model-00001-of-00002.safetensors"))
    old = tmp_path / ".out.old-4242-ef01"
    fake_checkpoint(old)
    foreign = tmp_path / ".out.tmp-keep"  # not only checkpoint files: not ours to delete
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = tmp_path / ".other.tmp-1-aa"  # another output's temporary
    other.mkdir()
    assert stale_temporaries(out) == [stale, old]
    with pytest.warns(UserWarning, match="removed 2 temporary folder"):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1-aa", ".out.tmp-keep", "out"]


def test_a_second_process_cannot_take_the_lock(tmp_path: Path) -> None:
    target = tmp_path / "out"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the lock until killed
        try:
            os.close(read)
            with dir_lock(target):
                os.write(write, b"x")
                signal.pause()
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"x"
    try:
        with pytest.raises(Locked, match=rf"output .*out.* is in use by another signround run \(pid {pid}\)"):
            with dir_lock(target):
                pass
        with pytest.raises(Locked):  # a save to that output is refused before anything is written
            with atomic_dir(target):
                pass
    finally:
        os.kill(pid, signal.SIGKILL)  # the kernel drops a dead process's lock
        os.waitpid(pid, 0)
    with dir_lock(target, "resume_dir"):
        with dir_lock(target):  # re-entrant within a process
            pass
    assert not files._HELD and not (tmp_path / ".out.lock").exists()
