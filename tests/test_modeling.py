"""Behaviour of FlamingoForConditionalGeneration beyond parity: inputs, errors, caching, saving, training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

from modeling_flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from modeling_flamingo.convert.mapping import flamingo_key
from modeling_flamingo.modeling_mosaic_gpt import CACHE_NAME
from modeling_flamingo.training import freeze_for_flamingo_training, mask_flamingo_labels

from reference import build_original, original_label_masking, ours_from_original, random_pixels

PROMPTS = ["<image>Two cats.<|endofchunk|><image>An image of", "<image>A dog runs after"]


@pytest.fixture(scope="module")
def setup():
    original, tokenizer = build_original("llama")
    model = ours_from_original(original, tokenizer, "llama")
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixels = random_pixels(2, 2)
    pixels[1, 1] = 0
    return original, model, tokenizer, batch, pixels


# --- inputs -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_precomputed_image_features_give_the_same_logits(setup):
    _, model, _, batch, pixels = setup
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels)
    assert out.image_features.shape == (
        2,
        2,
        model.config.perceiver_num_latents,
        model.config.vision_config.hidden_size,
    )
    again = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, image_features=out.image_features)
    torch.testing.assert_close(again.logits, out.logits, atol=0, rtol=0)
    generated = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        image_features=out.image_features,
        max_new_tokens=5,
    )
    expected = model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, max_new_tokens=5
    )
    assert torch.equal(generated, expected)


@torch.no_grad()
def test_incremental_decoding_with_cache_matches_full_forward(setup):
    _, model, tokenizer, batch, pixels = setup
    full_ids = torch.cat([batch.input_ids, torch.tensor([[40, 41], [42, 43]])], dim=1)
    full_mask = torch.cat([batch.attention_mask, torch.ones(2, 2, dtype=torch.long)], dim=1)
    full = model(input_ids=full_ids, attention_mask=full_mask, pixel_values=pixels).logits

    prompt_len = batch.input_ids.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, use_cache=True)
    assert out.cross_attention_key_values is not None
    logits = [out.logits]
    for step in range(2):
        new = full_ids[:, prompt_len + step : prompt_len + step + 1]
        out = model(
            input_ids=new,
            attention_mask=full_mask[:, : prompt_len + step + 1],
            past_key_values=out.past_key_values,
            image_features=out.image_features,
            cross_attention_key_values=out.cross_attention_key_values,
            image_indices=out.image_indices[:, -1:],
            use_cache=True,
        )
        logits.append(out.logits)
    real = full_mask.bool()
    torch.testing.assert_close(torch.cat(logits, dim=1)[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
@torch.no_grad()
def test_cache_is_accepted_under_either_name(setup, argument):
    """transformers >= 5.24 passes the cache to `forward` as `cache`, earlier releases as `past_key_values`: either
    name reaches the language model, and the output holds the cache under the installed release's name."""
    _, model, _, batch, pixels = setup
    full_ids = torch.cat([batch.input_ids, torch.tensor([[40], [42]])], dim=1)
    full_mask = torch.cat([batch.attention_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    full = model(input_ids=full_ids, attention_mask=full_mask, pixel_values=pixels).logits

    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, use_cache=True)
    cache = getattr(out, CACHE_NAME)
    step = model(
        input_ids=full_ids[:, -1:],
        attention_mask=full_mask,
        image_features=out.image_features,
        cross_attention_key_values=out.cross_attention_key_values,
        image_indices=out.image_indices[:, -1:],
        use_cache=True,
        **{argument: cache},
    )
    assert getattr(step, CACHE_NAME) is cache and cache.get_seq_length() == full_ids.shape[1]
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_generation_stops_at_end_of_chunk_by_default(setup):
    _, model, _, batch, pixels = setup
    eoc = model.config.eoc_token_id
    assert model.generation_config.eos_token_id == eoc
    # Make <|endofchunk|> the most likely next token whatever the input: generation must end right after it.
    head = model.get_output_embeddings()
    saved = head.weight[eoc].clone()
    head.weight[eoc] = (
        head.weight.abs().max()
        * 50
        * torch.sign(
            model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=pixels,
                output_hidden_states=True,
            )
            .hidden_states[-1][:, -1]
            .mean(0)
        )
    )
    try:
        out = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, max_new_tokens=10
        )
    finally:
        head.weight[eoc] = saved
    assert out.shape[1] == batch.input_ids.shape[1] + 1
    assert (out[:, -1] == eoc).all()


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


@torch.no_grad()
def test_streaming_yields_the_generated_tokens(setup):
    _, model, _, batch, pixels = setup
    streamer = _Collect()
    out = model.generate(
        input_ids=batch.input_ids[:1],
        attention_mask=batch.attention_mask[:1],
        pixel_values=pixels[:1],
        max_new_tokens=6,
        streamer=streamer,
    )
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks])
    assert streamer.ended
    assert torch.equal(streamed, out[0])


