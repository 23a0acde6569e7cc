"""Compiled decoding: `generate(cache_implementation="static", compile_config=...)` gives the tokens of eager decoding,
with the whole decoding step (cross-attention blocks included) captured in one graph that later steps reuse."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

from reference import build_original, ours_from_original, random_pixels

PROMPTS = ["<image>Two cats.<|endofchunk|><image>An image of", "<image>A dog runs"]
NEW_TOKENS = 6


def _compile_config() -> CompileConfig:
    # fullgraph: any graph break (ours or the language model's) raises instead of silently splitting the step.
    # aot_eager traces through AOTAutograd as inductor does, without its minutes of C++ compilation on a CPU;
    # benchmarks/bench_generation.py --compile runs inductor and compares its tokens too.
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told otherwise
    return config


# The families whose language model decodes under torch.compile with a static cache. transformers' MptAttention
# slices its ALiBi bias by `cache.get_seq_length()`, a data-dependent size dynamo cannot trace in one graph (the bare
# MptForCausalLM fails the same way); MosaicGPT has no static cache.
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_compiled_static_cache_decoding_matches_eager_in_one_graph(family):
    original, tokenizer = build_original(family)
    model = ours_from_original(original, tokenizer, family)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixels = random_pixels(2, 2)
    pixels[1, 1:] = 0
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=pixels,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        cache_implementation="static",
    )
    eager = model.generate(**kwargs)

    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(**kwargs, compile_config=_compile_config())
    assert torch.equal(compiled, eager)
    # The prefill runs eagerly; the NEW_TOKENS - 1 decoding steps run one compiled graph, captured once.
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    calls = counters["stats"]["calls_captured"]

    # A second generate (new cache, new conditioning, other images) reuses the graph: no recompilation.
    again = model.generate(**{**kwargs, "pixel_values": pixels.flip(0)}, compile_config=_compile_config())
    assert torch.equal(again, model.generate(**{**kwargs, "pixel_values": pixels.flip(0)}))
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] == calls
