"""llama.cpp loads our GGUF and decodes what our model decodes (not a CI test: llama-cpp-python
builds from source, ~10 min on 2 cores, in its own venv). Results: spec/format.md, "GGUF".

    .venv/bin/python tests/checkpoint/llama_cpp_check.py write /tmp/llcpp qwen2 q4_0   # signround's venv
    /tmp/llama-venv/bin/python tests/checkpoint/llama_cpp_check.py run /tmp/llcpp qwen2 q4_0

`write`: a tiny model (hidden 128, 2 layers) with a byte-level BPE tokenizer trained on the shared
eval text, RTN at the type's grid, exported as gguf:<type>, plus our greedy continuation of a
prompt. `run`: llama.cpp tokenizes the prompt, evaluates it and greedy-decodes 8 tokens; prints
both, and exits 1 when they differ.
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
    from signround.adapters.checkpoint.formats import GGUF_TYPES
    from signround.rounding import QuantSpec

    text = (Path(__file__).resolve().parents[3] / "shared/data/wiki-eval.txt").read_text()[:200_000]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    bits, sym = GGUF_TYPES[qtype]
    torch.manual_seed(0)
    model = tiny_text_model(family, vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, tie_word_embeddings=False)
    results = rtn_state(model, QuantSpec(bits, 32, sym))
    out = root / f"{family}-{qtype}"
    save_quantized(model, results, out, format=f"gguf:{qtype}", inplace=False, tokenizer=tok, overwrite=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    (out / "ours.json").write_text(json.dumps({"prompt_ids": ids[0].tolist(), "greedy": gen[0, ids.shape[1]:].tolist()}))


def run(root: Path, family: str, qtype: str) -> int:
    import numpy as np
    from llama_cpp import Llama

    out = root / f"{family}-{qtype}"
    ours = json.loads((out / "ours.json").read_text())
    llm = Llama(model_path=str(out / f"model-{qtype}.gguf"), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.eval(ours["prompt_ids"])
    greedy = []
    for _ in range(8):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    same = ids == ours["prompt_ids"] and greedy == ours["greedy"]
    print(json.dumps({"family": family, "type": qtype, "tokenize_same": ids == ours["prompt_ids"],
                      "llama_cpp": greedy, "ours": ours["greedy"], "same": same}))
    return 0 if same else 1


if __name__ == "__main__":
    mode, root, family, qtype = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    if mode == "write":
        write(root, family, qtype)
    else:
        sys.exit(run(root, family, qtype))