# --- bad input ----------------------------------------------------------------------------------------------------


def test_more_image_tokens_than_images_is_refused(setup):
    _, model, _, batch, pixels = setup
    with pytest.raises(ValueError, match=r"Sample 0 has 2 <image> tokens but only 1 images"):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels[:, :1])
    with pytest.raises(ValueError, match=r"Sample 0 has 2 <image> tokens but only 1 images"):
        model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels[:, :1])
    with pytest.raises(ValueError, match=r"no pixel_values or image_features"):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 42, 42), r"must have shape \(batch, images, frames, channels, height, width\)"),
        ((2, 2, 1, 3, 40, 42), r"must be 3x42x42 \(channels, height, width\); got 3x40x42"),
        ((2, 2, 1, 1, 42, 42), r"got 1x42x42"),
        ((2, 2, 2, 3, 42, 42), r"2 frames per image but this model accepts at most 1"),
    ],
)
def test_bad_pixel_values_are_refused(setup, shape, message):
    _, model, _, batch, _ = setup
    with pytest.raises(ValueError, match=message):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=torch.zeros(shape))


def test_bad_labels_and_argument_combinations_are_refused(setup):
    _, model, _, batch, pixels = setup
    with pytest.raises(ValueError, match=r"labels must have shape \(2, \d+\)"):
        model(input_ids=batch.input_ids, pixel_values=pixels, labels=batch.input_ids[:, 1:])
    with pytest.raises(ValueError, match="either pixel_values or image_features"):
        model(input_ids=batch.input_ids, pixel_values=pixels, image_features=torch.zeros(2, 2, 64, 64))
    with pytest.raises(ValueError, match="images for 1 samples but 2 input sequences"):
        model(input_ids=batch.input_ids, pixel_values=pixels[:1])
    out = model(input_ids=batch.input_ids, pixel_values=pixels, use_cache=True)
    with pytest.raises(ValueError, match="image_indices is required"):
        model(input_ids=batch.input_ids[:, :1], past_key_values=out.past_key_values, image_features=out.image_features)


# --- saving and loading -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_save_and_load_round_trip(setup, tmp_path):
    _, model, _, batch, pixels = setup
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, FlamingoConfig)
    assert config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    for loader in (FlamingoForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, FlamingoForConditionalGeneration)
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        actual = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert loaded.generation_config.eos_token_id == model.config.eoc_token_id


def test_several_frames_need_frame_embeddings():
    from modeling_flamingo.testing import tiny_flamingo_config

    config = tiny_flamingo_config("gpt_neox", max_num_frames=2)
    model = FlamingoForConditionalGeneration(config).eval()
    ids = torch.tensor([[config.media_token_id, 5, 6]])
    with torch.no_grad():
        two = model(input_ids=ids, pixel_values=torch.randn(1, 1, 2, 3, 42, 42)).logits
    assert two.shape == (1, 3, config.text_config.vocab_size)


# --- training -----------------------------------------------------------------------------------------------------


def test_freezing_reproduces_the_original_trainable_set(setup):
    original, model, _, _, _ = setup
    freeze_for_flamingo_training(model)
    try:
        ours = {name for name, p in model.named_parameters() if p.requires_grad}
        theirs = set()
        for name, p in original.named_parameters():
            if p.requires_grad and (mapped := flamingo_key(name)) is not None:
                theirs.add(mapped)
        assert ours == theirs
        assert any(".gated_cross_attn_layer." in n for n in ours) and any(n.startswith("perceiver.") for n in ours)
        assert "language_model.model.embed_tokens.weight" in ours
        freeze_for_flamingo_training(model, train_embeddings=False)
        assert "language_model.model.embed_tokens.weight" not in {
            n for n, p in model.named_parameters() if p.requires_grad
        }
    finally:
        model.requires_grad_(True)


def test_label_masking_matches_the_original_training_loop(setup):
    _, model, tokenizer, _, _ = setup
    texts = ["Intro text <image>A cat.<|endofchunk|> junk <image>A dog.<|endofchunk|> tail", "<image>Only one."]
    ids = tokenizer(texts, return_tensors="pt", padding=True).input_ids
    media, eoc, pad = model.config.media_token_id, model.config.eoc_token_id, tokenizer.pad_token_id
    assert torch.equal(
        mask_flamingo_labels(ids, pad, media, eoc, interleaved=True), original_label_masking(ids, pad, media, eoc)
    )
    simple = mask_flamingo_labels(ids, pad, media)
    expected = ids.clone()
    expected[(ids == pad) | (ids == media)] = -100
    assert torch.equal(simple, expected)


