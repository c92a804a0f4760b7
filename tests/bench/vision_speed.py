"""Issue 15's GPU speed measurement (not CI): a Qwen2-VL-2B-shaped model (real dims, random weights)
quantized with `quant_nontext_module=True` on image-text calibration at batch 8.

    python tests/bench/vision_speed.py --json out.json [--iters 50 --nsamples 32 --max-pixels 200704]

Prints and writes the time per vision block and per text block (the engine's per-block wall time:
capture excluded, the fp targets, RTN and tuned scoring passes and tuning included), the capture
and total time, the peak accelerator memory, and the patches per calibration image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/: the byte-level tokenizer
from _templating_helpers import byte_tokenizer  # noqa: E402

from signround import AutoRoundMLLM  # noqa: E402

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build(max_pixels: int, device: str, tiny: bool = False):  # type: ignore[no-untyped-def]
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = byte_tokenizer(SPECIALS)
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=True),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if tiny:  # a CPU dry run of the script
        cfg.text_config.update(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=512))
        cfg.text_config.rope_parameters["mrope_section"] = [8, 12, 12]
        cfg.vision_config.update(dict(depth=2, embed_dim=128, hidden_size=128, num_heads=2))
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return model, tok, proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="small dims: a CPU dry run of the script")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok, proc = build(args.max_pixels, args.device, args.tiny)
    built = time.perf_counter() - t0
    ar = AutoRoundMLLM(model, tok, processor=proc, quant_nontext_module=True, bits=4, group_size=128,
                       iters=args.iters, nsamples=args.nsamples, batch_size=args.batch_size, dataset="embedded",
                       max_pixels=args.max_pixels, device=args.device, progress=False)
    batches = ar.calibration()
    patches = [int(g.prod()) for b in batches for g in b.get("image_grid_thw", torch.zeros(0, 3))]
    t1 = time.perf_counter()
    report = ar.quantize()
    total = time.perf_counter() - t1
    vision = [b.seconds for b in report.blocks if b.name.startswith("model.visual.")]
    text = [b.seconds for b in report.blocks if b.name.startswith("model.language_model.")]
    out = {
        "model": "Qwen2-VL-2B-shaped (vision 32 x 1280, text 28 x 1536), random bf16 weights",
        "grid": "W4 G128 sym", "iters": args.iters, "nsamples": args.nsamples, "batch_size": args.batch_size,
        "max_pixels": args.max_pixels, "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "images": len(patches), "patches_per_image": {"min": min(patches), "max": max(patches),
                                                      "mean": statistics.mean(patches)} if patches else None,
        "seqlen": int(batches[0]["input_ids"].shape[1]),
        "seconds": {"build": round(built, 1), "quantize": round(total, 1), "blocks": round(sum(vision + text), 1),
                    "vision_block_mean": round(statistics.mean(vision), 3),
                    "vision_block_max": round(max(vision), 3), "text_block_mean": round(statistics.mean(text), 3),
                    "text_block_max": round(max(text), 3)},
        "vision_blocks": len(vision), "text_blocks": len(text),
        "peak_memory_gib": round(report.peak_memory_bytes / 2**30, 2) if report.peak_memory_bytes else None,
        "peak_memory_kind": report.peak_memory_kind,
        "vision_loss_rtn_sum": sum(b.loss_rtn or 0 for b in report.blocks if b.name.startswith("model.visual.")),
        "vision_loss_tuned_sum": sum(b.loss_tuned or 0 for b in report.blocks if b.name.startswith("model.visual.")),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
