"""Accelerate device maps: splitting the model over CPU and disk changes no number."""

from __future__ import annotations

import pytest
import torch

from modeling_flamingo import FlamingoForConditionalGeneration

from reference import build_original, ours_from_original, random_pixels

PROMPTS = ["<image>Two cats.<|endofchunk|><image>A sink.<|endofchunk|><image>An image of", "<image>A dog runs"]


@pytest.fixture(scope="module", params=["llama", "mpt"])  # untied and tied output embeddings
def saved(request, tmp_path_factory):
    family = request.param
    original, tokenizer = build_original(family)
    model = ours_from_original(original, tokenizer, family)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pixels = random_pixels(2, 3)
    pixels[1, 1:] = 0
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        tokens = model.generate(**_generate_args(batch, pixels, tokenizer))
    return folder, model, tokenizer, batch, pixels, logits, tokens


def _generate_args(batch, pixels, tokenizer):
    return dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=pixels,
        max_new_tokens=6,
        pad_token_id=tokenizer.pad_token_id,
    )


def _check(model, saved_fixture):
    _, _, tokenizer, batch, pixels, logits, tokens = saved_fixture
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        generated = model.generate(**_generate_args(batch, pixels, tokenizer))
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], logits[real], atol=1e-5, rtol=0)
    assert torch.equal(generated, tokens)


def test_hand_written_map_cutting_between_cross_attention_and_its_decoder_layer(saved, tmp_path):
    folder, reference_model, *_ = saved
    config = reference_model.config
    layers = f"language_model.{config.decoder_layers_attr_name}"
    device_map = {"vision_encoder": "cpu", "perceiver": "disk"}
    for i in range(config.text_config.num_hidden_layers):
        if config.has_cross_attn(i):
            # The block and the decoder layer it precedes live on different devices.
            device_map[f"{layers}.{i}.gated_cross_attn_layer"] = "disk" if i % 2 else "cpu"
        device_map[f"{layers}.{i}.decoder_layer"] = "cpu" if i % 2 else "disk"
    for name, module in reference_model.language_model.named_modules():
        full = f"language_model.{name}"
        top_level = name and "." not in name.removeprefix(config.decoder_layers_attr_name.split(".")[0] + ".")
        if top_level and not any(k.startswith(full) or full.startswith(k + ".") for k in device_map):
            if not list(module.parameters()) and not list(module.buffers()):
                continue
            # Tied output embeddings must share the input embeddings' device.
            untied_head = "lm_head" in name and not config.tie_word_embeddings
            device_map[full] = "disk" if "norm" in name or untied_head else "cpu"
    model = FlamingoForConditionalGeneration.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    split = [
        i
        for i in range(config.text_config.num_hidden_layers)
        if config.has_cross_attn(i)
        and model.hf_device_map[f"{layers}.{i}.gated_cross_attn_layer"]
        != model.hf_device_map[f"{layers}.{i}.decoder_layer"]
    ]
    assert split
    _check(model, saved)


def test_auto_device_map_with_disk_offload(saved, tmp_path):
    folder, *_ = saved
    model = FlamingoForConditionalGeneration.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "5MB"}, offload_folder=tmp_path
    )
    placements = set(model.hf_device_map.values())
    assert "disk" in placements
    _check(model, saved)


def test_cpu_device_map(saved):
    folder, *_ = saved
    model = FlamingoForConditionalGeneration.from_pretrained(folder, device_map="cpu")
    _check(model, saved)