def test_loss_matches_the_original(setup):
    original, model, tokenizer, batch, pixels = setup
    labels = mask_flamingo_labels(batch.input_ids, tokenizer.pad_token_id, model.config.media_token_id)
    with torch.no_grad():
        expected = original(pixels, batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        actual = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, labels=labels
        ).loss
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    _, model, tokenizer, batch, pixels = setup
    labels = mask_flamingo_labels(batch.input_ids, tokenizer.pad_token_id, model.config.media_token_id)

    def grads():
        model.zero_grad()
        model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels, labels=labels
        ).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    freeze_for_flamingo_training(model)
    model.train()
    try:
        plain = grads()
        model.gradient_checkpointing_enable()
        assert all(block.gradient_checkpointing for block in model.gated_cross_attn_layers)
        checkpointed = grads()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.requires_grad_(True)
        model.zero_grad()
    assert plain.keys() == checkpointed.keys()
    assert any(n.startswith("perceiver.") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# --- numerical isolation: what is never attended cannot leak, even as NaN -------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("padding", [float("nan"), float("inf"), 1e30])
def test_padding_image_slots_are_never_read(setup, padding):
    _, model, _, batch, pixels = setup  # sample 1 has one image: its second slot is padding
    zero = pixels.clone()
    zero[1, 1] = 0
    garbage = pixels.clone()
    garbage[1, 1] = padding
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    expected = model(**kwargs, pixel_values=zero)
    assert torch.isfinite(expected.logits).all()
    assert torch.equal(model(**kwargs, pixel_values=garbage).logits, expected.logits)

    features = expected.image_features.clone()
    features[1, 1] = padding
    assert torch.equal(model(**kwargs, image_features=features).logits, expected.logits)
    # The decoding path (cached keys and values, one image kept per sample) too.
    generated = model.generate(**kwargs, pixel_values=garbage, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, model.generate(**kwargs, pixel_values=zero, max_new_tokens=4, do_sample=False))
    generated = model.generate(**kwargs, image_features=features, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, model.generate(**kwargs, pixel_values=zero, max_new_tokens=4, do_sample=False))


@torch.no_grad()
@pytest.mark.parametrize("immediate", [True, False])
def test_a_sample_without_images_ignores_the_batch_padding_slot(setup, tokenizer_prompts, immediate):
    original, model, tokenizer, _, _ = setup
    if not immediate:
        model = ours_from_original(original, tokenizer, "llama", only_attend_immediate_media=False)
    batch = tokenizer_prompts(["<image>A dog runs after", "Two people playing tennis"])
    pixels = random_pixels(2, 1)
    pixels[1] = float("nan")  # sample 1 has no <image>: its only slot is padding
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = model(**kwargs, pixel_values=pixels).logits
    alone = model(input_ids=batch.input_ids[1:], attention_mask=batch.attention_mask[1:]).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=0)  # a batch of one is computed differently
    generated = model.generate(**kwargs, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    pixels[1] = 0
    assert torch.equal(generated, model.generate(**kwargs, pixel_values=pixels, max_new_tokens=4, do_sample=False))


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_tokens_before_the_first_image_do_not_depend_on_any_image(setup, tokenizer_prompts, scale):
    # (Values so large that the tokens after the image overflow are out of reach: the language model's own
    # self-attention then spreads their NaN to every position, masked or not.)
    _, model, _, _, _ = setup
    batch = tokenizer_prompts(["A dog runs <image>after a red ball", "Two <image>people playing"])
    first = int((batch.input_ids[0] == model.config.media_token_id).nonzero()[0])
    kwargs = dict(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1])
    features = model(**kwargs, pixel_values=random_pixels(1, 1)).image_features
    base = model(**kwargs, image_features=features).logits
    other = model(**kwargs, image_features=torch.randn_like(features) * scale).logits
    assert torch.isfinite(other).all()
    assert torch.equal(other[:, :first], base[:, :first])
    assert not torch.equal(other[0, first:], base[0, first:])


@torch.no_grad()
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("immediate", [True, False])
def test_cross_attention_output_is_exactly_zero_for_tokens_without_an_image(setup, bad, immediate):
    # At the block level, whatever the image keys and values hold, a token with no image gets exactly zero: in the
    # prompt path (all images, masked) and in the decoding path (one token, the image gathered).
    _, model, _, _, _ = setup
    attn = model.gated_cross_attn_layers[0].attn
    attn.only_attend_immediate_media = immediate
    try:
        hidden = torch.randn(2, 5, model.config.text_config.hidden_size)
        key, value = attn.project_media(torch.randn(2, 3, 4, model.config.vision_config.hidden_size))
        key[1], value[1] = bad, bad  # sample 1 has no image: any values may sit in its slots
        indices = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
        out = attn(hidden, key, value, indices)
        assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2])) and torch.equal(out[1], torch.zeros_like(out[1]))
        step = attn(hidden[:, -1:], key, value, indices[:, -1:])
        assert torch.equal(step[1], torch.zeros_like(step[1]))
    finally:
        attn.only_attend_immediate_media = model.config.only_attend_immediate_media


