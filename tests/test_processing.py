"""Tests of FlamingoImageProcessor (parity with open_clip 2.20's eval transform) and FlamingoProcessor."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers import AutoImageProcessor, AutoProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from modeling_flamingo.configuration import FlamingoConfig
from modeling_flamingo.processing import FlamingoImageProcessor, FlamingoProcessor
from modeling_flamingo.testing import make_tiny_tokenizer

EOC, MEDIA, PAD = "<|endofchunk|>", "<image>", "<PAD>"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _rgba(width: int, height: int) -> Image.Image:
    rng = _rng(1)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    # alpha varies smoothly plus noise, so premultiplied resizing and the missing white compositing both show
    ramp = np.linspace(0, 255, width)[None, :] * np.linspace(0.2, 1.0, height)[:, None]
    pixels[..., 3] = np.clip(ramp + rng.integers(-30, 30, (height, width)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


# Each builder exercises one detail of the open_clip transform. With a 224 shortest side, a long side L gives a crop
# offset (L - 224) / 2; L = 227 or 231 gives 1.5 / 3.5, where round-half-to-even (2, 4) differs from floor (1, 3).
IMAGE_BUILDERS = {
    "landscape_resized_half_even": lambda: _rgb(203, 200),  # -> 227 x 224, offset 1.5
    "portrait_resized_half_even": lambda: _rgb(200, 207),  # -> 224 x 231, offset 3.5
    "landscape_unresized_half_even": lambda: _rgb(227, 224),
    "portrait_unresized_half_even": lambda: _rgb(224, 231),
    "landscape_truncated_long_side": lambda: _rgb(301, 250),  # 224 * 301 / 250 = 269.7 -> 269
    "rgba_varying_alpha": lambda: _rgba(301, 250),
    "palette": lambda: _rgb(260, 240, seed=2).quantize(64),
    "grayscale_L": lambda: _rgb(250, 301, seed=3).convert("L"),
    "grayscale_alpha_LA": lambda: _rgba(250, 301).convert("LA"),
    "cmyk": lambda: _rgb(301, 250, seed=4).convert("CMYK"),
    "bilevel_1": lambda: _rgb(300, 260, seed=5).convert("1"),
    "int16_I;16": lambda: Image.fromarray(_rng(6).integers(0, 65536, (250, 301), dtype=np.uint16)),
    "int32_I": lambda: Image.fromarray(_rng(7).integers(0, 400, (250, 301), dtype=np.int32)),
    "float_F": lambda: Image.fromarray((_rng(8).random((250, 301)) * 300).astype(np.float32)),
    "tiny_10x7_upscaled": lambda: _rgb(10, 7, seed=9),
    "exactly_224": lambda: _rgb(224, 224, seed=10),
    "large_1024x768": lambda: _rgb(1024, 768, seed=11),
}
# The images on which transformers' own CLIP processor differs: they prove the parity test checks these details.
DETAIL_SENSITIVE = [
    "landscape_resized_half_even",
    "portrait_resized_half_even",
    "landscape_unresized_half_even",
    "portrait_unresized_half_even",
    "rgba_varying_alpha",
    "palette",
    "cmyk",
    "int16_I;16",
]


@pytest.fixture(scope="module")
def open_clip_transform():
    return open_clip.image_transform(224, is_train=False)


@pytest.fixture(scope="module")
def image_processor():
    return FlamingoImageProcessor()


# ----------------------------------------------------------------------------------------------------------------
# (a) pixel parity with open_clip
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGE_BUILDERS))
def test_pixel_values_match_open_clip(name, image_processor, open_clip_transform):
    image = IMAGE_BUILDERS[name]()
    mode = image.mode
    expected = open_clip_transform(image)
    pixel_values = image_processor(image, return_tensors="pt")["pixel_values"]
    assert image.mode == mode  # the input is not modified in place
    assert pixel_values.shape == (1, 3, 224, 224)
    assert pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DETAIL_SENSITIVE)
def test_parity_images_exercise_the_details(name, open_clip_transform):
    # transformers' CLIPImageProcessor floors the crop offset and converts to RGB before resizing: on these images
    # it must differ from open_clip, otherwise the parity test above would not test these details.
    image = IMAGE_BUILDERS[name]()
    clip_values = CLIPImageProcessorPil()(image, return_tensors="pt")["pixel_values"][0]
    assert (clip_values - open_clip_transform(image)).abs().max() > 1e-3


def test_palette_image_is_resized_with_nearest_neighbour(image_processor, open_clip_transform):
    # PIL resizes "P" images with nearest neighbour whatever filter is asked: every output colour is a palette colour
    image = IMAGE_BUILDERS["palette"]()
    palette = np.array(image.getpalette()[: 3 * 64], dtype=np.float32).reshape(-1, 3) / 255
    mean = np.array(open_clip.OPENAI_DATASET_MEAN, dtype=np.float32)
    std = np.array(open_clip.OPENAI_DATASET_STD, dtype=np.float32)
    pixels = image_processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) * std + mean
    distance = np.abs(pixels.reshape(-1, 1, 3) - palette[None]).max(-1).min(-1)
    assert distance.max() < 1e-5


def test_arrays_and_tensors_follow_the_pil_path(image_processor, open_clip_transform):
    array = np.array(_rgb(301, 250, seed=12))
    expected = open_clip_transform(Image.fromarray(array))
    inputs = [
        array,
        np.moveaxis(array, -1, 0),
        torch.from_numpy(array).permute(2, 0, 1),
        array.astype(np.float32) / 255,
        torch.from_numpy(array).permute(2, 0, 1).float() / 255,
    ]
    for image in inputs:
        torch.testing.assert_close(
            image_processor(image, return_tensors="pt")["pixel_values"][0], expected, atol=1e-5, rtol=0
        )
    gray = array[..., 0]
    torch.testing.assert_close(
        image_processor(gray, return_tensors="pt")["pixel_values"][0],
        open_clip_transform(Image.fromarray(gray)),
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_processor(array.astype(np.float32), return_tensors="pt")


def test_local_files_are_opened_without_conversion(tmp_path, image_processor, open_clip_transform):
    # OpenFlamingo's evaluation code feeds `Image.open(path)` to the transform: a palette PNG stays "P"
    path = tmp_path / "palette.png"
    IMAGE_BUILDERS["palette"]().save(path)
    expected = open_clip_transform(Image.open(path))
    for image in (str(path), path):
        torch.testing.assert_close(
            image_processor(image, return_tensors="pt")["pixel_values"][0], expected, atol=1e-5, rtol=0
        )
    assert (
        CLIPImageProcessorPil()(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0] - expected
    ).abs().max() > 1e-3


def test_batch_output_is_float32(image_processor):
    images = [IMAGE_BUILDERS["palette"](), IMAGE_BUILDERS["tiny_10x7_upscaled"]()]
    assert image_processor(images, return_tensors="pt")["pixel_values"].shape == (2, 3, 224, 224)
    unbatched = image_processor(images)["pixel_values"]
    assert [array.dtype for array in unbatched] == [np.float32, np.float32]


def _torchvision_reference(size, crop) -> T.Compose:
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        ]
    )


@pytest.mark.parametrize("name", ["landscape_truncated_long_side", "palette", "rgba_varying_alpha", "cmyk"])
@pytest.mark.parametrize("size", [199, 100])
def test_crop_larger_than_resized_image_pads_like_torchvision(name, size):
    # 199: one side padded by an odd amount (25), the other cropped; 100: both sides padded
    image = IMAGE_BUILDERS[name]()
    processor = FlamingoImageProcessor(size=size, crop_size=224)
    assert dict(processor.size) == {"shortest_edge": size}
    expected = _torchvision_reference(size, 224)(image)
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"][0], expected, atol=1e-5, rtol=0)


def test_fixed_height_width_resize_and_rectangular_crop():
    image = IMAGE_BUILDERS["landscape_truncated_long_side"]()
    processor = FlamingoImageProcessor(size={"height": 100, "width": 150}, crop_size={"height": 99, "width": 147})
    expected = _torchvision_reference((100, 150), (99, 147))(image)
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"][0], expected, atol=1e-5, rtol=0)


def test_sized_from_flamingo_config():
    config = FlamingoConfig()
    config.vision_config.image_size = 112
    processor = FlamingoImageProcessor.from_flamingo_config(config)
    image = IMAGE_BUILDERS["portrait_resized_half_even"]()
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 112, 112)
    torch.testing.assert_close(
        pixel_values[0], open_clip.image_transform(112, is_train=False)(image), atol=1e-5, rtol=0
    )


def test_image_processor_save_load(tmp_path):
    processor = FlamingoImageProcessor(size=112, crop_size=112)
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is FlamingoImageProcessor
    image = IMAGE_BUILDERS["palette"]()
    torch.testing.assert_close(
        reloaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


# ----------------------------------------------------------------------------------------------------------------
# (b) special tokens, as the original factory adds them
# ----------------------------------------------------------------------------------------------------------------


class _StopAfterTokenizer(Exception):
    pass


def _original_factory_tokenizer(tokenizer, monkeypatch):
    """Run the original `open_flamingo.create_model_and_transforms` on `tokenizer`, stopping before the models."""
    from open_flamingo.src import factory

    def _stop(*args, **kwargs):
        raise _StopAfterTokenizer

    vision = SimpleNamespace(visual=SimpleNamespace())
    monkeypatch.setattr(
        factory, "open_clip", SimpleNamespace(create_model_and_transforms=lambda *a, **k: (vision, None, None))
    )
    monkeypatch.setattr(factory, "AutoTokenizer", SimpleNamespace(from_pretrained=lambda *a, **k: tokenizer))
    monkeypatch.setattr(factory, "AutoModelForCausalLM", SimpleNamespace(from_pretrained=_stop))
    with pytest.raises(_StopAfterTokenizer):
        factory.create_model_and_transforms("ViT-L-14", "openai", "lm", "tokenizer")
    return tokenizer


def _tokenizer_with_pad(bos_token=None):
    tokenizer = make_tiny_tokenizer(bos_token=bos_token)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_KINDS = {
    "gpt_neox_like": lambda: make_tiny_tokenizer(),
    "llama_like": lambda: make_tiny_tokenizer(bos_token="<s>"),
    "llama_like_with_pad": lambda: _tokenizer_with_pad(bos_token="<s>"),
}


@pytest.mark.parametrize("kind", sorted(TOKENIZER_KINDS))
def test_special_token_ids_equal_the_original(kind, monkeypatch):
    original = _original_factory_tokenizer(TOKENIZER_KINDS[kind](), monkeypatch)
    processor = FlamingoProcessor(tokenizer=TOKENIZER_KINDS[kind]())
    tokenizer = processor.tokenizer
    assert len(tokenizer) == len(original)
    for token in (EOC, MEDIA):
        assert tokenizer.encode(token)[-1] == original.encode(token)[-1]
    assert processor.media_token_id == original.encode(MEDIA)[-1]
    assert processor.eoc_token_id == original.encode(EOC)[-1]
    assert tokenizer.pad_token == original.pad_token
    assert tokenizer.pad_token_id == original.pad_token_id
    text = f"{MEDIA}A dog runs.{EOC}{MEDIA}An image of"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]


def test_pad_token_added_only_when_missing():
    assert FlamingoProcessor(tokenizer=make_tiny_tokenizer()).tokenizer.pad_token == PAD
    with_pad = FlamingoProcessor(tokenizer=_tokenizer_with_pad())
    assert with_pad.tokenizer.pad_token == "<|endoftext|>"
    assert PAD not in with_pad.tokenizer.get_vocab()


# ----------------------------------------------------------------------------------------------------------------
# (c) batching: nesting, image padding, left padding, shapes
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def processor():
    return FlamingoProcessor(tokenizer=make_tiny_tokenizer())


@pytest.fixture(scope="module")
def images():
    return [_rgb(300, 200, seed=20), _rgb(200, 300, seed=21).quantize(32), _rgb(50, 60, seed=22)]


TEXTS = [f"{MEDIA}Two cats sleeping.{EOC}{MEDIA}A dog", f"{MEDIA}An image of"]


def test_nested_images_zero_padding_and_left_padding(processor, images, image_processor):
    a, b, c = images
    out = processor(images=[[a, b], [c]], text=TEXTS, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["pixel_values"].shape == (2, 2, 1, 3, 224, 224)
    assert out["pixel_values"].dtype == torch.float32
    for (sample, media), image in zip([(0, 0), (0, 1), (1, 0)], [a, b, c], strict=True):
        expected = image_processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out["pixel_values"][sample, media, 0], expected, atol=0, rtol=0)
    assert torch.count_nonzero(out["pixel_values"][1, 1]) == 0

    ids = [processor.tokenizer(text)["input_ids"] for text in TEXTS]
    length = max(map(len, ids))
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, length)
    assert len(ids[1]) < length  # the second sample is padded...
    pad = length - len(ids[1])
    assert out["input_ids"][1].tolist() == [processor.tokenizer.pad_token_id] * pad + ids[1]  # ...on the left
    assert out["attention_mask"][1].tolist() == [0] * pad + [1] * len(ids[1])
    assert out["input_ids"][0].tolist() == ids[0]
    assert (out["input_ids"] == processor.media_token_id).sum(1).tolist() == [2, 1]


def test_right_padding_on_request(processor, images):
    a, b, c = images
    out = processor(images=[[a, b], [c]], text=TEXTS, padding_side="right", return_tensors="pt")
    assert out["attention_mask"][1, 0] == 1 and out["attention_mask"][1, -1] == 0
    assert processor.tokenizer.padding_side == "left"  # per-call only


def test_bos_tokenizer_keeps_bos_after_left_padding(images):
    processor = FlamingoProcessor(tokenizer=make_tiny_tokenizer(bos_token="<s>"))
    out = processor(images=[[images[0], images[1]], [images[2]]], text=TEXTS, return_tensors="pt")
    bos = processor.tokenizer.bos_token_id
    first_real = out["attention_mask"].argmax(1)
    assert out["input_ids"][torch.arange(2), first_real].tolist() == [bos, bos]


def test_text_without_images_has_no_pixel_values(processor):
    out = processor(text=["A dog runs.", "Two people playing tennis"], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    out = processor(images=[[], []], text=["A dog runs.", "Two people"], return_tensors="pt")
    assert "pixel_values" not in out


def test_single_image_and_flat_list_for_one_text(processor, images, image_processor):
    a, b, _ = images
    single = processor(images=a, text=f"{MEDIA}An image of", return_tensors="pt")
    assert single["pixel_values"].shape == (1, 1, 1, 3, 224, 224)
    flat = processor(images=[a, b], text=[f"{MEDIA}A{EOC}{MEDIA}B"], return_tensors="pt")
    nested = processor(images=[[a, b]], text=[f"{MEDIA}A{EOC}{MEDIA}B"], return_tensors="pt")
    assert flat["pixel_values"].shape == (1, 2, 1, 3, 224, 224)
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])


def test_flat_list_one_image_per_text(processor, images):
    a, b, _ = images
    flat = processor(images=[a, b], text=[f"{MEDIA}A dog", f"{MEDIA}A cat"], return_tensors="pt")
    nested = processor(images=[[a], [b]], text=[f"{MEDIA}A dog", f"{MEDIA}A cat"], return_tensors="pt")
    assert flat["pixel_values"].shape == (2, 1, 1, 3, 224, 224)
    assert torch.equal(flat["pixel_values"], nested["pixel_values"])


def test_images_only_and_unbatched_output(processor, images):
    a, b, c = images
    out = processor(images=[[a, b], [c]], return_tensors="pt")
    assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (2, 2, 1, 3, 224, 224)
    out = processor(images=[[a]], text=[f"{MEDIA}A dog"])
    assert isinstance(out["input_ids"], list)
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].dtype == np.float32


def test_image_kwargs_reach_the_image_processor(processor, images):
    out = processor(images=[[images[0]]], text=[f"{MEDIA}A dog"], size=112, crop_size=112, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 1, 1, 3, 112, 112)


def test_truncation_that_keeps_every_image_token_is_allowed(processor, images):
    text = f"{MEDIA}The quick brown fox jumps over the lazy dog."
    full = processor.tokenizer(text)["input_ids"]
    out = processor(images=[[images[0]]], text=[text], truncation=True, max_length=4, return_tensors="pt")
    assert len(full) > 4
    assert out["input_ids"][0].tolist() == full[:4]


def test_model_input_names(processor):
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


# ----------------------------------------------------------------------------------------------------------------
# (d) errors
# ----------------------------------------------------------------------------------------------------------------


def test_more_image_tokens_than_images(processor, images):
    with pytest.raises(ValueError, match=r"Sample 1: the text has 2 `<image>` tokens but 1 images"):
        processor(images=[[images[0]], [images[1]]], text=[f"{MEDIA}A", f"{MEDIA}B{EOC}{MEDIA}C"])
    with pytest.raises(ValueError, match=r"Sample 0: the text has 1 `<image>` tokens but 0 images"):
        processor(text=[f"{MEDIA}A dog"])


def test_fewer_image_tokens_than_images(processor, images):
    with pytest.raises(ValueError, match=r"Sample 1: 2 images were given but the text has only 1"):
        processor(images=[[images[0]], [images[1], images[2]]], text=[f"{MEDIA}A", f"{MEDIA}B"])
    with pytest.raises(ValueError, match=r"Sample 0: 1 images were given but the text has only 0"):
        processor(images=images[0], text="A dog without its image token")


def test_number_of_image_lists_must_match_texts(processor, images):
    with pytest.raises(ValueError, match=r"Got 1 lists of images for 2 texts"):
        processor(images=[[images[0]]], text=[f"{MEDIA}A", f"{MEDIA}B"])
    with pytest.raises(ValueError, match=r"Got 3 lists of images for 2 texts"):
        processor(images=[[images[0]], [images[1]], [images[2]]], text=[f"{MEDIA}A", f"{MEDIA}B"])


def test_ambiguous_image_layouts(processor, images):
    a, b, c = images
    with pytest.raises(ValueError, match=r"flat list of 3 images is ambiguous for 2 texts"):
        processor(images=[a, b, c], text=[f"{MEDIA}A{EOC}{MEDIA}B", f"{MEDIA}C"])
    with pytest.raises(ValueError, match=r"single image was given for 2 texts"):
        processor(images=a, text=[f"{MEDIA}A", f"{MEDIA}B"])
    with pytest.raises(ValueError, match=r"mixes lists and single images"):
        processor(images=[[a], b], text=[f"{MEDIA}A", f"{MEDIA}B"])
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\)"):
        processor(images=np.zeros((2, 3, 8, 8), dtype=np.uint8), text=[f"{MEDIA}A"])


def test_truncation_that_cuts_an_image_token_raises(processor, images):
    text = f"{MEDIA}The quick brown fox jumps over the lazy dog.{EOC}{MEDIA}A dog"
    with pytest.raises(ValueError, match=r"Sample 1: its text has 2 `<image>` tokens but 1 remain"):
        processor(images=[[images[0]], images[:2]], text=[f"{MEDIA}A", text], truncation=True, max_length=8)


# ----------------------------------------------------------------------------------------------------------------
# (e) decoding
# ----------------------------------------------------------------------------------------------------------------


def test_batch_decode_strips_the_prompt(processor, images):
    a, b, c = images
    inputs = processor(images=[[a, b], [c]], text=TEXTS, return_tensors="pt")
    new_text = [" sleeping on a couch.", " a red ball."]
    new_ids = [
        processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [processor.eoc_token_id] for t in new_text
    ]
    width = max(map(len, new_ids))
    pad = processor.tokenizer.pad_token_id
    new = torch.tensor([ids + [pad] * (width - len(ids)) for ids in new_ids])
    generated = torch.cat([inputs["input_ids"], new], dim=1)  # what generate returns: prompt + new tokens
    prompt_length = inputs["input_ids"].shape[1]

    assert processor.batch_decode(generated, skip_special_tokens=True, prompt_length=prompt_length) == new_text
    assert processor.batch_decode(generated, prompt_length=prompt_length)[0] == new_text[0] + EOC
    assert processor.post_process_image_text_to_text(generated, prompt_length=prompt_length) == new_text
    assert processor.decode(generated[1], skip_special_tokens=True, prompt_length=prompt_length) == new_text[1]
    full = processor.batch_decode(generated, skip_special_tokens=True)
    assert full[0] == "Two cats sleeping.A dog" + new_text[0]
    assert processor.post_process_image_text_to_text(generated[0]) == [full[0]]


def test_invalid_prompt_length(processor):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="fewer than prompt_length=4"):
        processor.batch_decode(ids, prompt_length=4)
    with pytest.raises(ValueError, match="non-negative int"):
        processor.batch_decode(ids, prompt_length=-1)
    with pytest.raises(ValueError, match="non-negative int"):
        processor.batch_decode(ids, prompt_length=torch.tensor([[1, 2]]))


# ----------------------------------------------------------------------------------------------------------------
# (f), (g) saving and loading
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos_token", [None, "<s>"])
def test_save_load_round_trip(tmp_path, images, bos_token):
    processor = FlamingoProcessor(
        image_processor=FlamingoImageProcessor(size=112, crop_size=112),
        tokenizer=make_tiny_tokenizer(bos_token=bos_token),
    )
    processor.save_pretrained(tmp_path)
    for reloaded in (FlamingoProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(reloaded) is FlamingoProcessor
        assert type(reloaded.image_processor) is FlamingoImageProcessor
        assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()
        assert reloaded.tokenizer.padding_side == "left"
        assert (reloaded.media_token_id, reloaded.eoc_token_id) == (processor.media_token_id, processor.eoc_token_id)
        assert reloaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
        a, b, c = images
        expected = processor(images=[[a, b], [c]], text=TEXTS, return_tensors="pt")
        actual = reloaded(images=[[a, b], [c]], text=TEXTS, return_tensors="pt")
        assert expected["pixel_values"].shape[-1] == 112
        assert set(actual) == set(expected)
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key


def test_reloading_does_not_add_tokens_again(tmp_path, monkeypatch):
    processor = FlamingoProcessor(tokenizer=make_tiny_tokenizer())
    processor.save_pretrained(tmp_path)
    size = len(processor.tokenizer)

    calls = []
    tokenizer_class = type(processor.tokenizer)
    original_add = tokenizer_class.add_special_tokens

    def _spy(self, *args, **kwargs):
        calls.append(args or kwargs)
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "add_special_tokens", _spy)
    reloaded = FlamingoProcessor.from_pretrained(tmp_path)
    assert calls == []
    assert len(reloaded.tokenizer) == size
    assert reloaded.tokenizer.get_added_vocab() == processor.tokenizer.get_added_vocab()


def test_existing_flamingo_tokens_are_left_alone():
    # The original call replaces the list of additional special tokens: it would drop "<extra>" here.
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC, MEDIA, "<extra>"]})
    ids = tokenizer.get_added_vocab()
    processor = FlamingoProcessor(tokenizer=tokenizer)
    assert "<extra>" in processor.tokenizer.extra_special_tokens
    assert processor.tokenizer.pad_token == PAD
    assert processor.media_token_id == ids[MEDIA] and processor.eoc_token_id == ids[EOC]


@pytest.mark.parametrize(
    "make_bad, problem",
    [
        (lambda: None, r"is None"),
        (lambda: Image.new("RGB", (0, 0)), r"has no pixels \(size 0x0\)"),
        (lambda: Image.new("RGB", (0, 7)), r"has no pixels \(size 0x7\)"),
        (lambda: np.zeros((0, 5, 3), dtype=np.uint8), r"has no pixels \(shape \(0, 5, 3\)\)"),
        (lambda: np.full((8, 8, 3), np.nan, dtype=np.float32), r"contains NaN or infinite values"),
        (lambda: torch.full((3, 8, 8), float("inf")), r"contains NaN or infinite values"),
    ],
)
def test_unusable_images_are_named(processor, images, make_bad, problem):
    good = images[0]
    with pytest.raises(ValueError, match=rf"^Sample 1, image 1 \(0-based\) {problem}\.$"):
        processor(images=[[good], [good, make_bad()]], text=[f"{MEDIA}A", f"{MEDIA}B{MEDIA}C"])
    with pytest.raises(ValueError, match=rf"^Sample 0, image 0 \(0-based\) {problem}\.$"):
        processor(images=[make_bad()], text=f"{MEDIA}A")
    with pytest.raises(ValueError, match=rf"^Image 2 \(0-based\) {problem}\.$"):
        processor.image_processor([good, good, make_bad()])


def test_a_float_image_with_nan_is_refused_even_alone(image_processor):
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    image[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"^Image 0 \(0-based\) contains NaN or infinite values\.$"):
        image_processor(image)
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        image_processor.process_image(image)
