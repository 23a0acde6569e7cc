"""8-bit and 4-bit loading (bitsandbytes' CPU backend): only the language model's layers are quantized."""

from __future__ import annotations

import pytest
import torch

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.quantization import flamingo_bnb_config

from reference import build_original, ours_from_original, random_pixels

PROMPTS = ["<image>Two cats.<|endofchunk|><image>A sink.<|endofchunk|><image>An image of", "<image>A dog runs"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    original, tokenizer = build_original("llama")
    model = ours_from_original(original, tokenizer, "llama")
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixels = random_pixels(2, 3)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
    return folder, tokenizer, batch, pixels, logits


@pytest.mark.parametrize("bits, max_relative_error", [(8, 0.05), (4, 0.5)])
def test_quantized_loading_keeps_vision_resampler_and_cross_attention(saved, bits, max_relative_error):
    folder, tokenizer, batch, pixels, reference = saved
    config = flamingo_bnb_config(bits, compute_dtype=torch.float32)
    model = FlamingoForConditionalGeneration.from_pretrained(folder, quantization_config=config, device_map="cpu")
    quantized = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]
    assert quantized and all(".decoder_layer." in n for n in quantized)
    assert all(
        isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32
        for m in model.perceiver.modules()
        if isinstance(m, torch.nn.Linear)
    )
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        tokens = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=pixels,
            max_new_tokens=4,
            pad_token_id=tokenizer.pad_token_id,
        )
    real = batch.attention_mask.bool()
    error = (logits - reference)[real].norm() / reference[real].norm()
    assert 0 < error < max_relative_error
    assert tokens.shape[1] > batch.input_ids.shape[1]


def test_bits_must_be_8_or_4():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        flamingo_bnb_config(3)
