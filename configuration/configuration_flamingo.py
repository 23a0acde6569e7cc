"""OpenFlamingo configuration."""

from __future__ import annotations

import copy
import math
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

# The vision towers a Flamingo can use (`vision_config.model_type`) -> whether their tokens start with a CLS token.
# SigLIP and SigLIP2 have none; SigLIP2 (NaFlex) runs at one fixed resolution here (see `vision_image_size`).
VISION_TOWER_HAS_CLS_TOKEN = {"clip_vision_model": True, "siglip_vision_model": False, "siglip2_vision_model": False}


def vision_image_size(vision_config: PretrainedConfig) -> int:
    """Side in pixels of the square images the tower takes: `image_size` (CLIP, SigLIP), or for SigLIP2, which has
    none (NaFlex), the side of its native grid of `num_patches` patches: images of every aspect ratio are resized to
    that square, as SigLIP2's own processor does with a square image."""
    if hasattr(vision_config, "image_size"):
        return vision_config.image_size
    return math.isqrt(vision_config.num_patches) * vision_config.patch_size


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
    Configuration of an OpenFlamingo model: a vision tower (CLIP, SigLIP or SigLIP2), a Perceiver resampler and a
    causal language model with gated cross-attention blocks inserted before every `cross_attn_every_n_layers`-th
    decoder layer.

    The defaults describe OpenFlamingo-9B-vitl-mpt7b (CLIP ViT-L/14, MPT-7B, cross-attention every 4 layers).

    Args:
        vision_config (`dict` or `CLIPVisionConfig` / `SiglipVisionConfig` / `Siglip2VisionConfig`, *optional*):
            The vision tower (a vision model's config: give a `CLIPConfig` or `SiglipConfig`'s `vision_config`). Its
            hidden size is the resampler's width. SigLIP's pooling head is not used (`vision_use_head` is set to
            `False`). SigLIP2 (NaFlex) takes square images of its native grid, `sqrt(num_patches) * patch_size`
            pixels wide.
        vision_feature_layer (`int`, defaults to -1):
            Which of the tower's hidden states feeds the resampler, indexed as its `hidden_states` output (0: the
            embeddings, -1: the last layer's output). Hidden states are taken before the tower's final LayerNorm
            (CLIP's and SigLIP's `post_layernorm`), as OpenFlamingo takes them from CLIP. The default -1 costs one
            tower forward; any other layer runs the tower with `output_hidden_states=True` (every layer's states
            are kept during that call).
        vision_feature_select_strategy (`str`, *optional*):
            `"default"` drops the first token (CLIP's CLS token, as OpenFlamingo does), `"full"` keeps every token.
            Defaults to `"default"` for towers with a CLS token and `"full"` for those without (SigLIP, SigLIP2),
            where `"default"` is refused.
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
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.cross_attn_every_n_layers < 1:
            raise ValueError(f"`cross_attn_every_n_layers` must be >= 1, got {self.cross_attn_every_n_layers}.")
        # MPT, MosaicGPT and tied LLaMA/GPT-NeoX variants compute logits with their input embeddings.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self._check_vision_tower()

    def _check_vision_tower(self) -> None:
        """Refuse vision towers and feature choices the model cannot run; fill in the default select strategy."""
        vision = self.vision_config
        if vision.model_type not in VISION_TOWER_HAS_CLS_TOKEN:
            raise ValueError(
                f"Unsupported vision tower {vision.model_type!r}: use one of {sorted(VISION_TOWER_HAS_CLS_TOKEN)} "
                "(for a CLIPConfig or SiglipConfig, give its `vision_config`)."
            )
        has_cls = VISION_TOWER_HAS_CLS_TOKEN[vision.model_type]
        if self.vision_feature_select_strategy is None:
            self.vision_feature_select_strategy = "default" if has_cls else "full"
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"`vision_feature_select_strategy` must be 'default' (drop the CLS token) or 'full', got "
                f"{self.vision_feature_select_strategy!r}."
            )
        if self.vision_feature_select_strategy == "default" and not has_cls:
            raise ValueError(
                f"`vision_feature_select_strategy='default'` drops a CLS token, but {vision.model_type} has none: use "
                "'full'."
            )
        num_states = vision.num_hidden_layers + 1
        if not -num_states <= self.vision_feature_layer < num_states:
            raise ValueError(
                f"`vision_feature_layer` {self.vision_feature_layer} is out of range for a tower of "
                f"{vision.num_hidden_layers} layers ({num_states} hidden states: -{num_states} to {num_states - 1})."
            )
        if vision.model_type == "siglip2_vision_model" and math.isqrt(vision.num_patches) ** 2 != vision.num_patches:
            raise ValueError(
                f"SigLIP2 runs here at the fixed resolution of its square grid of patches, but its num_patches "
                f"{vision.num_patches} is not a square number."
            )
        if getattr(vision, "vision_use_head", False):
            # SigLIP's attention-pooling head: Flamingo reads the tokens, not a pool. A copy: the caller's config stays.
            self.vision_config = copy.deepcopy(vision)
            self.vision_config.vision_use_head = False

    @property
    def num_cross_attn_layers(self) -> int:
        return self.text_config.num_hidden_layers // self.cross_attn_every_n_layers

    def has_cross_attn(self, layer_idx: int) -> bool:
        """Whether a gated cross-attention block runs before decoder layer `layer_idx` (0-based)."""
        return (layer_idx + 1) % self.cross_attn_every_n_layers == 0


AutoConfig.register("openflamingo", FlamingoConfig, exist_ok=True)

__all__ = ["FlamingoConfig", "VISION_TOWER_HAS_CLS_TOKEN", "vision_image_size"]
