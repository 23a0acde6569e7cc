"""Name mapping between the original module tree and ours."""

from __future__ import annotations

import pytest

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.convert.mapping import flamingo_key, original_key
from modeling_flamingo.testing import FAMILIES, tiny_flamingo_config


@pytest.mark.parametrize("family", FAMILIES)
def test_original_key_inverts_flamingo_key(family):
    model = FlamingoForConditionalGeneration(tiny_flamingo_config(family))
    names = [k for k in model.state_dict() if not k.startswith("vision_encoder.")]
    assert any(".gated_cross_attn_layer.ff.fc2." in k for k in names)
    for name in names:
        assert flamingo_key(original_key(name)) == name
    assert original_key("perceiver.layers.2.feed_forward.fc1.weight") == "perceiver.layers.2.1.1.weight"
    with pytest.raises(KeyError):
        original_key("vision_encoder.embeddings.class_embedding")
