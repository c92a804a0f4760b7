"""llama.cpp loads our GGUF and decodes what our model decodes (not a CI test: llama-cpp-python
builds from source, ~10 min on 2 cores, in its own venv). Results: spec/format.md, "GGUF".

    .venv/bin/python tests/checkpoint/llama_cpp_check.py write /tmp/llcpp qwen2 q4_0   # signround's venv
    /tmp/llama-venv/bin/python tests/checkpoint/llama_cpp_check.py run /tmp/llcpp qwen2 q4_0
    .venv/bin/python tests/checkpoint/llama_cpp_check.py write /tmp/llcpp smollm2 q4_k_m  # real weights

`write`: a tiny model (hidden 128, 2 layers) with a byte-level BPE tokenizer trained on the shared
eval text, RTN at the type's grid, exported as gguf:<type>, plus our greedy continuation of a
prompt. The k-quant types (q2_k_s, q3_k_s, q3_k_m, q4_k_m, q5_k_s, q5_k_m) use hidden 256 (a 256-weight super-block per row
segment), 4 layers and llama.cpp's mix (`gguf.llama_cpp_mix`); as their blocks re-quantize
SignRound's grid, `write` also records the continuation of our model holding the re-quantized
weights (what the file claims), and `run` compares llama.cpp with both. `run`: llama.cpp tokenizes
the prompt, evaluates it and greedy-decodes 8 tokens; prints both, and exits 1 when llama.cpp
differs from the weights the file holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPT = "The history of the"


def write(root: Path, family: str, qtype: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoint_helpers import rtn_state
    from tiny_models import tiny_text_model

    from signround.adapters.checkpoint.export import save_quantized
    from signround.adapters.checkpoint.formats import GGUF_KBASE, GGUF_KFORMATS, GGUF_KTYPES, GGUF_TYPES
    from signround.adapters.checkpoint.gguf import llama_cpp_mix
    from signround.rounding import QuantSpec

    text = (Path(__file__).resolve().parents[3] / "shared/data/wiki-eval.txt").read_text()[:200_000]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    k = qtype in GGUF_KFORMATS
    dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4) if k else dict(hidden_size=128,
                                                                                          intermediate_size=256)
    model = tiny_text_model(family, vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False, **dims)
    if k:  # the format's base k type (its grid); llama.cpp's mix raises some layers above it
        bits, sym, group = GGUF_KTYPES[GGUF_KBASE[qtype]]
        base = QuantSpec(bits, group, sym)
    else:
        bits, sym = GGUF_TYPES[qtype]
        base = QuantSpec(bits, 32, sym)
    mix = llama_cpp_mix(f"gguf:{qtype}", model) if k else {}
    results = rtn_state(model, base, override={n: QuantSpec(**g) for n, g in mix.items()})
    out = root / f"{family}-{qtype}"
    save_quantized(model, results, out, format=f"gguf:{qtype}", inplace=False, tokenizer=tok, overwrite=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    record = {"prompt_ids": ids[0].tolist(), "greedy": _greedy(model, ids), "logits": _last_logits(model, ids)}
    if k:  # the weights the file holds: each k layer dequantized as ggml does
        from signround.adapters.checkpoint.formats import gguf_type
        from signround.adapters.checkpoint.gguf import encode_kquant
        from signround.rounding.grid import QuantizedWeight, from_groups, quantize_codes, to_groups

        with torch.no_grad():
            for name, r in results.items():
                lin = model.get_submodule(name)
                codes = quantize_codes(to_groups(lin.weight, r.spec.group_size), r.scale.float(), r.zero.float(), r.spec)
                qw = QuantizedWeight(from_groups(codes, lin.in_features).int(), r.scale, r.zero, r.spec)
                t = gguf_type(f"gguf:{qtype}", qw.spec, lin.in_features)
                if t in GGUF_KTYPES:  # the exact 32-weight types hold the grid as it is
                    lin.weight.copy_(torch.from_numpy(encode_kquant(qw, t).dequantized))
        record["greedy_file_weights"] = _greedy(model, ids)
        record["logits_file_weights"] = _last_logits(model, ids)
    (out / "ours.json").write_text(json.dumps(record))


def smollm2(root: Path, qtype: str) -> None:
    """SmolLM2-135M's real weights (`assets.load_smollm2`): the error each k type adds to SignRound's
    grid on every decoder Linear (its first multiple-of-256 columns), then gguf:<qtype> with
    llama.cpp's mix, and perplexity of the float model, SignRound's grid (RTN) and the weights the
    file holds; `run ROOT smollm2 <qtype>` then decodes it with llama.cpp."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoint_helpers import rtn_state

    from signround.adapters.checkpoint.export import save_quantized
    from signround.adapters.checkpoint.formats import GGUF_KBASE, GGUF_KTYPES, gguf_type
    from signround.adapters.checkpoint.gguf import encode_kquant, llama_cpp_mix
    from signround.adapters.frontends.assets import load_smollm2
    from signround.adapters.frontends.evaluate import perplexity
    from signround.rounding import QuantSpec
    from signround.rounding.grid import QuantizedWeight, from_groups, quantize_codes, quantize_weight, to_groups

    model, tok = load_smollm2()
    model.eval()
    stats = {}
    for t, (bits, sym, group) in GGUF_KTYPES.items():
        spec, err, norm, own, wnorm, changed, count = QuantSpec(bits, group, sym), 0.0, 0.0, 0.0, 0.0, 0.0, 0
        for name, lin in model.named_modules():
            if not (isinstance(lin, torch.nn.Linear) and ".layers." in name):
                continue
            w = lin.weight.detach()[:, : lin.in_features // 256 * 256].float()
            qw = quantize_weight(w, spec)
            ours = qw.dequantize().numpy()
            kb = encode_kquant(qw, t)
            err += float(((kb.dequantized - ours) ** 2).sum())
            norm += float((ours ** 2).sum())
            own += float(((ours - w.numpy()) ** 2).sum())
            wnorm += float((w.numpy() ** 2).sum())
            changed, count = changed + kb.codes_changed * w.numel(), count + w.numel()
        stats[t] = {"grid": f"W{bits} {'sym' if sym else 'asym'} g{group}", "requant_rel_mse": err / norm,
                    "signround_rtn_rel_mse": own / wnorm, "codes_changed": changed / count}
    print(json.dumps({"weights": stats}, indent=1))

    text = (Path(__file__).resolve().parents[3] / "shared/data/wiki-eval.txt").read_text()
    ids_all = tok(text, return_tensors="pt").input_ids[0]
    ppl = {"float": perplexity(model, ids_all, seqlen=512, max_windows=16)}
    bits, sym, group = GGUF_KTYPES[GGUF_KBASE[qtype]]
    base = QuantSpec(bits, group, sym)
    mix = llama_cpp_mix(f"gguf:{qtype}", model)
    results = rtn_state(model, base, override={n: QuantSpec(**g) for n, g in mix.items()})
    ppl["signround_grid_rtn"] = perplexity(model, ids_all, seqlen=512, max_windows=16)
    out = root / f"smollm2-{qtype}"
    save_quantized(model, results, out, format=f"gguf:{qtype}", inplace=False, tokenizer=tok, overwrite=True)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    record = {"prompt_ids": prompt[0].tolist(), "greedy": _greedy(model, prompt), "logits": _last_logits(model, prompt)}
    types: dict[str, int] = {}
    with torch.no_grad():
        for name, r in results.items():
            lin = model.get_submodule(name)
            t = gguf_type(f"gguf:{qtype}", r.spec, lin.in_features)
            types[t] = types.get(t, 0) + 1
            if t in GGUF_KTYPES:
                codes = quantize_codes(to_groups(lin.weight, r.spec.group_size), r.scale.float(), r.zero.float(), r.spec)
                qw = QuantizedWeight(from_groups(codes, lin.in_features).int(), r.scale, r.zero, r.spec)
                lin.weight.copy_(torch.from_numpy(encode_kquant(qw, t).dequantized))
    ppl["file_weights"] = perplexity(model, ids_all, seqlen=512, max_windows=16)
    record.update(greedy_file_weights=_greedy(model, prompt), logits_file_weights=_last_logits(model, prompt))
    (out / "ours.json").write_text(json.dumps(record))
    print(json.dumps({"types": types, "perplexity_16x512": ppl}))


def idefics3_model():  # type: ignore[no-untyped-def]
    """A tiny Idefics3 (SmolVLM's family): SigLIP tower 2 × 64 wide on 32 × 32 images (16 patches,
    4 tokens after the scale-2 pixel shuffle), a llama text decoder 2 × 128, byte-level BPE."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, PreTrainedTokenizerFast)

    specials = ["<|endoftext|>", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the cat sat on the mat " * 20], trainers.BpeTrainer(  # llama.cpp needs merges
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(ip, tok, image_seq_len=4)
    torch.manual_seed(0)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), max_position_embeddings=1024, hidden_size=128,
                         intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    return tok, proc, Idefics3ForConditionalGeneration(cfg).eval()


def mmproj(root: Path) -> None:
    """`write ROOT idefics3 q4_0`: the tiny Idefics3 as model-q4_0.gguf + mmproj-model-f16.gguf, a
    32 × 32 image, and our image embeddings (tower + connector) for it."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoint_helpers import rtn_state

    from signround.adapters.checkpoint.export import save_quantized
    from signround.rounding import QuantSpec

    tok, proc, model = idefics3_model()
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = root / "idefics3-q4_0"
    save_quantized(model, results, out, format="gguf:q4_0", inplace=False, processor=proc, overwrite=True)
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (out / "image.rgb").write_bytes(rgb.tobytes())
    pixels = proc.image_processor(Image.fromarray(rgb), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embd = model.model.get_image_features(pixel_values=pixels)  # [batch, images, 3, H, W]
    embd = torch.cat(list(embd.pooler_output))  # the connector's output, one [tokens, hidden] per image
    (out / "ours.json").write_text(json.dumps({"embd": torch.as_tensor(embd).float().reshape(-1).tolist(),
                                               "n_tokens": int(torch.as_tensor(embd).reshape(-1, 128).shape[0])}))


def run_mmproj(root: Path) -> int:
    """llama.cpp's mtmd loads the mmproj with the text model, encodes the image; its embeddings vs ours."""
    import ctypes

    import numpy as np
    from llama_cpp import Llama, mtmd_cpp

    out = root / "idefics3-q4_0"
    ours = json.loads((out / "ours.json").read_text())
    llm = Llama(model_path=str(out / "model-q4_0.gguf"), n_ctx=256, n_threads=2, verbose=False)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads = False, 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(out / "mmproj-model-f16.gguf").encode(), llm.model, params)
    if not ctx:
        print(json.dumps({"mmproj_loads": False}))
        return 1
    data = (out / "image.rgb").read_bytes()
    bitmap = mtmd_cpp.mtmd_bitmap_init(32, 32, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
    text = mtmd_cpp.mtmd_input_text()
    prompt = mtmd_cpp.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), False, True
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    rc = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    images = [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
    images = [c for c in images if mtmd_cpp.mtmd_input_chunk_get_type(c) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(images[0])
    rc2 = mtmd_cpp.mtmd_encode_chunk(ctx, images[0])
    theirs = np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n_tokens * 128,)).copy()
    mine = np.asarray(ours["embd"], np.float32)
    same_shape = theirs.shape == mine.shape
    gap = float(np.abs(theirs - mine).max()) if same_shape else None
    cos = float(theirs @ mine / np.linalg.norm(theirs) / np.linalg.norm(mine)) if same_shape else None
    ok = rc == 0 and rc2 == 0 and same_shape and gap is not None and gap < 1e-2 * float(np.abs(mine).max())
    print(json.dumps({"mmproj_loads": True, "vision": bool(mtmd_cpp.mtmd_support_vision(ctx)), "image_chunks": len(images),
                      "n_tokens": n_tokens, "ours_n_tokens": ours["n_tokens"], "max_abs_gap": gap,
                      "max_abs_ours": float(np.abs(mine).max()), "cosine": cos, "same": ok}))
    return 0 if ok else 1


def _last_logits(model, ids) -> list[float]:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        return model(ids).logits[0, -1].tolist()


def _greedy(model, ids) -> list[int]:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    return gen[0, ids.shape[1]:].tolist()


def run(root: Path, family: str, qtype: str) -> int:
    import numpy as np
    from llama_cpp import Llama

    out = root / f"{family}-{qtype}"
    ours = json.loads((out / "ours.json").read_text())
    llm = Llama(model_path=str(out / f"model-{qtype}.gguf"), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.eval(ours["prompt_ids"])
    last = np.asarray(llm.scores[llm.n_tokens - 1])
    gap = {key: float(np.abs(last - np.asarray(ours[key])).max()) for key in ("logits", "logits_file_weights")
           if key in ours}
    greedy = []
    for _ in range(8):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    held = ours.get("greedy_file_weights", ours["greedy"])
    same = ids == ours["prompt_ids"] and greedy == held
    print(json.dumps({"family": family, "type": qtype, "tokenize_same": ids == ours["prompt_ids"],
                      "llama_cpp": greedy, "ours": ours["greedy"], "ours_file_weights": held,
                      "same_as_signround_grid": greedy == ours["greedy"], "max_abs_logit_gap": gap, "same": same}))
    return 0 if same else 1


if __name__ == "__main__":
    mode, root, family, qtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    if mode == "write" and family == "smollm2":
        smollm2(root, qtype)
    elif mode == "write" and family == "idefics3":
        mmproj(root)
    elif family == "idefics3":
        sys.exit(run_mmproj(root))
    elif mode == "write":
        write(root, family, qtype)
    else:
        sys.exit(run(root, family, qtype))
