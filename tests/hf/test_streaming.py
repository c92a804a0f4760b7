"""Streaming from disk: a model saved in several shards is quantized one block at a time from its
checkpoint and written as it goes; the checkpoint equals (tensor for tensor) the in-RAM run's.
Under a RAM cap smaller than the model (RLIMIT_DATA in a child process) the streamed run succeeds
and the in-RAM load fails; resume and the disk cache give the same bits; bad checkpoints are
refused before any work, leaving no output."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch

from _templating_helpers import byte_tokenizer
from signround.adapters.checkpoint.export import save_quantized
from signround.adapters.checkpoint.files import iter_tensors
from signround.adapters.checkpoint.stream_writer import open_stream
from signround.adapters.engine.loop import quantize_model
from signround.adapters.engine.planner import HOST_MARGIN
from signround.adapters.engine.report import BlockResult
from signround.adapters.engine.resume import ResumeStore
from signround.adapters.hf.blocks import select_layers
from signround.adapters.hf.model_io import load_model
from signround.adapters.hf.streaming import CheckpointError, StreamedWeights, skeleton
from signround.rounding import QuantSpec, Recipe
from tiny_models import random_batches, tiny_text_model

SPEC = QuantSpec(bits=4, group_size=32)
RECIPE = Recipe(iters=3, nsamples=8, seqlen=32, batch_size=4)
PREFIXES = ["model.layers"]


def _save(path: Path, layers: int, shard: str, **dims: int) -> Path:
    model = tiny_text_model("llama", num_hidden_layers=layers, **dims)
    model.save_pretrained(path, max_shard_size=shard)
    byte_tokenizer([]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _save(tmp_path_factory.mktemp("streaming") / "src", 4, "60KB")
    assert len(list(path.glob("*.safetensors"))) > 3  # several shards, blocks split across them
    return path


def _in_ram(src: Path, out: Path, batches: list, recipe: Recipe = RECIPE) -> dict[str, torch.Tensor]:
    model = load_model(src).model
    _, report = quantize_model(model, batches, SPEC, recipe)
    save_quantized(model, report.layers, out, block_name_to_quantize=list(report.block_name_to_quantize), recipe=recipe)
    return dict(iter_tensors(out))


def _streamed(src: Path, out: Path, batches: list, recipe: Recipe = RECIPE, **kw):
    model = skeleton(src)
    weights = StreamedWeights.open(src, model, PREFIXES)
    weights.load_outside()
    plan = select_layers(model, PREFIXES, SPEC)
    with open_stream(out, model, "auto_round", plan.quantize, PREFIXES) as writer:
        _, report = quantize_model(model, batches, SPEC, recipe, block_names=PREFIXES, stream=weights, sink=writer, **kw)
        writer.finish(report, recipe=recipe)
    return report


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_streamed_checkpoint_equals_the_in_ram_one(source: Path, tmp_path: Path) -> None:
    batches = random_batches(2, 4, 32)
    ref = _in_ram(source, tmp_path / "ram", batches)
    seen: list[bool] = []
    model_blocks: list = []

    def on_block(report) -> None:  # the blocks already written hold no weights any more
        seen.append(all(p.device.type == "meta" for b in model_blocks[:len(seen)] for p in b.parameters()))

    model = skeleton(source)
    model_blocks.extend(model.model.layers)
    weights = StreamedWeights.open(source, model, PREFIXES)
    weights.load_outside()
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    plan = select_layers(model, PREFIXES, SPEC)
    with open_stream(tmp_path / "stream", model, "auto_round", plan.quantize, PREFIXES) as writer:
        _, report = quantize_model(model, batches, SPEC, RECIPE, block_names=PREFIXES, stream=weights, sink=writer,
                                   on_block=on_block)
        writer.finish(report, recipe=RECIPE)
    assert seen == [True] * 4
    _assert_same(ref, dict(iter_tensors(tmp_path / "stream")))
    config = lambda p: json.loads((p / "config.json").read_text())  # noqa: E731
    assert config(tmp_path / "ram") == config(tmp_path / "stream")


class _Interrupted(Exception):
    pass


@attrs.define
class _StopAfter(ResumeStore):
    stop_after: int = 0
    saves: int = 0

    def save(self, result: BlockResult) -> None:
        super().save(result)
        self.saves += 1
        if self.saves == self.stop_after:
            raise _Interrupted


def test_streamed_resume_is_bit_identical_and_a_killed_run_leaves_no_output(source: Path, tmp_path: Path) -> None:
    batches = random_batches(2, 4, 32)
    ref = _in_ram(source, tmp_path / "ram", batches)
    store = _StopAfter.open(tmp_path / "resume", "run")
    store.stop_after = 2
    with pytest.raises(_Interrupted):
        _streamed(source, tmp_path / "out", batches, resume=store)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing partial left
    report = _streamed(source, tmp_path / "out", batches, resume=ResumeStore.open(tmp_path / "resume", "run"))
    assert [b.source for b in report.blocks] == ["replayed"] * 2 + ["tuned"] * 2
    _assert_same(ref, dict(iter_tensors(tmp_path / "out")))


def test_the_cache_on_disk_gives_the_same_checkpoint(source: Path, tmp_path: Path) -> None:
    batches = random_batches(2, 4, 32)
    ref = _in_ram(source, tmp_path / "ram", batches)
    mapped: list[int] = []

    def on_block(report) -> None:  # the activation cache is a deleted file mapped into this process
        maps = Path("/proc/self/maps").read_text()
        mapped.append(sum("signround-cache-" in line for line in maps.splitlines()))

    _streamed(source, tmp_path / "disk", batches, device="cpu", cache="disk", on_block=on_block)
    assert mapped and all(n >= 2 for n in mapped)  # inputs and targets, at every block
    assert not list(Path("/tmp").glob("signround-cache-*"))  # unlinked at once: nothing to clean
    _assert_same(ref, dict(iter_tensors(tmp_path / "disk")))


def test_bad_checkpoints_are_refused_before_any_work(source: Path, tmp_path: Path) -> None:
    import shutil

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(source, dst)
        return dst

    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    block_shard = index["model.layers.2.mlp.down_proj.weight"]
    missing = copy("missing")
    (missing / block_shard).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: 1 of .* missing \\({block_shard}"):
        StreamedWeights.open(missing, skeleton(source), PREFIXES)
    truncated = copy("truncated")
    data = (truncated / block_shard).read_bytes()
    (truncated / block_shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"shard {block_shard} is truncated"):
        StreamedWeights.open(truncated, skeleton(source), PREFIXES)
    other = copy("other")  # a checkpoint of a model with one block fewer than the config says
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks .* tensor\\(s\\) the model needs \\(model.layers.4"):
        StreamedWeights.open(other, skeleton(other), PREFIXES)
    assert not list(tmp_path.glob(".*tmp*"))


CHILD = textwrap.dedent("""
    import json, resource, shutil, sys
    from pathlib import Path
    import torch
    from signround.adapters.checkpoint.stream_writer import open_stream
    from signround.adapters.engine.loop import quantize_model
    from signround.adapters.engine.planner import ModelShape, Settings, estimate
    from signround.adapters.hf.blocks import select_layers
    from signround.adapters.hf.model_io import load_model
    from signround.adapters.hf.streaming import StreamedWeights, skeleton
    from signround.rounding import QuantSpec, Recipe

    src, out, cap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    spec, recipe = QuantSpec(**json.loads(sys.argv[4])), Recipe(**json.loads(sys.argv[5]))
    batches = torch.load(src.parent / "batches.pt")

    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

    def streamed(target, blocks=None):
        model = skeleton(src)
        if blocks is not None:
            del model.model.layers[blocks:]
        weights = StreamedWeights.open(src, model, ["model.layers"])
        weights.load_outside()
        plan = select_layers(model, ["model.layers"], spec)
        with open_stream(target, model, "auto_round", plan.quantize, ["model.layers"]) as writer:
            _, report = quantize_model(model, batches, spec, recipe, block_names=["model.layers"], stream=weights,
                                       sink=writer)
            writer.finish(report, recipe=recipe)
        return ModelShape.of(model, ["model.layers"], plan)

    streamed(out.parent / "warm-up", blocks=2)   # libraries' first-use allocations, before the baseline
    shutil.rmtree(out.parent / "warm-up")
    open("/proc/self/clear_refs", "w").write("5")   # peak RSS from here
    base = status("VmRSS")
    resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + cap, resource.RLIM_INFINITY))
    shape = streamed(out)
    peak = status("VmHWM")
    try:
        load_model(src)
        in_ram = "loaded"
    except (RuntimeError, MemoryError, OSError) as err:
        in_ram = str(err)[:400]
    est = estimate(shape, recipe, Settings("host", True, recipe.batch_size, 1), device_type="cpu")
    print(json.dumps({"net_peak": peak - base, "model": shape.model_bytes, "estimate": est.host.total,
                      "in_ram": in_ram}))
