"""OpenFlamingo configuration."""

from __future__ import annotations

import warnings

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig

# Registered where defined, so that a hub folder carrying these files (trust_remote_code) registers them too.
AutoConfig.register("mosaic_gpt", MosaicGPTConfig, exist_ok=True)

# Deprecated: the model finds any language model's decoder layers itself (`find_decoder_layers_attr_name` in
# modeling_flamingo.py). Kept, with a warning, for code that imports it; these paths are what it finds.
_DEPRECATED_DECODER_LAYERS_ATTR_NAMES = {
    "llama": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "mosaic_gpt": "transformer.blocks",
}


def __getattr__(name: str):
    if name == "DECODER_LAYERS_ATTR_NAMES":
        warnings.warn(
            "DECODER_LAYERS_ATTR_NAMES is deprecated and will be removed: FlamingoForConditionalGeneration finds the "
            "decoder layers of any causal LM and records the path in `config.decoder_layers_attr_name`.",
            FutureWarning,
            stacklevel=2,
        )
        return _DEPRECATED_DECODER_LAYERS_ATTR_NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FlamingoConfig(PretrainedConfig):
    r"""
    Configuration of an OpenFlamingo model: a CLIP vision tower, a Perceiver resampler and a causal language model
    with gated cross-attention blocks inserted before every `cross_attn_every_n_layers`-th decoder layer.

    The defaults describe OpenFlamingo-9B-vitl-mpt7b (CLIP ViT-L/14, MPT-7B, cross-attention every 4 layers).

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Its patch tokens of the last block (before `post_layernorm`, CLS dropped) feed
            the resampler.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            The language model: any decoder-only causal LM of transformers (`AutoModelForCausalLM`), or `mosaic_gpt`.
        cross_attn_every_n_layers (`int`, defaults to 4):
            A gated cross-attention block runs before decoder layer `i` (0-based) when `(i + 1) % n == 0`.
        perceiver_depth, perceiver_heads, perceiver_head_dim, perceiver_num_latents, perceiver_ff_mult:
            Perceiver resampler shape: 6 blocks of 8 heads of 64, 64 latents, feed-forward x4 in every release.
        max_num_media (`int`, *optional*), max_num_frames (`int`, *optional*):
            Sizes of the optional media-time and frame embeddings of the resampler. The released models have
            neither; without frame embeddings only one frame per image is accepted.
        cross_attn_heads, cross_attn_head_dim, cross_attn_ff_mult:
            Gated cross-attention shape: 8 heads of 64, feed-forward x4 in every release.
        only_attend_immediate_media (`bool`, defaults to `True`):
            Each text token attends only to the latents of the last `<image>` at or before it (as trained). With
            `False` it attends to all images up to that one.
        media_token_id (`int`, *optional*), eoc_token_id (`int`, *optional*):
            Ids of `<image>` and `<|endofchunk|>` in the tokenizer.
        decoder_layers_attr_name (`str`, *optional*):
            Attribute path of the decoder layer list inside the causal LM (e.g. `"model.layers"`). When not given, the
            model finds it when it is built (the `nn.ModuleList` of `num_hidden_layers` entries in the LM's
            `get_decoder()`) and records it here.
    """

    model_type = "openflamingo"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 224,
                "projection_dim": 768,
                "hidden_act": "quick_gelu",
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mpt"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    cross_attn_every_n_layers: int = 4
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    max_num_media: int | None = None
    max_num_frames: int | None = None
    cross_attn_heads: int = 8
    cross_attn_head_dim: int = 64
    cross_attn_ff_mult: int = 4
    only_attend_immediate_media: bool = True
    media_token_id: int | None = None
    eoc_token_id: int | None = None
    decoder_layers_attr_name: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.cross_attn_every_n_layers < 1:
            raise ValueError(f"`cross_attn_every_n_layers` must be >= 1, got {self.cross_attn_every_n_layers}.")
        # MPT, MosaicGPT and tied LLaMA/GPT-NeoX variants compute logits with their input embeddings.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def num_cross_attn_layers(self) -> int:
        return self.text_config.num_hidden_layers // self.cross_attn_every_n_layers

    def has_cross_attn(self, layer_idx: int) -> bool:
        """Whether a gated cross-attention block runs before decoder layer `layer_idx` (0-based)."""
        return (layer_idx + 1) % self.cross_attn_every_n_layers == 0


AutoConfig.register("openflamingo", FlamingoConfig, exist_ok=True)

__all__ = ["FlamingoConfig"]
