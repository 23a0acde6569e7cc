"""The original OpenFlamingo (pip `open-flamingo` 2.0.1, open_clip 2.20), built from tiny parts exactly as its
`create_model_and_transforms` builds the released models, and our model carrying the same weights."""

from __future__ import annotations

import contextlib
from unittest import mock

import open_clip
import torch
from open_flamingo.src import factory as of_factory
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from transformers import AutoModelForCausalLM

from modeling_flamingo import FlamingoConfig, FlamingoForConditionalGeneration
from modeling_flamingo.convert.mapping import original_flamingo_state_dict
from modeling_flamingo.testing import (
    CROSS_ATTN_EVERY,
    make_tiny_tokenizer,
    tiny_text_config,
    tiny_vision_config,
)

# Compatibility shim, numerics untouched: transformers 5 drops an all-ones attention mask before the first forward
# of generate(), and the original mixin takes `attention_mask` as a required positional argument.
if FlamingoLMMixin.forward.__defaults__ is None:
    FlamingoLMMixin.forward.__defaults__ = (None,)

# The lang_encoder_path decides the original's MPT-1B embedding hack and nothing else here.
LM_PATHS = {
    "llama": "tiny/llama",
    "gpt_neox": "tiny/gpt-neox",
    "mpt": "tiny/mpt-7b",
    "mosaic_gpt": "tiny/mpt-1b-redpajama-200b",
}


def tiny_open_clip(seed: int = 0, vision_config=None) -> open_clip.CLIP:
    """An open_clip CLIP whose vision tower matches `vision_config` (default `tiny_vision_config()`; QuickGELU)."""
    vc = vision_config or tiny_vision_config()
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=vc.num_hidden_layers,
            width=vc.hidden_size,
            head_width=vc.hidden_size // vc.num_attention_heads,
            patch_size=vc.patch_size,
            image_size=vc.image_size,
            mlp_ratio=vc.intermediate_size / vc.hidden_size,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=True,
    )


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter a random value (norms near 1, gates open) so no component can hide behind its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("_gate"):
                p.copy_(0.5 + noise.abs().clamp(max=1.0))
            elif p.ndim == 1 and ("norm" in name or "ln" in name.split(".")[-2:][0]):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def build_original(
    family: str, seed: int = 0, cross_attn_every_n_layers: int | None = None, text_config=None, vision_config=None
):
    """Return (original Flamingo module, tokenizer) built by `open_flamingo.create_model_and_transforms` from a
    random language model (`text_config`, default the tiny one of `family`) and CLIP tower (`vision_config`)."""
    tokenizer = make_tiny_tokenizer(bos_token="<s>" if family == "llama" else None)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(text_config or tiny_text_config(family))
    vision_config = vision_config or tiny_vision_config()
    clip = tiny_open_clip(seed, vision_config)
    vision_width = vision_config.hidden_size
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(of_factory.open_clip, "create_model_and_transforms", lambda *a, **k: (clip, None, None))
        )
        stack.enter_context(
            mock.patch.object(
                of_factory.open_clip, "get_model_config", lambda *a, **k: {"vision_cfg": {"width": vision_width}}
            )
        )
        stack.enter_context(mock.patch.object(of_factory.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer))
        stack.enter_context(mock.patch.object(of_factory.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: lm))
        model, _, tokenizer = of_factory.create_model_and_transforms(
            clip_vision_encoder_path="tiny-ViT",
            clip_vision_encoder_pretrained="openai",
            lang_encoder_path=LM_PATHS[family],
            tokenizer_path=LM_PATHS[family],
            cross_attn_every_n_layers=cross_attn_every_n_layers or CROSS_ATTN_EVERY[family],
        )
    randomize_(model, seed + 1)
    model.eval()
    return model, tokenizer


def ours_from_original(
    original, tokenizer, family: str, vision_config=None, **config_kwargs
) -> FlamingoForConditionalGeneration:
    """Our model with the original's weights (vision tower included)."""
    config = FlamingoConfig(
        vision_config=(vision_config or tiny_vision_config()).to_dict(),
        text_config=original.lang_encoder.config.to_dict(),
        cross_attn_every_n_layers=_every_n(original),
        media_token_id=original.media_token_id,
        eoc_token_id=original.eoc_token_id,
        **config_kwargs,
    )
    model = FlamingoForConditionalGeneration(config)
    state = original_flamingo_state_dict(original.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    # post_layernorm's weights exist in CLIPVisionModel and in the open_clip tower: both carried over.
    assert not unexpected, unexpected
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    assert set(missing) <= tied, set(missing) - tied
    model.tie_weights()
    return model.eval()


def _every_n(original) -> int:
    layers = original.lang_encoder._get_decoder_layers()
    first = next(i for i, layer in enumerate(layers) if layer.gated_cross_attn_layer is not None)
    return first + 1


def random_pixels(batch: int, images: int, size: int = 42, seed: int = 0) -> torch.Tensor:
    """(batch, images, 1, 3, size, size) normalised-looking pixel values."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, images, 1, 3, size, size, generator=gen)


def original_label_masking(
    input_ids: torch.Tensor, pad: int, media: int, eoc: int, interleaved: bool = True
) -> torch.Tensor:
    """Transcription of the label masking inline in open_flamingo 2.0.1 `train_utils.train_one_epoch` (it is no
    function there, so it cannot be called): the MMC4 branch with `interleaved=True`, the LAION branch (pad and
    `<image>` only) without. Its `labels == tokenizer.eos_token` line compares ids with a string: a no-op."""
    labels = input_ids.clone()
    labels[labels == pad] = -100
    if interleaved:
        for i in range(labels.shape[0]):
            j = 0
            while j < labels.shape[1] and labels[i][j] != media:
                labels[i][j] = -100
                j += 1
            for e in torch.where(labels[i] == eoc)[0]:
                k = e + 1
                while k < labels.shape[1] and labels[i][k] != media:
                    labels[i][k] = -100
                    k += 1
    labels[labels == media] = -100
    return labels
