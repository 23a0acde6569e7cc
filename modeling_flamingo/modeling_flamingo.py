"""OpenFlamingo on transformers' own vision and language models.

Layout of the module tree (and so of the state dict):

- `vision_encoder`: `CLIPVisionModel`, `SiglipVisionModel` or `Siglip2VisionModel`; the tokens of its hidden state
  `config.vision_feature_layer` (before `post_layernorm`; CLIP's CLS token dropped) are the image tokens, as
  open_clip <= 2.20 returned them when OpenFlamingo was trained.
- `perceiver`: `FlamingoPerceiverResampler`, turning each image's tokens into `perceiver_num_latents` latents.
- `language_model`: any decoder-only causal LM of transformers (`AutoModelForCausalLM`), or our
  `MosaicGPTForCausalLM`. Each entry of its decoder layer list (found by `find_decoder_layers_attr_name`, or named by
  `config.decoder_layers_attr_name`) is replaced by a `FlamingoDecoderLayer` holding the original layer as
  `decoder_layer` and, every `cross_attn_every_n_layers` layers, a `FlamingoGatedCrossAttentionBlock` as
  `gated_cross_attn_layer`, which runs first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionModel,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    Siglip2VisionModel,
    SiglipVisionModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig, vision_image_size
from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig
from modeling_flamingo.modeling_mosaic_gpt import CACHE_NAME, MosaicGPTForCausalLM, accepts_cache_alias

# Registered where defined, so that a hub folder carrying these files (trust_remote_code) registers them too.
AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM, exist_ok=True)


def _language_model_from_config(text_config: PretrainedConfig) -> PreTrainedModel:
    """A fresh causal LM for `text_config`; MosaicGPT by model type rather than through `AutoModelForCausalLM`.

    The Auto classes map config *classes* to models. A local folder loaded with `trust_remote_code` gets each entry
    module (configuration, modelling, processing) imported into its own package by transformers 5.23, so the text config
    may be an instance of another copy of `MosaicGPTConfig` than the one registered beside this class.
    """
    if text_config.model_type == MosaicGPTConfig.model_type:
        return MosaicGPTForCausalLM._from_config(text_config)
    return AutoModelForCausalLM.from_config(text_config)


def _vision_model_from_config(vision_config: PretrainedConfig) -> PreTrainedModel:
    """A fresh vision tower for `vision_config` (CLIP, SigLIP or SigLIP2), without the parts Flamingo never runs.

    SigLIP's `last_hidden_state` is the last layer's output passed through `post_layernorm`, where CLIP's is the raw
    output; the resampler takes the raw output of both (see `FlamingoConfig.vision_feature_layer`), so SigLIP's
    final norm becomes an identity here: one tower forward gives the wanted tokens, with no hook and no list of every
    layer's hidden states. (Its pooling head is already off: `FlamingoConfig` sets `vision_use_head=False`.)
    """
    if vision_config.model_type == "clip_vision_model":
        return CLIPVisionModel._from_config(vision_config)
    siglip = SiglipVisionModel if vision_config.model_type == "siglip_vision_model" else Siglip2VisionModel
    tower = siglip._from_config(vision_config)
    tower.post_layernorm = nn.Identity()
    return tower


def _siglip2_fixed_resolution_inputs(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """Square images as the NaFlex inputs of `Siglip2VisionModel`, as `Siglip2ImageProcessor` makes them from an image
    resized to the same square: every patch real, all images on the same grid.

    Args:
        pixel_values: (N, C, H, W) with H = W a multiple of `patch_size`.
    Returns:
        `pixel_values` (N, g * g, P * P * C) patches in row-major order, each flattened as (P, P, C);
        `pixel_attention_mask` (N, g * g) ones; `spatial_shapes` (N, 2) holding (g, g); g = H / P, P = `patch_size`.
    """
    N, C, H, W = pixel_values.shape
    g = H // patch_size
    patches = pixel_values.reshape(N, C, g, patch_size, g, patch_size).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(N, g * g, patch_size * patch_size * C),
        "pixel_attention_mask": torch.ones(N, g * g, dtype=torch.long, device=pixel_values.device),
        "spatial_shapes": torch.tensor([[g, g]], device=pixel_values.device).expand(N, 2),
    }


def _get_attr_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _layer_lists(root: nn.Module, num_layers: int) -> list[str]:
    """Names (relative to `root`) of the shallowest `nn.ModuleList`s under `root` with `num_layers` entries."""
    found = [
        name
        for name, module in root.named_modules()
        if name and isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    depth = min((name.count(".") for name in found), default=0)
    return [name for name in found if name.count(".") == depth]


def find_decoder_layers_attr_name(language_model: PreTrainedModel) -> str:
    """The attribute path, from the causal LM, of its list of decoder layers (e.g. `"model.layers"`).

    Found through the model's own accessor: `get_decoder()` gives the decoder (`LlamaModel`, `GPT2Model`, ...), whose
    `nn.ModuleList` of `config.num_hidden_layers` entries is the layer list (`model.layers` for LLaMA, Mistral, Qwen,
    Gemma, Phi-3, OLMo2; `transformer.h` for GPT-2 and Falcon; `gpt_neox.layers`; `transformer.blocks` for MPT).

    Raises:
        ValueError: no such list, or several: `FlamingoConfig(decoder_layers_attr_name=...)` names it instead.
    """
    num_layers = language_model.config.num_hidden_layers
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    prefix = next(name for name, module in language_model.named_modules() if module is decoder)
    candidates = _layer_lists(decoder, num_layers)
    if len(candidates) != 1:
        found = f"several ({', '.join(candidates)})" if candidates else "none"
        raise ValueError(
            f"Cannot find the decoder layers of {type(language_model).__name__}: its decoder "
            f"{type(decoder).__name__} should hold one nn.ModuleList of its {num_layers} layers, and holds {found}. "
            "Name the list with FlamingoConfig(decoder_layers_attr_name=...), its attribute path in the causal LM "
            "(e.g. 'model.layers')."
        )
    return f"{prefix}.{candidates[0]}" if prefix else candidates[0]


def _decoder_layer_list(language_model: PreTrainedModel, path: str) -> nn.ModuleList:
    """The decoder layer list at `path` (a config's `decoder_layers_attr_name`), checked to be one."""
    try:
        layers = _get_attr_path(language_model, path)
    except AttributeError:
        layers = None
    num_layers = language_model.config.num_hidden_layers
    if not isinstance(layers, nn.ModuleList) or len(layers) != num_layers:
        raise ValueError(
            f"decoder_layers_attr_name {path!r} does not name an nn.ModuleList of the {num_layers} decoder layers of "
            f"{type(language_model).__name__}: fix it, or leave it unset to have the layers found."
        )
    return layers


class FlamingoFeedForward(nn.Module):
    """LayerNorm -> Linear(d, mult * d) -> exact GELU -> Linear(mult * d, d); Linears without bias."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(hidden_states))))


class FlamingoPerceiverAttention(nn.Module):
    """Latents attend to the concatenation of (normed) media tokens and (normed) latents."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """
        Args:
            media: (N, v, d) image tokens, N = batch * images.
            latents: (N, n, d).
        Returns:
            (N, n, d) attention output (the caller adds the residual).
        """
        N, n, _ = latents.shape
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents).view(N, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)
        k = k.view(N, -1, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(N, -1, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(N, n, self.heads * self.head_dim))


class FlamingoPerceiverLayer(nn.Module):
    def __init__(self, config: FlamingoConfig, dim: int):
        super().__init__()
        self.attention = FlamingoPerceiverAttention(dim, config.perceiver_heads, config.perceiver_head_dim)
        self.feed_forward = FlamingoFeedForward(dim, config.perceiver_ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attention(media, latents) + latents
        return self.feed_forward(latents) + latents


class FlamingoPerceiverResampler(nn.Module):
    """Maps each image's vision tokens to a fixed number of latents."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.perceiver_num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(config.max_num_frames, dim)) if config.max_num_frames else None
        self.media_time_embs = (
            nn.Parameter(torch.randn(config.max_num_media, 1, dim)) if config.max_num_media else None
        )
        self.layers = nn.ModuleList([FlamingoPerceiverLayer(config, dim) for _ in range(config.perceiver_depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            vision_tokens: (B, T_img, F, v, d) patch tokens of each frame of each image.
        Returns:
            (B, T_img, n, d) latents, n = `perceiver_num_latents`.
        """
        B, T, Fr, v, d = vision_tokens.shape
        if self.frame_embs is not None:
            vision_tokens = vision_tokens + self.frame_embs[:Fr, None, :]
        media = vision_tokens.reshape(B, T, Fr * v, d)
        if self.media_time_embs is not None:
            media = media + self.media_time_embs[:T]
        media = media.reshape(B * T, Fr * v, d)
        latents = self.latents.unsqueeze(0).expand(B * T, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents).view(B, T, -1, d)


class FlamingoMaskedCrossAttention(nn.Module):
    """Text tokens attend to the latents of the image they belong to."""

    def __init__(self, config: FlamingoConfig, dim: int, dim_visual: int):
        super().__init__()
        self.heads = config.cross_attn_heads
        self.head_dim = config.cross_attn_head_dim
        self.only_attend_immediate_media = config.only_attend_immediate_media
        inner = self.heads * self.head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def project_media(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_features: (B, T_img, n, d_visual) resampler latents.
        Returns:
            keys and values, each (B, heads, T_img, n, head_dim).
        """
        B, T, n, _ = image_features.shape
        k, v = self.to_kv(image_features).chunk(2, dim=-1)
        k = k.view(B, T, n, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)
        v = v.view(B, T, n, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)
        return k, v

    def forward(
        self, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, image_indices: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, T, d) text hidden states.
            key, value: (B, heads, T_img, n, head_dim) from `project_media`.
            image_indices: (B, T) 1-based index of the image each token belongs to, 0 for none.
        Returns:
            (B, T, d); zero for tokens without an image.
        """
        B, T, _ = hidden_states.shape
        _, h, T_img, n, hd = key.shape
        q = self.to_q(self.norm(hidden_states)).view(B, T, h, hd).transpose(1, 2)
        has_media = (image_indices > 0).unsqueeze(1).unsqueeze(-1)  # (B, 1, T, 1)
        if T == 1 and self.only_attend_immediate_media:
            # Decoding: attend to the one image this token sees, so the cost does not grow with the image count.
            if T_img == 1:
                # generate() keeps only each sample's current image after the prefill: a view, no gather.
                k, v = key[:, :, 0], value[:, :, 0]  # (B, h, n, hd)
            else:
                img = (image_indices[:, 0] - 1).clamp(min=0)
                batch = torch.arange(B, device=img.device)
                k = key[batch, :, img]
                v = value[batch, :, img]
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            key_image = torch.arange(1, T_img + 1, device=image_indices.device).repeat_interleave(n)  # (T_img * n,)
            idx = image_indices.unsqueeze(-1)  # (B, T, 1)
            allowed = (key_image == idx) if self.only_attend_immediate_media else (key_image <= idx)
            # Rows without an image would be fully masked (NaN in SDPA): let them attend anywhere, zero them below.
            allowed = allowed | (idx == 0)
            out = F.scaled_dot_product_attention(
                q, key.reshape(B, h, T_img * n, hd), value.reshape(B, h, T_img * n, hd), attn_mask=allowed[:, None]
            )
        # Select, don't multiply: a row without an image may have attended to anything (0 * NaN would be NaN).
        out = torch.where(has_media, out, 0.0)
        return self.to_out(out.transpose(1, 2).reshape(B, T, h * hd))


class FlamingoGatedCrossAttentionBlock(GradientCheckpointingLayer):
    """x = tanh(attn_gate) * xattn(x, media) + x; x = tanh(ff_gate) * ff(x) + x."""

    def __init__(self, config: FlamingoConfig, dim: int, dim_visual: int):
        super().__init__()
        self.attn = FlamingoMaskedCrossAttention(config, dim, dim_visual)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FlamingoFeedForward(dim, config.cross_attn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        image_features: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        image_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            hidden_states: (B, T, d).
            image_features: (B, T_img, n, d_visual) resampler latents, projected to keys and values here unless
                `key`/`value` (from an earlier call) are given. Projecting inside this forward keeps it under the
                hooks that Accelerate puts on this module (device placement, offloaded weights).
            key, value: (B, heads, T_img, n, head_dim). With neither these nor `image_features` (text-only input)
                the attention branch contributes zero, as the original's does for tokens without an image.
            image_indices: (B, T), see `FlamingoMaskedCrossAttention.forward`.
        Returns:
            the new hidden states and the keys and values used (None for text-only input).
        """
        device = hidden_states.device
        if key is None and image_features is not None:
            key, value = self.attn.project_media(image_features.to(device))
        if key is not None:
            key, value = key.to(device), value.to(device)
            attn = self.attn(hidden_states, key, value, image_indices.to(device))
            hidden_states = attn * self.attn_gate.tanh() + hidden_states
        hidden_states = self.ff(hidden_states) * self.ff_gate.tanh() + hidden_states
        return hidden_states, key, value


@dataclass
class FlamingoMediaConditioning:
    """What the cross-attention blocks need for one forward call.

    Attributes:
        image_features: (B, T_img, n, d_visual) resampler latents, or None for text-only input.
        image_indices: (B, T) 1-based image index of every input token (0: no image yet).
        key_values: one `(key, value)` per cross-attention block, each (B, heads, T_img, n, head_dim); entries
            start as None and are filled on first use, so a generation computes them once.
    """

    image_features: torch.Tensor | None
    image_indices: torch.Tensor
    key_values: list[tuple[torch.Tensor, torch.Tensor] | None]


class FlamingoDecoderLayer(nn.Module):
    """A language model's decoder layer, preceded by a gated cross-attention block where the config puts one.

    The language model calls this module exactly as it called its own layer. The media conditioning of the current
    forward call is not an argument of that call (transformers' `MptModel` does not pass extra keyword arguments on
    to its blocks), so `FlamingoForConditionalGeneration.forward` sets it for the duration of one call through
    `conditioned_on` and clears it afterwards; with gradient checkpointing the tensors reach the checkpointed block
    as explicit arguments, so recomputation does not depend on it.
    """

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: FlamingoGatedCrossAttentionBlock | None):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.cross_attn_index: int | None = None
        self._conditioning: FlamingoMediaConditioning | None = None

    def __getattr__(self, name: str) -> Any:
        # Some language models read attributes of their layers in their forward (e.g. `decoder_layer.attention_type`
        # to pick a sliding or global mask): those of the wrapped layer are this module's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(self.decoder_layer, name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The gated cross-attention block (where there is one), then the language model's layer called with every
        argument it was given, returning what it returns (a tensor or a tuple, depending on the family)."""
        if self.gated_cross_attn_layer is not None:
            cond = self._conditioning
            if cond is None:
                raise RuntimeError("FlamingoDecoderLayer called outside FlamingoForConditionalGeneration.forward.")
            cached = cond.key_values[self.cross_attn_index]
            key, value = cached if cached is not None else (None, None)
            hidden_states, key, value = self.gated_cross_attn_layer(
                hidden_states, None if cached is not None else cond.image_features, key, value, cond.image_indices
            )
            if cached is None and key is not None:
                cond.key_values[self.cross_attn_index] = (key, value)
        return self.decoder_layer(hidden_states, *args, **kwargs)


@dataclass
class FlamingoCausalLMOutputWithPast(CausalLMOutputWithPast):
    """
    The fields of transformers' `CausalLMOutputWithPast`, whose name for the cache (`past_key_values`, or `cache`
    from transformers 5.24 on, with the old name still readable) this class inherits, then the image fields.

    Args:
        loss: language modelling loss (labels shifted inside), when `labels` is given.
        logits: (B, T, vocab).
        past_key_values / cache: the language model's cache.
        hidden_states, attentions: as returned by the language model when asked for.
        image_features: (B, T_img, n, d_visual) resampler latents of the images of this call, reusable through the
            `image_features` argument.
        cross_attention_key_values: per cross-attention block, the `(key, value)` of the image latents, each
            (B, heads, T_img, n, head_dim); returned with `use_cache=True` so later decoding steps skip them.
        image_indices: (B, T) 1-based image index of every input token (0: none yet).
    """

    image_features: torch.FloatTensor | None = None
    cross_attention_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    image_indices: torch.LongTensor | None = None


class FlamingoPreTrainedModel(PreTrainedModel):
    config: FlamingoConfig
    config_class = FlamingoConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # With the vision tower's and the language model's layer classes, which `__init__` adds from the built model.
    # FlamingoDecoderLayer is not listed: a device map may put a cross-attention block and its decoder layer apart.
    _no_split_modules = ["FlamingoPerceiverResampler", "FlamingoGatedCrossAttentionBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache", "cross_attention_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FlamingoPerceiverResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)
            if module.frame_embs is not None:
                init.normal_(module.frame_embs, mean=0.0, std=1.0)
            if module.media_time_embs is not None:
                init.normal_(module.media_time_embs, mean=0.0, std=1.0)
        elif isinstance(module, FlamingoGatedCrossAttentionBlock):
            # Gates start closed, as in the original: a fresh model is its language model.
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, which also accepts the original OpenFlamingo hub repos (e.g.
        `openflamingo/OpenFlamingo-3B-vitl-mpt1b`, holding only `checkpoint.pt`): they are converted once into a local
        cache folder (see `modeling_flamingo.convert_on_load`) and loaded from there."""
        from modeling_flamingo.convert_on_load import resolve_pretrained_path

        pretrained_model_name_or_path = resolve_pretrained_path(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, writing a folder that also loads without this package.

        `config.json` gets the `auto_map` of `modeling_flamingo.hub_code.CONFIG_AUTO_MAP` (also set on `self.config`,
        as transformers does for remote-code models) and the folder the package's modules as remote code
        (`write_remote_code`), so `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)` works
        with transformers alone. Where this package is imported its own classes are used, whatever the folder holds.
        """
        from modeling_flamingo.hub_code import CONFIG_AUTO_MAP, write_remote_code

        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **CONFIG_AUTO_MAP}
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if self.should_save_on_this_rank(is_main_process):
            write_remote_code(save_directory)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # `push_to_hub` and `save_pretrained(push_to_hub=True)` upload from inside transformers' `save_pretrained`,
        # before the override above runs its last line: add the remote code just before the upload.
        from modeling_flamingo.hub_code import write_remote_code

        write_remote_code(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)


class FlamingoForConditionalGeneration(FlamingoPreTrainedModel, GenerationMixin):
    """OpenFlamingo: interleaved images and text in, text out."""

    def __init__(self, config: FlamingoConfig):
        super().__init__(config)
        self.vision_encoder = _vision_model_from_config(config.vision_config)
        self.perceiver = FlamingoPerceiverResampler(config)
        self.language_model = _language_model_from_config(config.text_config)
        dim_visual = config.vision_config.hidden_size
        dim = config.text_config.hidden_size
        if config.decoder_layers_attr_name is None:
            # Recorded in the config: the saved folder, the converter's key mapping and LoRA's targets use the path.
            config.decoder_layers_attr_name = find_decoder_layers_attr_name(self.language_model)
        layers = _decoder_layer_list(self.language_model, config.decoder_layers_attr_name)
        cross_attn_index = 0
        for i, layer in enumerate(layers):
            block = FlamingoGatedCrossAttentionBlock(config, dim, dim_visual) if config.has_cross_attn(i) else None
            layers[i] = FlamingoDecoderLayer(layer, block)
            if block is not None:
                layers[i].cross_attn_index = cross_attn_index
                cross_attn_index += 1
        # The units of device maps and FSDP: the classes of this model's own layers, whatever the families.
        vision_layers = _layer_lists(self.vision_encoder, config.vision_config.num_hidden_layers)
        self._no_split_modules = [
            *self._no_split_modules,
            *{type(layer).__name__ for name in vision_layers for layer in _get_attr_path(self.vision_encoder, name)},
            *{type(layer.decoder_layer).__name__ for layer in layers},
        ]
        self.post_init()
        if config.eoc_token_id is not None:
            self.generation_config.eos_token_id = config.eoc_token_id

    # ----------------------------------------------------------------------------------------------------------
    # accessors

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's layer list, every entry a `FlamingoDecoderLayer`."""
        return _get_attr_path(self.language_model, self.config.decoder_layers_attr_name)

    @property
    def gated_cross_attn_layers(self) -> list[FlamingoGatedCrossAttentionBlock]:
        return [
            layer.gated_cross_attn_layer for layer in self.decoder_layers if layer.gated_cross_attn_layer is not None
        ]

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    # ----------------------------------------------------------------------------------------------------------
    # images

    def _pixel_values_6d(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Check the shape of `pixel_values` against the vision tower; (B, T_img, C, H, W) gets a frame axis."""
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.ndim != 6:
            raise ValueError(
                "pixel_values must have shape (batch, images, frames, channels, height, width) or "
                f"(batch, images, channels, height, width); got {tuple(pixel_values.shape)}."
            )
        B, T, Fr, C, H, W = pixel_values.shape
        channels, size = self.config.vision_config.num_channels, vision_image_size(self.config.vision_config)
        if (C, H, W) != (channels, size, size):
            raise ValueError(
                f"pixel_values images must be {channels}x{size}x{size} (channels, height, width); got {C}x{H}x{W}."
            )
        max_frames = self.config.max_num_frames or 1
        if Fr > max_frames:
            raise ValueError(
                f"pixel_values has {Fr} frames per image but this model accepts at most {max_frames} "
                "(it has no frame embeddings)."
                if max_frames == 1
                else f"pixel_values has {Fr} frames per image but this model accepts at most {max_frames}."
            )
        if T > (self.config.max_num_media or T):
            raise ValueError(
                f"pixel_values has {T} images per sample but this model accepts at most {self.config.max_num_media}."
            )
        return pixel_values

    def _checked_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Check the shape of precomputed `image_features` and cast them to the resampler's dtype."""
        expected = (self.config.perceiver_num_latents, self.config.vision_config.hidden_size)
        if image_features.ndim != 4 or tuple(image_features.shape[2:]) != expected:
            raise ValueError(
                "image_features must be resampler latents of shape (batch, images, "
                f"{expected[0]}, {expected[1]}) as returned by get_image_features; got {tuple(image_features.shape)}."
            )
        if not image_features.is_floating_point():
            raise ValueError(f"image_features must be a floating-point tensor; got {image_features.dtype}.")
        return image_features.to(self.perceiver.latents.dtype)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode images with the vision tower and the resampler.

        Args:
            pixel_values: (B, T_img, F, C, H, W), or (B, T_img, C, H, W) for single-frame images.
        Returns:
            (B, T_img, n, d_visual) resampler latents.
        """
        pixel_values = self._pixel_values_6d(pixel_values)
        B, T, Fr, C, H, W = pixel_values.shape
        pixel_values = pixel_values.reshape(B * T * Fr, C, H, W).to(self.vision_encoder.dtype)
        # The vision tower is frozen in every release: skip its autograd graph unless someone unfroze it.
        track = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(track):
            tokens = self._vision_tokens(pixel_values)
        tokens = tokens.reshape(B, T, Fr, tokens.shape[1], tokens.shape[2])
        return self.perceiver(tokens.to(self.perceiver.latents.dtype))

    def _vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, v, d_visual) the tokens of hidden state `config.vision_feature_layer`."""
        inputs = {"pixel_values": pixel_values}
        if self.config.vision_config.model_type == "siglip2_vision_model":
            inputs = _siglip2_fixed_resolution_inputs(pixel_values, self.config.vision_config.patch_size)
        layer = self.config.vision_feature_layer
        if layer == -1:
            # CLIP's last_hidden_state is its last layer's raw output, and so is SigLIP's here (its post_layernorm
            # is an identity in this model).
            tokens = self.vision_encoder(**inputs).last_hidden_state
        else:
            tokens = self.vision_encoder(**inputs, output_hidden_states=True).hidden_states[layer]
        return tokens[:, 1:] if self.config.vision_feature_select_strategy == "default" else tokens

    def image_indices_from_input_ids(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """(B, T) ids -> (B, T) number of `<image>` tokens at or before each position."""
        return torch.cumsum(input_ids == self.config.media_token_id, dim=1)

    @contextlib.contextmanager
    def conditioned_on(self, conditioning: FlamingoMediaConditioning) -> Iterator[None]:
        """Give the cross-attention blocks `conditioning` for the duration of one language model call."""
        layers = [layer for layer in self.decoder_layers if layer.gated_cross_attn_layer is not None]
        for layer in layers:
            layer._conditioning = conditioning
        try:
            yield
        finally:
            for layer in layers:
                layer._conditioning = None

    # ----------------------------------------------------------------------------------------------------------
    # forward

    @accepts_cache_alias
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        image_indices: torch.LongTensor | None = None,
        cross_attention_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> FlamingoCausalLMOutputWithPast:
        r"""
        Args:
            input_ids: (B, T) token ids; `<image>` marks where each image goes.
            pixel_values: (B, T_img, F, C, H, W) or (B, T_img, C, H, W); samples with fewer images are padded.
                Padding slots (after a sample's last `<image>`) are never read, whatever they hold; NaN or infinite
                values in an image an `<image>` token refers to raise a ValueError (as in `image_features`).
            attention_mask: (B, T) or the language model's own mask format; 0 marks (left) padding.
            past_key_values: the language model's cache, also accepted as `cache` (transformers >= 5.24's name).
            image_features: (B, T_img, n, d_visual) precomputed `get_image_features(pixel_values)` (e.g. few-shot
                demonstrations encoded once), cast to the model's dtype; exclusive with `pixel_values`.
            image_indices: (B, T) the 1-based image each token attends (0: none). Computed from `input_ids` when not
                given; required when continuing from a non-empty `past_key_values` with images (pass the last column
                of the previous output's `image_indices`, incremented at new `<image>` tokens). `generate` does this.
            cross_attention_key_values: the previous output's field of that name, to skip re-projecting the images.
            labels: (B, T) as for any causal LM (shifted inside); use `-100` to ignore (see `mask_flamingo_labels`).
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        batch, seq = self._check_text(input_ids if input_ids is not None else inputs_embeds)
        if labels is not None and labels.shape != (batch, seq):
            raise ValueError(f"labels must have shape {(batch, seq)} like the input ids; got {tuple(labels.shape)}.")
        pixel_values, image_features = self._checked_images(batch, pixel_values, image_features)
        has_images = pixel_values is not None or image_features is not None or cross_attention_key_values is not None

        if image_indices is None:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            if input_ids is None or (past_length > 0 and has_images):
                if has_images:
                    raise ValueError(
                        "image_indices is required with inputs_embeds or a non-empty past_key_values: the number of "
                        "<image> tokens before the new tokens is not known otherwise (generate() passes it)."
                    )
                image_indices = torch.zeros(batch, seq, dtype=torch.long, device=inputs_embeds.device)
            else:
                # A call without image_indices is a prompt (or a text-only step): check the values of the inputs.
                # generate() checks them once and passes image_indices, so its decoding steps skip this.
                image_indices = self.image_indices_from_input_ids(input_ids)
                self._check_input_values(
                    input_ids,
                    attention_mask,
                    image_indices,
                    pixel_values=pixel_values,
                    image_features=image_features if cross_attention_key_values is None else None,
                    num_images=cross_attention_key_values[0][0].shape[2] if cross_attention_key_values else 0,
                )
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        # Image slots that no token of a sample refers to (the padding of samples with fewer images) are replaced by
        # zeros before their keys and values are computed, so not even NaN in them can reach an output.
        used_features = (
            _zero_unreferenced_images(image_features, image_indices)
            if image_features is not None and cross_attention_key_values is None
            else image_features
        )

        num_blocks = self.config.num_cross_attn_layers  # derived from the config: no module walk per step
        key_values = (
            list(cross_attention_key_values) if cross_attention_key_values is not None else [None] * num_blocks
        )
        conditioning = FlamingoMediaConditioning(
            image_features=used_features, image_indices=image_indices, key_values=key_values
        )
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        kwargs["return_dict"] = True
        with self.conditioned_on(conditioning):
            outputs = self.language_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )
        keep_kv = has_images and (use_cache if use_cache is not None else self.config.text_config.use_cache)
        return FlamingoCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_features=image_features,
            cross_attention_key_values=tuple(key_values) if keep_kv else None,
            image_indices=image_indices,
        )

    @staticmethod
    def _check_text(text: torch.Tensor) -> tuple[int, int]:
        """(batch, length) of `input_ids` or `inputs_embeds`, refusing an empty text."""
        if text.ndim < 2 or text.shape[0] == 0 or text.shape[1] == 0:
            raise ValueError(
                f"The text input is empty (shape {tuple(text.shape)}): give at least one sample of at least one token "
                "as a (batch, length) tensor."
            )
        return text.shape[0], text.shape[1]

    def _checked_images(
        self, batch: int, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Shape (and dtype) checks of the images, which need no look at their values."""
        if pixel_values is not None:
            pixel_values = self._pixel_values_6d(pixel_values)
        if image_features is not None:
            image_features = self._checked_image_features(image_features)
        images = pixel_values if pixel_values is not None else image_features
        if images is not None and images.shape[0] != batch:
            raise ValueError(f"Got images for {images.shape[0]} samples but {batch} input sequences.")
        return pixel_values, image_features

    def _check_input_values(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        image_indices: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        num_images: int = 0,
    ) -> None:
        """Checks that read the values of the inputs: token ids in the vocabulary, no all-zero attention mask row,
        an image for every `<image>` token, and finite values in every image a token refers to.

        Everything is reduced on the inputs' device and read back in one transfer (one synchronisation), and only
        on a prompt: `forward` without `image_indices`, and `generate` once before its first step.

        Args:
            input_ids: (B, T).
            attention_mask: (B, T + past) or None; other mask formats are not checked.
            image_indices: (B, T) from `image_indices_from_input_ids`.
            pixel_values: (B, T_img, F, C, H, W) or image_features: (B, T_img, n, d), the images of the call; or
            num_images: the number of images already projected (cached cross-attention keys and values).
        """
        images = pixel_values if pixel_values is not None else image_features
        num_images = images.shape[1] if images is not None else num_images
        device = input_ids.device
        weight = self.get_input_embeddings().weight
        # Under DeepSpeed ZeRO-3 a partitioned parameter is an empty placeholder; `ds_shape` is its full shape.
        vocab = getattr(weight, "ds_shape", weight.shape)[0]
        columns = [image_indices[:, -1], input_ids.min(dim=1).values, input_ids.max(dim=1).values]
        if attention_mask is not None and attention_mask.ndim == 2:
            columns.append((attention_mask == 0).all(dim=1).long())
        else:
            columns.append(torch.zeros_like(columns[0]))
        if images is not None:
            # Non-finite values are an error where a token refers to the image, and ignored in padding slots.
            referenced = _referenced_images(image_indices, num_images).to(device)
            nonfinite = ~torch.isfinite(images).flatten(2).all(dim=-1).to(device)
            columns += list((nonfinite & referenced).long().unbind(dim=1))
        rows = torch.stack(columns, dim=1).tolist()  # the one synchronisation

        for b, (count, lowest, highest, empty_mask, *bad_images) in enumerate(rows):
            if lowest < 0 or highest >= vocab:
                raise ValueError(
                    f"Sample {b} has token id {lowest if lowest < 0 else highest}, outside the vocabulary of "
                    f"{vocab} tokens (ids 0 to {vocab - 1})."
                )
            if empty_mask:
                raise ValueError(
                    f"The attention_mask of sample {b} is all zeros: every sample needs at least one token to attend "
                    "to (1 for real tokens, 0 for padding)."
                )
            if count > num_images:
                raise ValueError(
                    f"Sample {b} has {count} <image> tokens but only {num_images} images were given"
                    + (" (no pixel_values or image_features)." if num_images == 0 else ".")
                )
            if any(bad_images):
                name = "pixel_values" if pixel_values is not None else "image_features"
                raise ValueError(
                    f"{name} of sample {b}, image {bad_images.index(1)} (0-based) contain NaN or infinite values; "
                    "an image that an <image> token refers to must be finite (padding slots are never read)."
                )

    # ----------------------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` with the images encoded once, before beams or samples are expanded, and each
        prompt prefilled once for all its beams or returned sequences (`_prefill`).

        Returns prompt + new tokens, stopping at `<|endofchunk|>` unless `eos_token_id` says otherwise.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both.")
        if input_ids is not None:
            batch, _ = self._check_text(input_ids)
            pixel_values, image_features = self._checked_images(batch, pixel_values, image_features)
            # The prompt's values are checked here, once: the forward calls of the steps get `image_indices`.
            self._check_input_values(
                input_ids,
                attention_mask,
                self.image_indices_from_input_ids(input_ids),
                pixel_values=pixel_values,
                image_features=image_features,
            )
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, image_features=image_features, **kwargs
        )

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict[str, Any]]:
        """Expand the prompts to `expand_size` rows each (beams, or `num_return_sequences` samples), except the image
        features: `_prefill` runs each prompt once and expands its results (see there), so they stay (B, ...)."""
        image_features = model_kwargs.pop("image_features", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs["image_features"] = image_features
        if expand_size > 1:
            model_kwargs[_PROMPT_REPEATS] = expand_size
        return input_ids, model_kwargs

    def _prefill(
        self,
        input_ids: torch.LongTensor,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        is_first_iteration: bool = True,
    ) -> FlamingoCausalLMOutputWithPast:
        """The first forward of `generate`, run once per prompt rather than once per beam or returned sequence.

        transformers repeats every prompt `k = max(num_beams, num_return_sequences)` times before the prefill, so each
        prompt would be encoded `k` times. Here the first of its `k` identical rows goes through the model, and the
        results are repeated afterwards: the language model's cache (`Cache.batch_repeat_interleave`), the
        cross-attention keys and values, the image indices and the last position's logits. The rows being identical,
        only the rounding can differ from a prefill of all B * k rows (a matrix product of another row count may sum
        in another order: logits within ~1e-6, the same tokens in `tests/test_generation_shared_prefill.py`).

        The shared path needs an empty `DynamicCache` (transformers' default) and an unchunked prefill of `input_ids`;
        otherwise (a static or user-filled cache, `prefill_chunk_size`, `inputs_embeds`) every row is prefilled, as
        transformers does.

        Args:
            input_ids: (B * k, T) the prompts, each repeated `k` times (`_expand_inputs_for_generation`).
            model_kwargs: the model kwargs of `generate`, row tensors (B * k, ...) except `image_features` (B, ...).
        Returns:
            the prefill's output, every field with B * k rows; `model_kwargs` then holds the filled cache.
        """
        repeats = model_kwargs.pop(_PROMPT_REPEATS, 1)
        cache = model_kwargs.get(CACHE_NAME)
        shared = (
            repeats > 1
            and is_first_iteration
            and generation_config.prefill_chunk_size is None
            and model_kwargs.get("inputs_embeds") is None
            and model_kwargs.get("cross_attention_key_values") is None
            and type(cache) is DynamicCache
            and cache.get_seq_length() == 0
        )
        if not shared:
            if repeats > 1 and model_kwargs.get("image_features") is not None:
                model_kwargs["image_features"] = model_kwargs["image_features"].repeat_interleave(repeats, dim=0)
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=is_first_iteration)

        # Every row tensor was expanded with `repeat_interleave`: rows 0, k, 2k, ... are the prompts themselves.
        prompt_kwargs = {
            key: _first_of_repeats(value, repeats) if key != "image_features" else value
            for key, value in model_kwargs.items()
        }
        outputs = super()._prefill(
            input_ids[::repeats], generation_config, prompt_kwargs, is_first_iteration=is_first_iteration
        )
        cache.batch_repeat_interleave(repeats)  # the same object as `model_kwargs[CACHE_NAME]`
        for key, value in outputs.items():
            if key != CACHE_NAME:
                outputs[key] = _repeat_rows(value, repeats)
        if model_kwargs.get("image_features") is not None and not self.config.only_attend_immediate_media:
            # Later steps attend to every image and keep the features beside the keys/values, one row per beam.
            model_kwargs["image_features"] = model_kwargs["image_features"].repeat_interleave(repeats, dim=0)
        return outputs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        image_features: torch.FloatTensor | None = None,
        cross_attention_key_values: tuple | None = None,
        image_indices: torch.LongTensor | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        if (repeats := kwargs.pop(_PROMPT_REPEATS, None)) is not None and image_features is not None:
            # A decoding method that skipped `_prefill` (which consumes the marker) feeds every row to the model.
            image_features = image_features.repeat_interleave(repeats, dim=0)
        # The cache stays in `kwargs`, under the name `generate` uses (`CACHE_NAME`).
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        new_tokens = model_inputs["input_ids"].shape[1] if model_inputs.get("input_ids") is not None else None
        if image_indices is None:
            # Prefill: each prompt token belongs to the last <image> at or before it.
            indices = self.image_indices_from_input_ids(input_ids)
            image_indices = indices[:, -new_tokens:] if new_tokens is not None else indices
        else:
            # Decoding: generated tokens keep the image the prompt ended with (a generated <image> has no picture).
            image_indices = image_indices[:, -1:].expand(-1, new_tokens)
        model_inputs["image_indices"] = image_indices
        model_inputs["image_features"] = image_features
        model_inputs["cross_attention_key_values"] = cross_attention_key_values
        return model_inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        last = outputs.image_indices[:, -1:]
        key_values = getattr(outputs, "cross_attention_key_values", None)
        if key_values is not None and model_kwargs.get("image_features") is not None:
            if self.config.only_attend_immediate_media:
                # From here on every token of a sample attends to the same image: keep only that image's keys and
                # values (one instead of T_img per sample) and drop the image features.
                key_values, last = select_current_image(key_values, last)
                model_kwargs["image_features"] = None
            model_kwargs["cross_attention_key_values"] = key_values
        model_kwargs["image_indices"] = last
        return model_kwargs


# Model kwarg of `generate` from `_expand_inputs_for_generation` to `_prefill`: how many rows each prompt was expanded to.
_PROMPT_REPEATS = "_flamingo_prompt_repeats"


def _first_of_repeats(value: Any, repeats: int) -> Any:
    """One row per prompt out of a model kwarg whose rows `_expand_inputs_for_generation` repeated `repeats` times
    (a (B * k, ...) tensor gives (B, ...)); anything else as is."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    return value[::repeats]


def _repeat_rows(value: Any, repeats: int) -> Any:
    """(B, ...) -> (B * k, ...), each row followed by its copies, for a tensor or the tensors in nested tuples."""
    if isinstance(value, torch.Tensor):
        return value.repeat_interleave(repeats, dim=0)
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_rows(item, repeats) for item in value)
    return value


def _referenced_images(image_indices: torch.LongTensor, num_images: int) -> torch.BoolTensor:
    """(B, T) image indices -> (B, T_img) whether any token of the sample refers to each image slot.

    Tokens refer to images 1..k in order (k the largest index), so the slots after k are padding.
    """
    slots = torch.arange(1, num_images + 1, device=image_indices.device)
    return slots <= image_indices.max(dim=1, keepdim=True).values


def _zero_unreferenced_images(image_features: torch.Tensor, image_indices: torch.LongTensor) -> torch.Tensor:
    """(B, T_img, n, d) latents with the slots no token refers to replaced by zeros (selected, not multiplied:
    0 * NaN is NaN). Tokens without an image attend to every slot before their output is discarded, so the padding
    must hold finite values for that output to be finite."""
    referenced = _referenced_images(image_indices, image_features.shape[1]).to(image_features.device)
    return torch.where(referenced[:, :, None, None], image_features, 0.0)


def select_current_image(
    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...], last: torch.LongTensor
) -> tuple[tuple[tuple[torch.Tensor, torch.Tensor], ...], torch.LongTensor]:
    """Keep, per sample, the keys/values of image `last` (1-based, 0: none).

    With `only_attend_immediate_media`, every token after a sample's last `<image>` attends to that image only, so a
    continuation (generation, or class names scored after a prompt) needs its cross-attention keys/values alone:
    one image instead of T_img per sample.

    Args:
        key_values: per block, (B, heads, T_img, n, head_dim) keys and values.
        last: (B, 1) image index of each sample's last token.
    Returns:
        per block (B, heads, 1, n, head_dim) keys and values, and the (B, 1) indices into them (1, or 0 for none).
    """
    selected = []
    for key, value in key_values:
        img = (last[:, 0] - 1).clamp(min=0).to(key.device)
        batch = torch.arange(key.shape[0], device=key.device)
        selected.append((key[batch, :, img].unsqueeze(2), value[batch, :, img].unsqueeze(2)))
    return tuple(selected), (last > 0).long()


# Both Auto classes a saved folder's `auto_map` names (see `hub_code.CONFIG_AUTO_MAP`): registered here, they resolve to
# this class without remote code. AutoModel stays unmapped: there is no head-less base model (see docs/hub.md).
AutoModelForImageTextToText.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(FlamingoConfig, FlamingoForConditionalGeneration, exist_ok=True)

__all__ = [
    "FlamingoCausalLMOutputWithPast",
    "FlamingoDecoderLayer",
    "FlamingoForConditionalGeneration",
    "FlamingoGatedCrossAttentionBlock",
    "FlamingoPerceiverResampler",
    "FlamingoPreTrainedModel",
]