""")


@pytest.mark.slow
def test_streaming_under_a_ram_cap_smaller_than_the_model(tmp_path: Path) -> None:
    src = _save(tmp_path / "src", 16, "20MB", hidden_size=256, intermediate_size=1024)
    batches = random_batches(2, 4, 32)
    torch.save(batches, tmp_path / "batches.pt")
    recipe = attrs.evolve(RECIPE, iters=1)
    cap = 48 * 2**20
    args = [json.dumps({"bits": SPEC.bits, "group_size": SPEC.group_size}),
            json.dumps({"iters": recipe.iters, "nsamples": recipe.nsamples, "seqlen": recipe.seqlen,
                        "batch_size": recipe.batch_size})]
    run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "stream"), str(cap), *args],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    error = got["estimate"] / got["net_peak"] - 1
    print(f"streamed CPU peak {got['net_peak'] / 2**20:.1f} MiB, estimate {got['estimate'] / 2**20:.1f} MiB "
          f"({error:+.0%}), model {got['model'] / 2**20:.1f} MiB, cap {cap / 2**20:.0f} MiB")
    assert got["model"] > cap * 1.2  # the cap is well below the model…
    assert "allocate" in got["in_ram"], got["in_ram"]  # …so loading it in RAM fails under the same cap
    assert got["net_peak"] < cap
    # the planner's CPU estimate against the measured peak RSS (spec/performance.md states the error)
    assert -0.3 < error < 0.3 and got["estimate"] * (1 + HOST_MARGIN) > got["net_peak"] * 0.95
    _assert_same(_in_ram(src, tmp_path / "ram", batches, recipe), dict(iter_tensors(tmp_path / "stream")))


TEXT = ["The quick brown fox jumps over the lazy dog, again and again, in every season. " * 20]
FACADE = dict(group_size=32, iters=3, nsamples=8, seqlen=32, batch_size=4, progress=False, dataset=TEXT, device="cpu")


def test_the_facade_and_the_cli_stream(source: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from signround.adapters.frontends.facade import AutoRound
    from signround.cli import app

    ram = load_model(source)
    AutoRound(ram.model, ram.tokenizer, **FACADE).quantize_and_save(tmp_path / "ram")
    streamed = load_model(source, stream=True)
    quantizer = AutoRound(streamed.model, streamed.tokenizer, stream_from_disk=True, **FACADE)
    assert quantizer.config.stream and quantizer.settings()["device"]["weights"].startswith("streamed")
    with pytest.raises(ValueError, match="quantize_and_save"):
        quantizer.quantize()
    quantizer.quantize_and_save(tmp_path / "stream")
    _assert_same(dict(iter_tensors(tmp_path / "ram")), dict(iter_tensors(tmp_path / "stream")))
    with pytest.raises(ValueError, match="not a model already loaded"):
        AutoRound(load_model(source).model, ram.tokenizer, stream_from_disk=True, **FACADE)
    # a budget nothing fits is refused at construction, before any work and without output
    with pytest.raises(MemoryError, match="does not fit the memory budget"):
        AutoRound(load_model(source, stream=True).model, ram.tokenizer, max_cpu_memory="64MiB", **FACADE)
    res = CliRunner().invoke(app, ["quantize", str(source), "--dry-run", "--stream-from-disk", "--device", "cpu",
                                   "--group-size", "32", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "memory plan: cache on host, model streamed from disk" in res.output and "CPU RAM peak" in res.output
    res = CliRunner().invoke(app, ["quantize", str(source), "-o", str(tmp_path / "cli"), "--max-cpu-memory", "1MiB",
                                   "--device", "cpu", "--group-size", "32"])
    assert res.exit_code == 2 and "CPU RAM needs at least" in res.output and not (tmp_path / "cli").exists()
