"""quantize_model on tiny random text models: tuning beats RTN, results lie on the grid, runs repeat,
the library prints nothing and writes nothing onto the modules but their weights."""

from __future__ import annotations

import attrs
import orjson
import pytest
import torch
from tiny_models import random_batches, tiny_text_model

from signround.adapters import quantize_model
from signround.adapters.engine import runtime
from signround.rounding import QuantSpec, codes_from_dequantized, preset, qdq
from signround.rounding.grid import QuantizedWeight

SPEC = QuantSpec(bits=4, group_size=32)
FAMILIES = ["llama", "qwen2", "gemma3_text"]


def _recipe(**kw):
    base = dict(iters=40, nsamples=8, batch_size=8, seqlen=32)
    base.update(kw)
    return preset("default", **base)


DATA = object()


def _run(model_type: str, recipe, batches=DATA, **kw):
    model = tiny_text_model(model_type, num_hidden_layers=2)
    batches = random_batches(2, 4, 32) if batches is DATA else batches
    return quantize_model(model, batches, SPEC, recipe, **kw)


def _kl(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(fp_logits.float(), -1)
    q = torch.log_softmax(q_logits.float(), -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tuning_beats_rtn_per_block_and_on_logits(model_type: str) -> None:
    fp = tiny_text_model(model_type, num_hidden_layers=2)
    held_out = random_batches(2, 4, 32, seed=99)
    with torch.no_grad():
        fp_logits = torch.cat([fp(input_ids=b).logits for b in held_out])
    tuned, report = _run(model_type, _recipe())
    rtn, rtn_report = _run(model_type, preset("rtn"), batches=None)
    # use_best keeps RTN for a block whose tuned weights score worse on all samples: recorded exactly
    # then, and the block then holds RTN's weights.
    for block, rtn_block in zip(report.blocks, rtn_report.blocks):
        assert block.kept_rtn == (block.loss_tuned > block.loss_rtn), block
        assert block.loss_kept == min(block.loss_tuned, block.loss_rtn)
        same = all(torch.equal(tuned.get_submodule(n).weight, rtn.get_submodule(n).weight) for n in block.layers)
        if block.kept_rtn or block.loss_tuned < block.loss_rtn:
            assert same == block.kept_rtn, block
    assert sum(b.loss_tuned for b in report.blocks) < 0.9 * sum(b.loss_rtn for b in report.blocks)
    assert all(b.loss_rtn is None for b in rtn_report.blocks)
    with torch.no_grad():
        kl_tuned = _kl(fp_logits, torch.cat([tuned(input_ids=b).logits for b in held_out]))
        kl_rtn = _kl(fp_logits, torch.cat([rtn(input_ids=b).logits for b in held_out]))
    assert kl_tuned < kl_rtn


@pytest.mark.parametrize("use_best", [True, False])
def test_tuned_weights_worse_than_rtn_are_dropped_only_with_use_best(monkeypatch: pytest.MonkeyPatch,
                                                                     use_best: bool) -> None:
    real = runtime.tune

    def worse(*args, **kwargs):  # mirrored codes: far from the weights, so far worse than RTN
        res = real(*args, **kwargs)
        return attrs.evolve(res, quantized={k: attrs.evolve(q, codes=q.spec.maxq - q.codes)
                                            for k, q in res.quantized.items()})

    monkeypatch.setattr(runtime, "tune", worse)
    model, report = _run("llama", _recipe(iters=2, use_best=use_best))
    rtn, _ = _run("llama", preset("rtn"), batches=None)
    for block in report.blocks:
        assert block.loss_tuned > block.loss_rtn and block.kept_rtn == use_best, block
        same = all(torch.equal(model.get_submodule(n).weight, rtn.get_submodule(n).weight) for n in block.layers)
        assert same == use_best, block


def test_minibatches_lower_the_average_block_loss() -> None:
    _, report = _run("llama", _recipe(batch_size=4, iters=60))
    assert sum(b.loss_tuned for b in report.blocks) < sum(b.loss_rtn for b in report.blocks)


def test_same_seed_gives_bit_identical_weights() -> None:
    a, ra = _run("llama", _recipe(batch_size=4, iters=10))
    b, rb = _run("llama", _recipe(batch_size=4, iters=10))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert [x.loss_tuned for x in ra.blocks] == [x.loss_tuned for x in rb.blocks]
    c, _ = _run("llama", _recipe(batch_size=4, iters=10, seed=7))
    # Another seed draws other mini-batches: some tuned weight differs (a block may keep RTN).
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("sym", [True, False])
def test_quantized_weights_lie_on_the_grid(sym: bool) -> None:
    spec = QuantSpec(bits=4, group_size=32, sym=sym)
    model = tiny_text_model("qwen2", num_hidden_layers=2)
    attributes = {n: set(vars(m)) for n, m in model.named_modules()}
    model, report = quantize_model(model, random_batches(2, 4, 32), spec, _recipe(iters=10, nsamples=8, batch_size=4))
    assert {n: set(vars(m)) for n, m in model.named_modules()} == attributes  # nothing written onto the modules
    assert len(report.layers) == 14 and all(name == res.name for name, res in report.layers.items())
    modules = dict(model.named_modules())
    for name, res in report.layers.items():
        w = modules[name].weight.detach()
        out_f, in_f = w.shape
        assert res.scale.dtype == torch.float16 and res.scale.shape == (out_f, in_f // 32)
        assert res.zero.dtype == torch.int32 and res.zero.shape == res.scale.shape
        codes = codes_from_dequantized(w, res.scale, res.zero, res.spec)
        assert int(codes.min()) >= 0 and int(codes.max()) <= 15
        back = QuantizedWeight(codes, res.scale, res.zero, res.spec).dequantize(w.dtype)
        assert torch.equal(back, w), name  # exactly on the grid
        # quantizing the quantized weight again (RTN) keeps it where it is
        assert torch.equal(codes_from_dequantized(back, res.scale, res.zero, res.spec), codes)


def test_rtn_without_data_is_plain_round_to_nearest() -> None:
    model = tiny_text_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model, report = quantize_model(model, None, SPEC, preset("rtn"))
    assert len(report.layers) == 14 and not report.skipped
    for name, res in report.layers.items():
        w0 = original[name + ".weight"]
        assert torch.equal(model.get_submodule(name).weight, qdq(w0, SPEC))
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(model.model.layers[0].input_layernorm.weight, original["model.layers.0.input_layernorm.weight"])


def test_rtn_with_data_reports_equal_losses() -> None:
    _, report = _run("llama", preset("rtn", nsamples=8, batch_size=4))
    for b in report.blocks:
        assert b.loss_rtn == b.loss_tuned and b.loss_rtn > 0


def test_tuning_needs_data() -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_text_model("llama"), None, SPEC, _recipe())


def test_layer_config_report_and_json_summary() -> None:
    model = tiny_text_model("llama", num_hidden_layers=2)
    layer_config = {r"mlp\.down_proj": {"bits": 16}, "model.layers.0.self_attn.q_proj": {"bits": 8}}
    model, report = quantize_model(model, random_batches(2, 4, 32), SPEC, _recipe(iters=5, nsamples=8, batch_size=4),
                                   layer_config=layer_config)
    assert set(report.skipped) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert report.layers["model.layers.0.self_attn.q_proj"].spec.bits == 8
    assert report.block_name_to_quantize == ("model.layers",)
    extra = report.extra_config()
    assert extra["model.layers.0.self_attn.q_proj"] == {"bits": 8}
    assert extra["model.layers.1.mlp.down_proj"] == {"bits": 16}
    summary = orjson.loads(report.to_json())
    assert summary["layers_quantized"] == 12 and len(summary["blocks"]) == 2
    assert summary["blocks"][0]["loss_tuned"] <= summary["blocks"][0]["loss_rtn"]
    assert summary["seconds"] > 0 and summary["peak_memory_bytes"] > 0


def test_low_gpu_mem_usage_gives_the_same_result_on_cpu() -> None:
    a, _ = _run("llama", _recipe(batch_size=4, iters=10))
    b, _ = _run("llama", _recipe(batch_size=4, iters=10), low_gpu_mem_usage=True)
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(va, vb)


def test_without_quanted_input_blocks_tune_on_fp_inputs() -> None:
    _, report = _run("llama", _recipe(iters=20, enable_quanted_input=False))
    assert all(b.loss_tuned <= b.loss_rtn for b in report.blocks)


def test_gpt2_conv1d_layers_are_tuned_and_written_back_transposed() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)).eval()
    model, report = quantize_model(model, random_batches(2, 4, 16), SPEC, _recipe(iters=20, nsamples=8, batch_size=8))
    assert all(b.loss_tuned <= b.loss_rtn for b in report.blocks)
    res = report.layers["transformer.h.0.mlp.c_fc"]
    w = model.transformer.h[0].mlp.c_fc.weight.detach().t()  # Conv1D stores [in, out]
    assert res.scale.shape == (w.shape[0], w.shape[1] // 32)
    codes = codes_from_dequantized(w, res.scale, res.zero, res.spec)
    assert torch.equal(QuantizedWeight(codes, res.scale, res.zero, res.spec).dequantize(w.dtype), w)


def test_each_block_report_goes_to_on_block_and_nothing_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    seen = []
    _, report = _run("llama", _recipe(iters=2, nsamples=4, batch_size=4), on_block=seen.append)
    assert seen == list(report.blocks) and [b.name for b in seen] == ["model.layers.0", "model.layers.1"]
    assert all(b.source == "tuned" and b.seconds > 0 for b in seen)
    for b in seen:  # where each block's time went, in order, adding up to at most its wall time
        assert list(b.phases) == ["setup", "targets", "score_rtn", "tune", "score_tuned", "outputs"]
        assert all(v >= 0 for v in b.phases.values()) and sum(b.phases.values()) <= b.seconds
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_finished_blocks_keep_no_copy_of_their_weights() -> None:
    """The loop holds each block's grids and report, never its dequantized weights once they are in
    the block (they used to stay on the device for the whole run: one block's weights per block)."""
    import gc
    import weakref

    refs: list[list[weakref.ref]] = []
    alive_at_save: list[int] = []

    class Watch:  # a resume store that stores nothing and watches what earlier blocks left alive
        def has(self, name: str) -> bool:
            return False

        def save(self, result) -> None:
            gc.collect()
            alive_at_save.append(sum(r() is not None for block in refs for r in block))
            refs.append([weakref.ref(w) for w in result.weights.values()])

    model = tiny_text_model("llama", num_hidden_layers=4)
    quantize_model(model, random_batches(2, 4, 32), SPEC, _recipe(iters=2), resume=Watch())  # type: ignore[arg-type]
    assert len(refs) == 4 and all(refs) and alive_at_save == [0, 0, 0, 0]
