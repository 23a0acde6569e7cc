"""Beam search and `num_return_sequences` prefill each prompt once: the same tokens as transformers' own path,
which repeats every prompt to all its beams (or returned sequences) before the prefill."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from test_families import Family
from transformers import GenerationMixin

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.testing import EXTRA_FAMILIES, FAMILIES

from reference import build_original, ours_from_original, random_pixels

# Left padding: the second prompt is shorter, and has one image where the first has three.
PROMPTS = ["<image>Two cats.<|endofchunk|><image>A sink.<|endofchunk|><image>An image of", "<image>A dog runs"]

# (generate kwargs, images given as, rows per prompt). Every case returns scores, so each step is compared too.
CASES = {
    "beam": (dict(num_beams=3), "pixel_values", 3),
    "beam-return-2": (dict(num_beams=3, num_return_sequences=2), "image_features", 3),
    "sample-return-3": (dict(do_sample=True, num_return_sequences=3, top_k=20), "image_features", 3),
    "beam-sample": (dict(do_sample=True, num_beams=2), "pixel_values", 2),
}


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    original, tokenizer = build_original(request.param)
    model = ours_from_original(original, tokenizer, request.param)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixels = random_pixels(2, 3)
    pixels[1, 1:] = 0  # padding slots of the second sample
    return model, tokenizer, batch, pixels


def _generate(model, tokenizer, batch, images: dict, reference: bool, **kwargs):
    """`generate` with a seed; `reference=True` restores transformers' expansion of every input before the prefill.

    Returns the output and the number of rows of each language model call.
    """
    rows = []
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, call: rows.append(call["input_ids"].shape[0]), with_kwargs=True
    )
    expand = GenerationMixin._expand_inputs_for_generation
    patch = mock.patch.object(FlamingoForConditionalGeneration, "_expand_inputs_for_generation", expand)
    try:
        with patch if reference else mock.MagicMock():
            torch.manual_seed(0)
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=8,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,  # MosaicGPT's configs say False (its training default)
                return_dict_in_generate=True,
                output_scores=True,
                **images,
                **kwargs,
            )
    finally:
        hook.remove()
    return out, rows


def _assert_same(shared, reference):
    assert torch.equal(shared.sequences, reference.sequences)
    for ours, theirs in zip(shared.scores, reference.scores, strict=True):
        # Rows of 2 prompts against rows of 6: the matrix products round differently in the last bits.
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_each_prompt_is_prefilled_once_with_the_same_tokens(setup, case):
    model, tokenizer, batch, pixels = setup
    kwargs, images, repeats = CASES[case]
    given = (
        {"pixel_values": pixels} if images == "pixel_values" else {"image_features": model.get_image_features(pixels)}
    )
    shared, rows = _generate(model, tokenizer, batch, given, reference=False, **kwargs)
    reference, reference_rows = _generate(model, tokenizer, batch, given, reference=True, **kwargs)
    assert rows[0] == 2 and reference_rows[0] == 2 * repeats  # the prefill
    assert set(rows[1:]) == set(reference_rows[1:]) == {2 * repeats}  # the steps
    _assert_same(shared, reference)


def test_text_only_prompts_and_returned_hidden_states(setup):
    model, tokenizer, _, _ = setup
    batch = tokenizer(["A dog runs after a red", "Two cats"], return_tensors="pt", padding=True)
    kwargs = dict(num_beams=2, output_hidden_states=True)
    shared, rows = _generate(model, tokenizer, batch, {}, reference=False, **kwargs)
    reference, _ = _generate(model, tokenizer, batch, {}, reference=True, **kwargs)
    assert rows[0] == 2
    _assert_same(shared, reference)
    for ours, theirs in zip(shared.hidden_states[0], reference.hidden_states[0], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_static_cache_prefills_every_row_as_before(setup):
    """The shared prefill needs a cache that grows along the batch; a preallocated one keeps transformers' path."""
    model, tokenizer, batch, pixels = setup
    kwargs = dict(num_beams=2, cache_implementation="static")
    shared, rows = _generate(model, tokenizer, batch, {"pixel_values": pixels}, reference=False, **kwargs)
    reference, _ = _generate(model, tokenizer, batch, {"pixel_values": pixels}, reference=True, **kwargs)
    assert rows[0] == 4
    assert torch.equal(shared.sequences, reference.sequences)


def test_under_a_device_map(setup, tmp_path):
    model, tokenizer, batch, pixels = setup
    model.save_pretrained(tmp_path / "model")
    # A few MB of CPU memory: Accelerate offloads the rest to disk and runs every module under its hooks.
    mapped = FlamingoForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "5MB"}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in set(mapped.hf_device_map.values())
    shared, rows = _generate(mapped, tokenizer, batch, {"pixel_values": pixels}, reference=False, num_beams=3)
    reference, _ = _generate(model, tokenizer, batch, {"pixel_values": pixels}, reference=True, num_beams=3)
    assert rows[0] == 2
    _assert_same(shared, reference)


@pytest.mark.parametrize("name", EXTRA_FAMILIES)
def test_newer_language_models(name):
    """The families found through `get_decoder()` (no original to build them from): open gates, so the images
    matter, left padding, beams with two returned sequences each."""
    family = Family(name)
    batch = family.encode(PROMPTS)
    pixels = batch.pop("pixel_values")
    batch = SimpleNamespace(**batch)  # attribute access, as a tokenizer's BatchEncoding gives
    kwargs = dict(num_beams=3, num_return_sequences=2)
    shared, rows = _generate(family.opened, family.tokenizer, batch, {"pixel_values": pixels}, False, **kwargs)
    reference, _ = _generate(family.opened, family.tokenizer, batch, {"pixel_values": pixels}, True, **kwargs)
    assert rows[0] == 2
    _assert_same(shared, reference)
