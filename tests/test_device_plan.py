"""The released models fit single consumer GPUs in bf16 (checked on the meta device, no weights needed)."""

from __future__ import annotations

import pytest
import torch

from modeling_flamingo.device_plan import RELEASED, meta_model, plan_single_gpu, released_config

GIB = 2**30


@pytest.mark.parametrize(
    "name, gpu_gib",
    [
        ("openflamingo/OpenFlamingo-9B-vitl-mpt7b", 24),
        ("openflamingo/OpenFlamingo-9B-deprecated", 24),
        ("openflamingo/OpenFlamingo-4B-vitl-rpj3b", 12),
        ("openflamingo/OpenFlamingo-3B-vitl-mpt1b", 12),
    ],
)
def test_released_model_fits_one_gpu_with_room_for_a_32_shot_prompt(name, gpu_gib):
    plan = plan_single_gpu(name, gpu_gib * GIB, num_images=33, context=2048)
    assert set(plan["device_map"].values()) == {0}, plan["device_map"]
    assert plan["weights"] + plan["reserve"].total < gpu_gib * GIB
    # The reserve is not vacuous: a 2048-token cache alone is a sizeable share of it.
    assert plan["reserve"].kv_cache >= 2 * 24 * 2048 * 2048 * 2


def test_nine_b_does_not_fit_twelve_gib():
    # The same planner does move modules off the GPU when they do not fit, so the checks above can fail.
    plan = plan_single_gpu("openflamingo/OpenFlamingo-9B-vitl-mpt7b", 12 * GIB)
    assert "cpu" in set(plan["device_map"].values())


def test_released_architectures_have_the_published_sizes():
    # Parameter counts: CLIP ViT-L/14 vision tower ~303M; MPT-7B ~6.65B; resampler + 8 cross-attention blocks.
    model = meta_model(released_config("openflamingo/OpenFlamingo-9B-vitl-mpt7b"), torch.bfloat16)
    vision = sum(p.numel() for p in model.vision_encoder.parameters())
    assert 300e6 < vision < 306e6
    assert len(model.gated_cross_attn_layers) == 8
    assert len(RELEASED) == 6
