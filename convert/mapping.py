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


_FF_NAME = {v: k for k, v in _FF_INDEX.items()}
_OURS_PERCEIVER_ATTN = re.compile(r"^perceiver\.layers\.(\d+)\.attention\.(.+)$")
_OURS_PERCEIVER_FF = re.compile(r"^perceiver\.layers\.(\d+)\.feed_forward\.(norm|fc1|fc2)\.(.+)$")
_OURS_XATTN_FF = re.compile(r"^(.*\.gated_cross_attn_layer)\.ff\.(norm|fc1|fc2)\.(.+)$")


def original_key(key: str) -> str:
    """Inverse of `flamingo_key` for the resampler and language-model names: our name -> the original module's.

    Writes release-layout checkpoints from our modules (the offline demo); vision names are not handled.
    """
    if m := _OURS_PERCEIVER_ATTN.match(key):
        return f"perceiver.layers.{m[1]}.0.{m[2]}"
    if m := _OURS_PERCEIVER_FF.match(key):
        return f"perceiver.layers.{m[1]}.1.{_FF_NAME[m[2]]}.{m[3]}"
    if key.startswith("perceiver."):
        return key
    if key.startswith("language_model."):
        if m := _OURS_XATTN_FF.match(key):
            key = f"{m[1]}.ff.{_FF_NAME[m[2]]}.{m[3]}"
        return "lang_encoder." + key[len("language_model.") :]
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
        for name, chunk in open_clip_vision_targets(key):
            out[prefix + name] = tensor if chunk is None else tensor.chunk(3, dim=0)[chunk]
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


# ---------------------------------------------------------------------------------------------------------------
# Helpers for the streaming converter (`modeling_flamingo.convert.converter`): the same renames, one key at a time.

# Wrappers of training code that insert themselves into parameter names: DDP (`module.`), activation checkpointing
# (`_checkpoint_wrapped_module.`), FSDP (`_fsdp_wrapped_module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def strip_wrapper_prefixes(key: str) -> str:
    """Remove training-wrapper components from a parameter name (`module.perceiver.x` -> `perceiver.x`)."""
    while key.startswith("module."):
        key = key[len("module.") :]
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key


_XATTN_ALIAS = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$")
_DECODER_ALIAS = re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)$")


def canonical_original_key(key: str, decoder_layers_attr_name: str) -> tuple[str, bool]:
    """Name of the tensor an original `Flamingo` key refers to, and whether `key` was an alias of it.

    The original module reaches each cross-attention block twice (`lang_encoder.gated_cross_attn_layers.{i}` and
    `lang_encoder.<layers>.{i}.gated_cross_attn_layer`) and each decoder layer twice (`old_decoder_blocks.{i}` and
    `<layers>.{i}.decoder_layer`); v1 checkpoints store both copies. The canonical name is the one inside the layer.
    """
    if m := _XATTN_ALIAS.match(key):
        return f"lang_encoder.{decoder_layers_attr_name}.{m[1]}.gated_cross_attn_layer.{m[2]}", True
    if m := _DECODER_ALIAS.match(key):
        return f"lang_encoder.{decoder_layers_attr_name}.{m[1]}.decoder_layer.{m[2]}", True
    return key, False


# Names a language model's weight file (or the original module) may use that transformers 5.23 spells differently,
# relative to the causal LM. GPT-NeoX's output head is `embed_out` on the hub and in OpenFlamingo's checkpoints.
LM_KEY_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_neox": (("embed_out.", "lm_head."),),
}


def rename_lm_key(key: str, model_type: str) -> str:
    """Apply `LM_KEY_RENAMES` to a parameter name relative to the causal LM (`embed_out.weight` -> `lm_head.weight`)."""
    for old, new in LM_KEY_RENAMES.get(model_type, ()):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# Non-parameter entries older transformers versions (and OpenFlamingo's checkpoints, which keep buffers) stored next
# to the weights; they are recomputed by the modules and never loaded.
IGNORED_BUFFER_PATTERNS = (
    r"rotary_emb\.inv_freq$",
    r"(^|\.)attention\.(masked_)?bias$",
    r"(^|\.)attn\.(masked_)?bias$",
    r"(^|\.)position_ids$",
)


def open_clip_vision_targets(key: str) -> list[tuple[str, int | None]]:
    """Where one open_clip `VisionTransformer` tensor goes in an HF `CLIPVisionModel` (names without prefix).

    Returns `(name, chunk)` pairs: `chunk` is the index of the third of the tensor (along dim 0) that `name` gets,
    for the fused attention input projection, else None. `[]` for tensors OpenFlamingo never uses (`proj`).
    Unknown keys raise `KeyError` naming them.
    """
    if key in OPEN_CLIP_UNUSED:
        return []
    if key in _CLIP_TOP_NAMES:
        return [(_CLIP_TOP_NAMES[key], None)]
    m = _CLIP_BLOCK.match(key)
    if m is None:
        raise KeyError(key)
    layer, rest = m[1], m[2]
    base = f"encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        return [(f"{base}self_attn.{name}.{kind}", i) for i, name in enumerate(("q_proj", "k_proj", "v_proj"))]
    if rest in _CLIP_BLOCK_NAMES:
        return [(base + _CLIP_BLOCK_NAMES[rest], None)]
    raise KeyError(key)


_HF_CLIP_VISION_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def hf_clip_vision_key(key: str) -> str | None:
    """Name of an HF CLIP weight inside `CLIPVisionModel` (without prefix), or None for the text tower and heads.

    Accepts `CLIPModel` files (`vision_model.embeddings...`) and bare vision towers (`embeddings...`).
    """
    if key.startswith("vision_model."):
        return key[len("vision_model.") :]
    if key.startswith(_HF_CLIP_VISION_ROOTS):
        return key
    return None
