"""SigLIP and SigLIP2 vision towers beside CLIP: which features feed the resampler, their own preprocessing, a
Flamingo assembled on them, and that model saved, reloaded and dispatched with a device map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    LlamaForCausalLM,
    Siglip2ImageProcessorPil,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    ViTConfig,
)

from modeling_flamingo import FlamingoConfig, FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor
from modeling_flamingo.testing import (
    SIGLIP_TOWERS,
    add_flamingo_tokens,
    make_tiny_tokenizer,
    tiny_flamingo_config,
    tiny_siglip_vision_config,
    tiny_text_config,
)
from modeling_flamingo.training import assemble_flamingo

TOWER_WIDTH = 48  # not the language model's 64: the resampler and cross-attention take the tower's width
PROMPTS = ["<image>A dog runs<|endofchunk|><image>Two cats", "<image>A sink in a"]


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_tower(tower: str, seed: int = 0):
    """A seeded tower as users bring it: SigLIP as a whole `SiglipModel` (text half included), SigLIP2 as its
    vision model."""
    torch.manual_seed(seed)
    vision_config = tiny_siglip_vision_config(tower, hidden=TOWER_WIDTH)
    if tower == "siglip":
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
        model = SiglipModel(SiglipConfig(vision_config=vision_config.to_dict(), text_config=text)).eval()
        norm = model.vision_model.post_layernorm
    else:
        model = Siglip2VisionModel(vision_config).eval()
        norm = model.post_layernorm
    # A trained final norm has its own scale and shift; the initial one (1, 0) would be undone by the resampler's
    # own LayerNorm of its input, hiding which tokens it reads.
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    return model


def assembled(tower: str):
    """(model with closed gates, processor, the bare LM, the tower it was built from)."""
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer(bos_token="<s>"))
    text = tiny_text_config("llama")
    text.vocab_size = len(tokenizer)
    torch.manual_seed(1)
    lm = LlamaForCausalLM(text).eval()
    vision = tiny_tower(tower)
    model, processor = assemble_flamingo(vision, lm, tokenizer, cross_attn_every_n_layers=2)
    return model.eval(), processor, lm, vision


def reference_tokens(vision, images: list[Image.Image], layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's hidden state `layer` and its `last_hidden_state` for `images`, computed by transformers' own
    model on its own image processor's output."""
    if isinstance(vision, SiglipModel):
        size = vision.config.vision_config.image_size
        inputs = SiglipImageProcessorPil(size={"height": size, "width": size})(images, return_tensors="pt")
        out = vision.vision_model(**inputs, output_hidden_states=True)
    else:
        config = vision.config
        processor = Siglip2ImageProcessorPil(patch_size=config.patch_size, max_num_patches=config.num_patches)
        out = vision(**processor(images, return_tensors="pt"), output_hidden_states=True)
    return out.hidden_states[layer], out.last_hidden_state


@pytest.fixture(scope="module", params=SIGLIP_TOWERS)
def parts(request):
    return request.param, *assembled(request.param)


