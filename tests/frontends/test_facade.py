"""AutoRound / AutoRoundMLLM: validation before any work, quantize → save → reload end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from _templating_helpers import byte_tokenizer
from signround.adapters.frontends.facade import AutoRound, AutoRoundMLLM, check_output_dir, read_layer_config
from signround.adapters.checkpoint.loader import load_quantized
from signround.rounding import QuantSpec
from tiny_models import tiny_text_model, tiny_vlm
from vlm_helpers import qwen2_vl_with_processor

SMALL = dict(iters=8, nsamples=8, seqlen=32, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer([])


def _model(tok, family="llama"):
    return tiny_text_model(family, vocab_size=len(tok))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=9), "bits"),
    (dict(group_size=0), "group_size"),
    (dict(iters=-1), "iters"),
    (dict(batch_size=0), "batch_size"),
    (dict(recipe="fastest"), "unknown recipe"),
    (dict(layer_config={"q_proj": {"bitz": 4}}), "unknown setting"),
    (dict(layer_config={"q_proj": {"bits": 1}}), "bits"),
    (dict(layer_config={"(": {"bits": 8}}), "regular expression"),
    (dict(to_quant_block_names="encoder.blocks"), "matches no block list"),
    (dict(dataset="/no/such/file.json"), "not found"),
    (dict(dataset=[1, 2]), "list of strings"),
    (dict(device="cuda:7"), "CUDA"),
    (dict(device="tpu"), "device"),
    (dict(cache="nvme"), "cache must be one of auto, device, host, disk"),
])
def test_bad_arguments_fail_in_the_constructor(tok, kwargs, match):
    model = _model(tok)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        AutoRound(model, tok, **{**SMALL, **kwargs})
    assert match.lower() in str(err.value).lower()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing touched


def test_quantize_save_reload_matches_fake_quant(tok, tmp_path):
    model = _model(tok)
    ar = AutoRound(model, tok, bits=4, group_size=32, **SMALL)
    report = ar.quantize()
    assert len(report.layers) == 14 and not report.skipped
    out = ar.save_quantized(tmp_path / "ckpt", inplace=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["packing_format"] == "auto_round:auto_gptq"
    reloaded = load_quantized(out)
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-4)
    with pytest.raises(ValueError, match="already quantized"):
        ar.quantize()


def test_layer_config_keeps_layers_fp_and_changes_bits(tok, tmp_path):
    model = _model(tok)
    cfg = {r"mlp\.down_proj": {"bits": 16}, "model.layers.0.self_attn.q_proj": {"bits": 8}}
    ar = AutoRound(model, tok, group_size=32, layer_config=cfg, **SMALL)
    report = ar.quantize()
    assert all("down_proj" in n for n in report.skipped)
    assert report.layers["model.layers.0.self_attn.q_proj"].spec == QuantSpec(bits=8, group_size=32)
    out = ar.save_quantized(tmp_path / "ckpt")
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert extra["model.layers.1.mlp.down_proj"] == {"bits": 16}


def test_layer_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "lc.json"
    bad.write_text('{"q_proj": {"bits": "four"}}')
    with pytest.raises(ValueError, match="lc.json"):
        read_layer_config(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_layer_config(bad)


def test_rtn_needs_no_data_and_matches_the_grid(tok):
    model = _model(tok)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    AutoRound(model, tok, group_size=32, recipe="rtn", progress=False).quantize()
    from signround.rounding import qdq

    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, qdq(w, QuantSpec(group_size=32)))


def test_output_dir_checks(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="overlaps the input model"):
        check_output_dir(model_dir, overwrite=True, protect=[model_dir])
    with pytest.raises(ValueError, match="overlaps"):
        check_output_dir(model_dir / "q", protect=[model_dir])
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(model_dir)
    assert check_output_dir(tmp_path / "new") == (tmp_path / "new").resolve()


def test_mllm_text_default_then_image_text_calibration():
    model, tok, proc = qwen2_vl_with_processor()
    vis_before = copy.deepcopy(model.model.visual.state_dict())
    # Default: text-only calibration of the text decoder; the vision tower is untouched.
    ar = AutoRoundMLLM(model, tok, processor=proc, group_size=32, **SMALL)
    assert "pixel_values" not in ar.calibration()[0]
    report = ar.quantize()
    assert report.block_name_to_quantize == ("model.language_model.layers",)
    assert all(torch.equal(vis_before[k], v) for k, v in model.model.visual.state_dict().items())
    # A dataset with images: image-text calibration through the processor (tokenizer.processor form).
    model2, tok2, proc2 = qwen2_vl_with_processor()
    tok2.processor = proc2
    ar2 = AutoRoundMLLM(model2, tok2, group_size=32, dataset="embedded", **{**SMALL, "seqlen": 256})
    batches = ar2.calibration()
    assert any("pixel_values" in b and "image_grid_thw" in b for b in batches)
    assert len({b["input_ids"].shape[1] for b in batches}) == 1  # one length for every batch
    report2 = ar2.quantize()
    assert report2.block_name_to_quantize == ("model.language_model.layers",)
    tuned = [b for b in report2.blocks if b.loss_tuned is not None]
    assert tuned and sum(b.loss_tuned for b in tuned) < sum(b.loss_rtn for b in tuned)


def test_vision_quantization_without_a_vision_block_list_is_refused():
    model, tok, proc = qwen2_vl_with_processor()
    with pytest.raises(ValueError, match="no vision block list to tune in this qwen2_vl"):
        AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True,
                      to_quant_block_names="model.language_model.layers", **SMALL)


def test_quant_nontext_module_tunes_vision_blocks(tmp_path):
    from signround.adapters.frontends.assets import build_demo_vlm, random_smollm2

    lm, tok = random_smollm2(num_layers=2)
    model, proc = build_demo_vlm(lm, tok)
    ar = AutoRoundMLLM(model, tok, processor=proc, group_size=64, quant_nontext_module=True,
                       **{**SMALL, "seqlen": 160})
    report = ar.quantize()
    assert report.block_name_to_quantize == ("model.vision_model.encoder.layers", "model.text_model.layers")
    assert any(n.startswith("model.vision_model.encoder.layers") for n in report.layers)
    out = ar.save_quantized(tmp_path / "vlm", inplace=False)
    reloaded = load_quantized(out)
    batch = ar.calibration()[0]
    with torch.no_grad():
        a = model(**batch).logits
        b = reloaded(**batch).logits
    assert torch.allclose(a, b, atol=1e-3)


def test_image_dataset_without_processor_is_refused(tmp_path):
    tok = byte_tokenizer([])
    model = tiny_vlm("qwen2_vl", vocab_size=len(tok))
    with pytest.raises(ValueError, match="processor"):
        AutoRoundMLLM(model, tok, dataset="embedded", **SMALL)


def test_nan_weights_are_refused_up_front(tok):
    model = _model(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        AutoRound(model, tok, **SMALL)


def test_nan_scales_are_never_saved(tok, tmp_path):
    model = _model(tok)
    ar = AutoRound(model, tok, group_size=32, recipe="rtn", progress=False)
    report = ar.quantize()
    name = next(iter(report.layers))
    report.layers[name].scale[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf quantization scales"):
        ar.save_quantized(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_of_memory_gives_options(tok, monkeypatch):
    import signround.adapters.frontends.facade as facade

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(facade, "quantize_model", oom)
    with pytest.raises(MemoryError, match="low_gpu_mem_usage.*gradient_accumulate_steps=2"):
        AutoRound(_model(tok), tok, **SMALL).quantize()


def test_unknown_family_warns_and_uses_the_generic_finder(tok):
    model = _model(tok)
    model.config.model_type = "my_new_llm"
    with pytest.warns(UserWarning, match="no registered block layout"):
        ar = AutoRound(model, tok, **SMALL)
    assert ar.block_names == ["model.layers"]


def test_nan_activations_stop_with_the_block_named(tok):
    model = _model(tok)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    ar = AutoRound(model, tok, group_size=32, **SMALL)
    with pytest.raises(FloatingPointError, match=r"block model\.layers\.1 .*NaN/Inf activations"):
        ar.quantize()
    assert ar.report is None


def test_progress_bar_and_summary_are_printed_by_the_facade(tok, capsys):
    ar = AutoRound(_model(tok), tok, group_size=32, **{**SMALL, "iters": 2, "progress": True})
    ar.quantize()
    err = capsys.readouterr().err
    assert "model.layers.0" in err and "model.layers.1" in err and "RTN" in err and "mean block loss" in err


def test_named_blocks_skip_discovery(tok, monkeypatch):
    import signround.adapters.hf.families as families

    def no_discovery(*args, **kwargs):
        raise AssertionError("block discovery ran although the blocks were named")

    monkeypatch.setattr(families, "find_block_lists", no_discovery)
    ar = AutoRound(_model(tok), tok, to_quant_block_names="model.layers", group_size=32, **SMALL)
    assert ar.block_names == ["model.layers"] and ar.config.block_names == ("model.layers",)
    assert len(ar.plan().quantize) == 14


def test_process_group_starts_in_quantize_and_ranks_are_checked_before_calibration(tok, monkeypatch):
    import signround.adapters.frontends.facade as facade
    from signround.adapters.engine.distributed import DataParallel

    started = []
    monkeypatch.setattr(facade.distributed, "from_env", lambda: started.append(1) or DataParallel(rank=0, world=8))
    ar = AutoRound(_model(tok), tok, group_size=32, **SMALL)  # batch_size 4: too small for 8 ranks
    assert not started

    def no_calibration():
        raise AssertionError("calibration data was read before the rank check")

    monkeypatch.setattr(ar, "calibration", no_calibration)
    with pytest.raises(ValueError, match="at least one sample per rank"):
        ar.quantize()
    assert started == [1] and ar.report is None


def test_config_is_one_frozen_value(tok):
    import attrs

    ar = AutoRound(_model(tok), tok, bits=3, group_size=32, layer_config={"q_proj": {"bits": 8}}, **SMALL)
    cfg = ar.config
    assert cfg.spec == QuantSpec(bits=3, group_size=32) and cfg.recipe.iters == 8 and cfg.recipe.seqlen == 32
    assert cfg.layer_config == {"q_proj": {"bits": 8}} and cfg.data.dataset is not None and not cfg.data.images
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.spec = QuantSpec()


def test_low_gpu_mem_usage_cuts_steps_on_an_accelerator_only(tok, monkeypatch):
    """low_gpu_mem_usage: sub-batches of ≤ 4096 tokens on an accelerator (the device is only
    resolved here, nothing runs on it), none on the CPU, and an explicit gradient_accumulate_steps
    is the user's choice."""
    import signround.adapters.frontends.facade as facade

    kw = dict(SMALL, seqlen=2048, batch_size=8, low_gpu_mem_usage=True)
    on_cpu = AutoRound(_model(tok), tok, **kw).config.recipe
    assert (on_cpu.batch_size, on_cpu.gradient_accumulate_steps) == (8, 1)
    monkeypatch.setattr(facade, "default_device", lambda: torch.device("cuda"))
    on_gpu = AutoRound(_model(tok), tok, **kw).config.recipe
    assert (on_gpu.batch_size, on_gpu.gradient_accumulate_steps) == (2, 4)
    chosen = AutoRound(_model(tok), tok, **kw, gradient_accumulate_steps=1).config.recipe
    assert (chosen.batch_size, chosen.gradient_accumulate_steps) == (8, 1)
    plain = AutoRound(_model(tok), tok, **dict(kw, low_gpu_mem_usage=False)).config.recipe
    assert (plain.batch_size, plain.gradient_accumulate_steps) == (8, 1)


def test_data_parallel_save_checks_every_rank_before_rank_0_writes(tok, tmp_path):
    """Two ranks (threads sharing one barrier) save one checkpoint; rank 1 reaches save_quantized late.
    Every rank checks the output before rank 0 writes, so the late rank does not find rank 0's new
    checkpoint there and refuse it (seen as a flaky torchrun test on a loaded machine)."""
    import threading
    import time

    from signround.adapters.engine.distributed import DataParallel

    barrier = threading.Barrier(2, timeout=60)

    class ThreadRank(DataParallel):
        def barrier(self) -> None:
            barrier.wait()

    out, errors = tmp_path / "ckpt", []
    ranks = []
    for rank in (0, 1):
        ar = AutoRound(_model(tok), tok, bits=4, group_size=32, **{**SMALL, "iters": 0})
        ar.quantize()
        ar._data_parallel = ThreadRank(rank=rank, world=2)
        ranks.append(ar)

    def save(ar, delay):
        time.sleep(delay)
        try:
            ar.save_quantized(out)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=save, args=(ranks[0], 0.0)), threading.Thread(target=save, args=(ranks[1], 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and (out / "config.json").is_file()
