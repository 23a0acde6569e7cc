"""Parity with the original OpenFlamingo (open-flamingo 2.0.1 on open_clip 2.20), every language model family.

Each test builds the original with its own `create_model_and_transforms` from tiny random parts, copies the weights
into our model, and compares logits (fp32, 1e-4) and generated tokens on a left-padded batch of two prompts with
different image counts.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

from modeling_flamingo.testing import FAMILIES

from reference import build_original, ours_from_original, random_pixels

PROMPTS = [
    "<image>Two cats.<|endofchunk|><image>A sink.<|endofchunk|><image>An image of",
    "<image>A dog runs after",
]
NUM_IMAGES = [3, 1]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    family = request.param
    original, tokenizer = build_original(family)
    ours = ours_from_original(original, tokenizer, family)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixels = random_pixels(2, max(NUM_IMAGES))
    pixels[1, 1:] = 0  # the second sample has one image: the rest is padding, as the processor pads
    return family, original, ours, tokenizer, batch, pixels


def test_reference_uses_training_time_open_clip():
    # open_clip >= 2.23 layer-normalises the tokens it returns; OpenFlamingo was trained on the raw ones.
    assert version("open_clip_torch") == "2.20.0"


def test_prompts_are_left_padded_with_different_image_counts(pair):
    _, _, ours, tokenizer, batch, _ = pair
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[0].all()
    counts = (batch.input_ids == ours.config.media_token_id).sum(1).tolist()
    assert counts == NUM_IMAGES


@torch.no_grad()
def test_logits_match(pair):
    _, original, ours, _, batch, pixels = pair
    expected = original(pixels, batch.input_ids, attention_mask=batch.attention_mask).logits
    actual = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_logits_match_with_five_dim_pixel_values(pair):
    _, original, ours, _, batch, pixels = pair
    expected = original(pixels, batch.input_ids, attention_mask=batch.attention_mask).logits
    actual = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels[:, :, 0]).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_matches(pair, num_beams, cache):
    _, original, ours, tokenizer, batch, pixels = pair
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = original.generate(pixels, batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    if cache == "static":  # our language model cache may be preallocated: the tokens stay the original's
        kwargs["cache_implementation"] = "static"
    actual = ours.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, **kwargs
    )
    assert actual.shape[1] > batch.input_ids.shape[1]
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_sampling_matches(pair):
    _, original, ours, tokenizer, batch, pixels = pair
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(123)
    expected = original.generate(pixels, batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    torch.manual_seed(123)
    actual = ours.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, **kwargs
    )
    assert torch.equal(actual, expected)


@torch.no_grad()
def test_text_only_prompt_matches_original_without_image_tokens(pair):
    # The original always needs vision_x; with no <image> token every token's cross-attention output is zero, while
    # the cross-attention feed-forward still runs. Ours takes no images at all for the same result.
    _, original, ours, tokenizer, _, pixels = pair
    batch = tokenizer(["A dog runs after a red", "Two people playing"], return_tensors="pt", padding=True)
    expected = original(pixels, batch.input_ids, attention_mask=batch.attention_mask).logits
    actual = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)
    kwargs = dict(max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    expected_ids = original.generate(pixels, batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    actual_ids = ours.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    assert torch.equal(actual_ids, expected_ids)


# --- the comparisons above can fail: each ingredient they check changes the numbers --------------------------------


@torch.no_grad()
def test_each_token_sees_its_own_image_only(pair):
    _, _, ours, _, batch, pixels = pair
    base = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
    # The padding images of sample 1 are never attended.
    changed = pixels.clone()
    changed[1, 1:] = torch.randn_like(changed[1, 1:])
    same = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=changed).logits
    torch.testing.assert_close(same, base, atol=1e-6, rtol=0)
    # Sample 0's third image changes the tokens from the third <image> on, and nothing before it.
    changed = pixels.clone()
    changed[0, 2] = torch.randn_like(changed[0, 2])
    other = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=changed).logits
    third = int((batch.input_ids[0] == ours.config.media_token_id).nonzero()[2])
    torch.testing.assert_close(other[0, :third], base[0, :third], atol=1e-6, rtol=0)
    assert (other[0, third:] - base[0, third:]).abs().max() > 1e-3


@torch.no_grad()
def test_padding_slots_are_never_read_bit_for_bit(pair):
    # Whatever sample 1's padding slots hold (NaN here), its logits and tokens are those of zero padding, exactly:
    # the slots are replaced by zeros before any attention reads them, in every language model family.
    _, _, ours, tokenizer, batch, pixels = pair
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    nan = pixels.clone()
    nan[1, 1:] = float("nan")
    assert torch.equal(ours(**kwargs, pixel_values=nan).logits, ours(**kwargs, pixel_values=pixels).logits)
    generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(
        ours.generate(**kwargs, pixel_values=nan, **generate), ours.generate(**kwargs, pixel_values=pixels, **generate)
    )


@torch.no_grad()
def test_attending_to_all_previous_images_would_be_caught(pair):
    family, original, _, tokenizer, batch, pixels = pair
    wrong = ours_from_original(original, tokenizer, family, only_attend_immediate_media=False)
    expected = original(pixels, batch.input_ids, attention_mask=batch.attention_mask).logits
    actual = wrong(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
    assert (actual[0] - expected[0]).abs().max() > 1e-3


@torch.no_grad()
def test_normalised_vision_tokens_would_be_caught(pair):
    # open_clip >= 2.23 feeds post-LayerNorm tokens: the resampler output then differs.
    _, _, ours, _, _, pixels = pair
    flat = pixels[:, :, 0].reshape(-1, *pixels.shape[-3:])
    tokens = ours.vision_encoder(pixel_values=flat).last_hidden_state[:, 1:]
    normed = ours.vision_encoder.post_layernorm(tokens)
    raw = ours.perceiver(tokens.reshape(2, 3, 1, *tokens.shape[1:]))
    post = ours.perceiver(normed.reshape(2, 3, 1, *tokens.shape[1:]))
    torch.testing.assert_close(raw, ours.get_image_features(pixels), atol=1e-6, rtol=0)
    assert (raw - post).abs().max() > 1e-2