def test_config_picks_the_features_of_each_tower_and_refuses_what_cannot_run():
    clip = tiny_flamingo_config("llama")
    assert (clip.vision_feature_layer, clip.vision_feature_select_strategy) == (-1, "default")
    # A converted folder written before these fields existed loads with today's CLIP behaviour.
    saved = clip.to_dict()
    del saved["vision_feature_layer"], saved["vision_feature_select_strategy"]
    old = FlamingoConfig.from_dict(saved)
    assert (old.vision_feature_layer, old.vision_feature_select_strategy) == (-1, "default")

    for tower in SIGLIP_TOWERS:
        vision_config = tiny_siglip_vision_config(tower)
        config = tiny_flamingo_config("llama", vision_config=vision_config)
        assert config.vision_feature_select_strategy == "full"  # no CLS token to drop
        assert config.vision_config.vision_use_head is False and vision_config.vision_use_head is True

    siglip = tiny_siglip_vision_config("siglip").to_dict()
    bad = [
        ({"vision_config": siglip, "vision_feature_select_strategy": "default"}, "siglip_vision_model has none"),
        ({"vision_config": siglip, "vision_feature_select_strategy": "cls"}, "must be 'default'"),
        ({"vision_config": siglip, "vision_feature_layer": 3}, "out of range for a tower of 2 layers"),
        ({"vision_config": ViTConfig(hidden_size=64).to_dict()}, "Unsupported vision tower 'vit'"),
        ({"vision_config": {**tiny_siglip_vision_config("siglip2").to_dict(), "num_patches": 18}}, "not a square"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            tiny_flamingo_config("llama", **kwargs)


def test_resampler_reads_the_towers_last_layer_before_its_final_norm(parts):
    tower, model, processor, _, vision = parts
    images = [_image(48, 48, 0), _image(48, 48, 1)]  # square: SigLIP2's processor keeps the aspect ratio
    hidden, last = reference_tokens(vision, images)
    assert not torch.allclose(hidden, last, atol=1e-3)  # the final norm changes them: the choice matters
    pixels = processor(images=[[images[0]], [images[1]]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model._vision_tokens(pixels[:, 0, 0]), hidden, atol=1e-6, rtol=0)
        latents = model.get_image_features(pixels)
        torch.testing.assert_close(latents, model.perceiver(hidden[:, None, None]), atol=1e-6, rtol=0)
        assert not torch.allclose(latents, model.perceiver(last[:, None, None]), atol=1e-3)
    assert model.perceiver.latents.shape[-1] == model.gated_cross_attn_layers[0].attn.to_kv.in_features == TOWER_WIDTH
    # Flamingo keeps no weights it never runs: no final norm, no pooling head.
    assert not [
        n for n in model.state_dict() if n.startswith(("vision_encoder.post_layernorm", "vision_encoder.head"))
    ]


def test_an_earlier_vision_feature_layer_is_that_hidden_state():
    vision = tiny_tower("siglip")
    config = tiny_flamingo_config(
        "llama", vision_config=vision.config.vision_config.to_dict(), vision_feature_layer=-2
    )
    model = FlamingoForConditionalGeneration(config).eval()
    model.vision_encoder.load_state_dict(vision.vision_model.state_dict(), strict=False)
    image = _image(40, 56, 2)
    hidden, _ = reference_tokens(vision, [image], layer=-2)
    pixels = FlamingoImageProcessor.from_flamingo_config(config)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model._vision_tokens(pixels), hidden, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tower", SIGLIP_TOWERS)
def test_preprocessing_is_the_towers_own(tower):
    config = tiny_flamingo_config("llama", vision_config=tiny_siglip_vision_config(tower).to_dict())
    ours = FlamingoImageProcessor.from_flamingo_config(config)
    if tower == "siglip":
        image = _image(70, 50, 3)  # resized to the square, not cropped
        theirs = SiglipImageProcessorPil(size={"height": 32, "width": 32})(image, return_tensors="pt")["pixel_values"]
    else:
        image = _image(48, 48, 3)
        patches = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)(image, return_tensors="pt")
        # (1, 16, 8 * 8 * 3) row-major patches of (8, 8, 3) back to (1, 3, 32, 32).
        theirs = patches["pixel_values"].reshape(1, 4, 4, 8, 8, 3).permute(0, 5, 1, 3, 2, 4).reshape(1, 3, 32, 32)
    torch.testing.assert_close(ours(image, return_tensors="pt")["pixel_values"], theirs, atol=1e-6, rtol=0)
    # CLIP keeps open_clip's transform (shortest side, centre crop, OpenAI mean and std).
    clip = FlamingoImageProcessor.from_flamingo_config(tiny_flamingo_config("llama"))
    assert clip.do_center_crop and clip.size == {"shortest_edge": 42} and clip.image_mean[0] != 0.5


def _inputs(processor):
    images = [[_image(40, 56, 4), _image(64, 48, 5)], [_image(32, 32, 6)]]
    return processor(images=images, text=PROMPTS, return_tensors="pt", padding_side="left")


def _open_gates(model, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.copy_(torch.rand(1, generator=generator))
            block.ff_gate.copy_(torch.rand(1, generator=generator))


def test_assembled_flamingo_is_its_language_model_until_trained(parts):
    _, model, processor, lm, _ = parts
    inputs = _inputs(processor)
    assert inputs["pixel_values"].shape[-3:] == (3, 32, 32)
    with pytest.raises(ValueError, match="pixel_values images must be 3x32x32 .* got 3x42x42"):
        model(**{**inputs, "pixel_values": torch.zeros(2, 2, 1, 3, 42, 42)})
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real])


def test_save_and_load_give_the_same_model_and_the_towers_preprocessing(parts, tmp_path):
    tower, model, processor, *_ = parts
    _open_gates(model)
    inputs = _inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    recorded = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert recorded["do_center_crop"] is False and recorded["image_mean"] == [0.5, 0.5, 0.5]
    assert recorded["size"] == {"height": 32, "width": 32}
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"] == f"{tower}_vision_model"

    reloaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path).eval()
    reprocessor = FlamingoProcessor.from_pretrained(tmp_path)
    assert reprocessor.image_processor.to_dict() == processor.image_processor.to_dict()
    again = _inputs(reprocessor)
    torch.testing.assert_close(again["pixel_values"], inputs["pixel_values"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**again).logits, logits, atol=0, rtol=0)


def test_auto_device_map_on_cpu_with_offload_gives_the_same_tokens(parts, tmp_path):
    _, model, processor, *_ = parts
    _open_gates(model)
    model.save_pretrained(tmp_path / "model")
    inputs = _inputs(processor)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **settings)
    dispatched = FlamingoForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "5MB"}, offload_folder=tmp_path / "offload"
    ).eval()
    assert set(dispatched.hf_device_map.values()) == {"cpu", "disk"}
    with torch.no_grad():
        real = inputs["attention_mask"].bool()
        torch.testing.assert_close(dispatched(**inputs).logits[real], logits[real], atol=1e-5, rtol=0)
        assert torch.equal(dispatched.generate(**inputs, **settings), tokens)


def test_a_non_vision_model_is_refused_as_a_tower():
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer(bos_token="<s>"))
    text = tiny_text_config("llama")
    text.vocab_size = len(tokenizer)
    lm = LlamaForCausalLM(text)
    with pytest.raises(ValueError, match="LlamaForCausalLM is not a supported vision tower"):
        assemble_flamingo(lm, lm, tokenizer, 2)