@pytest.fixture(scope="module")
def tokenizer_prompts(setup):
    _, _, tokenizer, _, _ = setup

    def encode(prompts: list[str]):
        return tokenizer(prompts, return_tensors="pt", padding=True)

    return encode


# --- bad values: one ValueError naming the problem -----------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_an_attended_image_are_refused(setup, bad):
    _, model, _, batch, pixels = setup
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    broken = pixels.clone()
    broken[0, 1, 0, 2, 5, 7] = bad
    message = r"pixel_values of sample 0, image 1 \(0-based\) contain NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        model(**kwargs, pixel_values=broken)
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs, pixel_values=broken, max_new_tokens=2)
    features = model(**kwargs, pixel_values=pixels).image_features.clone()
    features[1, 0, 3, 1] = bad
    message = r"image_features of sample 1, image 0 \(0-based\) contain NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        model(**kwargs, image_features=features)
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs, image_features=features, max_new_tokens=2)


def test_empty_text_is_refused(setup):
    _, model, _, batch, pixels = setup
    empty = batch.input_ids[:, :0]
    for call in (model, model.generate):
        with pytest.raises(ValueError, match=r"The text input is empty \(shape \(2, 0\)\)"):
            call(input_ids=empty, pixel_values=pixels)
        with pytest.raises(ValueError, match=r"The text input is empty"):
            call(input_ids=empty, attention_mask=batch.attention_mask[:, :0])


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            (2, 64, 64),
            r"image_features must be resampler latents of shape \(batch, images, 64, 64\) .*got \(2, 64, 64\)",
        ),
        ((2, 2, 64, 32), r"got \(2, 2, 64, 32\)"),
        ((2, 2, 9, 64), r"got \(2, 2, 9, 64\)"),  # vision tokens instead of resampler latents
        ((2, 2, 1, 64, 64), r"got \(2, 2, 1, 64, 64\)"),
    ],
)
def test_image_features_of_the_wrong_shape_are_refused(setup, shape, message):
    _, model, _, batch, _ = setup
    for call in (model, model.generate):
        with pytest.raises(ValueError, match=message):
            call(input_ids=batch.input_ids, attention_mask=batch.attention_mask, image_features=torch.zeros(shape))


@torch.no_grad()
def test_image_features_are_cast_to_the_model_dtype(setup):
    _, model, _, batch, pixels = setup
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    expected = model(**kwargs, pixel_values=pixels)
    out = model(**kwargs, image_features=expected.image_features.double())
    torch.testing.assert_close(out.logits, expected.logits, atol=0, rtol=0)
    half = expected.image_features.half()
    assert torch.equal(
        model(**kwargs, image_features=half).logits, model(**kwargs, image_features=half.float()).logits
    )
    generated = model.generate(**kwargs, image_features=expected.image_features.double(), max_new_tokens=3)
    assert torch.equal(generated, model.generate(**kwargs, pixel_values=pixels, max_new_tokens=3))
    with pytest.raises(ValueError, match="image_features must be a floating-point tensor; got torch.int64"):
        model(**kwargs, image_features=expected.image_features.long())


@pytest.mark.parametrize("token", [-1, 10_000])
def test_token_ids_outside_the_vocabulary_are_refused(setup, token):
    _, model, _, batch, pixels = setup
    ids = batch.input_ids.clone()
    ids[1, -2] = token
    vocab = model.get_input_embeddings().weight.shape[0]
    message = rf"Sample 1 has token id {token}, outside the vocabulary of {vocab} tokens \(ids 0 to {vocab - 1}\)"
    for call in (model, model.generate):
        with pytest.raises(ValueError, match=message):
            call(input_ids=ids, attention_mask=batch.attention_mask, pixel_values=pixels)
    with pytest.raises(ValueError, match=message):  # text only
        model(input_ids=ids[:, -3:])


def test_an_all_zero_attention_mask_row_is_refused(setup):
    _, model, _, batch, pixels = setup
    mask = batch.attention_mask.clone()
    mask[1] = 0
    for call in (model, model.generate):
        with pytest.raises(ValueError, match=r"The attention_mask of sample 1 is all zeros"):
            call(input_ids=batch.input_ids, attention_mask=mask, pixel_values=pixels)
