"""Parameter-name mapping from the original OpenFlamingo module tree (and its `checkpoint.pt`) to ours.

The original `Flamingo` module names its parts `vision_encoder` (open_clip `VisionTransformer`), `perceiver`
(`layers.{i}.0` attention, `layers.{i}.1` feed-forward as an `nn.Sequential`) and `lang_encoder` (the causal LM whose
decoder layers are wrapped in `FlamingoLayer(gated_cross_attn_layer, decoder_layer)`). Our tree uses the same
wrapping, so most names only change their prefix; the `nn.Sequential` indices become names.
"""

from __future__ import annotations

import re

import torch

# Feed-forward `nn.Sequential(LayerNorm, Linear, GELU, Linear)` indices -> our names.
_FF_INDEX = {"0": "norm", "1": "fc1", "3": "fc2"}

_PERCEIVER_ATTN = re.compile(r"^perceiver\.layers\.(\d+)\.0\.(.+)$")
_PERCEIVER_FF = re.compile(r"^perceiver\.layers\.(\d+)\.1\.(\d+)\.(.+)$")
_XATTN_FF = re.compile(r"^(.*\.gated_cross_attn_layer)\.ff\.(\d+)\.(.+)$")


def flamingo_key(key: str) -> str | None:
    """Map one parameter name of the original `Flamingo` module (without wrapper prefixes) to ours.

    Returns None for names that are aliases in the original tree (`lang_encoder.gated_cross_attn_layers.*`,
    `lang_encoder.old_decoder_blocks.*`: the same tensors as those inside the decoder layers) and for open_clip
    vision parameters, which `open_clip_vision_key` handles.
    """
    if key.startswith("lang_encoder.gated_cross_attn_layers.") or key.startswith("lang_encoder.old_decoder_blocks."):
        return None
    if key.startswith("vision_encoder."):
        return None
    if m := _PERCEIVER_ATTN.match(key):
        return f"perceiver.layers.{m[1]}.attention.{m[2]}"
    if m := _PERCEIVER_FF.match(key):
        return f"perceiver.layers.{m[1]}.feed_forward.{_FF_INDEX[m[2]]}.{m[3]}"
    if key.startswith("perceiver."):
        return key
    if key.startswith("lang_encoder."):
        key = "language_model." + key[len("lang_encoder.") :]
        if m := _XATTN_FF.match(key):
            return f"{m[1]}.ff.{_FF_INDEX[m[2]]}.{m[3]}"
        return key
    raise KeyError(key)


def language_model_key(key: str, decoder_layers_attr_name: str) -> str:
    """Map a parameter name of a plain causal LM (hub weight file) to its place inside our model.

    `model.layers.3.mlp.up_proj.weight` -> `language_model.model.layers.3.decoder_layer.mlp.up_proj.weight`.
    """
    prefix = decoder_layers_attr_name + "."
    if key.startswith(prefix):
        index, rest = key[len(prefix) :].split(".", 1)
        return f"language_model.{prefix}{index}.decoder_layer.{rest}"
    return "language_model." + key


_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_CLIP_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_CLIP_TOP_NAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# open_clip's projection to the joint embedding space: OpenFlamingo never uses it.
OPEN_CLIP_UNUSED = {"proj"}


def open_clip_vision_state_dict(
    state_dict: dict[str, torch.Tensor], prefix: str = "vision_encoder."
) -> dict[str, torch.Tensor]:
    """Rename an open_clip `VisionTransformer` state dict (keys like `conv1.weight`) to HF `CLIPVisionModel` names.

    The fused attention input projection is split into q, k and v. Unknown keys raise `KeyError` naming them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in OPEN_CLIP_UNUSED:
            continue
        if key in _CLIP_TOP_NAMES:
            out[prefix + _CLIP_TOP_NAMES[key]] = tensor
            continue
        m = _CLIP_BLOCK.match(key)
        if m is None:
            raise KeyError(key)
        layer, rest = m[1], m[2]
        base = f"{prefix}encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{name}.{kind}"] = part
        elif rest in _CLIP_BLOCK_NAMES:
            out[base + _CLIP_BLOCK_NAMES[rest]] = tensor
        else:
            raise KeyError(key)
    return out


def original_flamingo_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the full state dict of an original `Flamingo` module to ours (vision tower included)."""
    out: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("vision_encoder."):
            vision[key[len("vision_encoder.") :]] = tensor
            continue
        new = flamingo_key(key)
        if new is not None:
            out[new] = tensor
    out.update(open_clip_vision_state_dict(vision))
    return out
