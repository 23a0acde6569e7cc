"""The model a training run starts from: a saved/converted Flamingo, or a fresh one assembled from its parts."""

from __future__ import annotations

import torch

from modeling_flamingo.configuration.configuration_flamingo import VISION_TOWER_HAS_CLS_TOKEN, FlamingoConfig
from modeling_flamingo.convert.mapping import language_model_key
from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor
from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN, FlamingoProcessor

# What a fresh model does not take from its parts: the connecting modules start from their initialisation.
_NEW_PREFIXES = ("perceiver.",)

# A vision tower's folder (`config.json` model type, of the vision model or of the dual-encoder holding it) -> the
# vision model class that reads it (it takes the vision half of a `CLIPModel`/`SiglipModel`/`Siglip2Model` folder).
_VISION_TOWER_CLASSES = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "siglip2_vision_model": "Siglip2VisionModel",
}
# The parts of a SigLIP tower a Flamingo does not run (see `FlamingoForConditionalGeneration`): not copied.
_UNUSED_SIGLIP_PREFIXES = ("post_layernorm.", "head.")


def load_vision_tower(path: str):
    """The vision model of a CLIP, SigLIP or SigLIP2 folder or hub id (vision-only or dual-encoder weights), in
    float32; any other model type is a `ValueError` naming it and the supported ones."""
    import transformers
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in _VISION_TOWER_CLASSES:
        raise ValueError(
            f"Vision tower {path}: a {model_type!r} model is not supported; give a CLIP, SigLIP or SigLIP2 model "
            "(folder or hub id)."
        )
    return getattr(transformers, _VISION_TOWER_CLASSES[model_type]).from_pretrained(path, dtype=torch.float32)


def load_flamingo(
    path: str, revision: str | None = None
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """A saved or converted folder, or a hub id (original OpenFlamingo repos are converted once), in float32."""
    from pathlib import Path

    from modeling_flamingo.convert.sources import looks_like_repo_id

    if not Path(path).is_dir() and not looks_like_repo_id(path):
        raise ValueError(f"--model {path}: no such folder, and not a hub repo id")
    kwargs = {"revision": revision} if revision else {}
    model = FlamingoForConditionalGeneration.from_pretrained(path, dtype=torch.float32, **kwargs)
    processor = FlamingoProcessor.from_pretrained(path, **kwargs)
    return model, processor


def build_fresh_flamingo(
    vision_model: str,
    language_model: str,
    tokenizer: str | None = None,
    cross_attn_every_n_layers: int = 1,
    revision: str | None = None,
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """A new Flamingo as the original `create_model_and_transforms` makes one: the pretrained vision tower and
    language model, the tokenizer with `<|endofchunk|>`, `<image>` (and `<PAD>`) added and the LM's embeddings resized
    to it, a freshly initialised resampler and gated cross-attention blocks whose gates start closed (tanh(0) = 0:
    the new model computes exactly its language model's logits).

    Args:
        vision_model: CLIP, SigLIP or SigLIP2 folder or hub id (the dual encoder's or the vision model's weights).
        language_model: causal LM folder or hub id.
        tokenizer: defaults to `language_model`.
        cross_attn_every_n_layers: a block before every n-th decoder layer.
        revision: hub revision of the language model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_flamingo.processing.processing_flamingo import add_flamingo_tokens

    tok = add_flamingo_tokens(AutoTokenizer.from_pretrained(tokenizer or language_model))
    vision = load_vision_tower(vision_model)
    lm_kwargs = {"revision": revision} if revision else {}
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32, **lm_kwargs)
    lm.resize_token_embeddings(len(tok))
    return assemble_flamingo(vision, lm, tok, cross_attn_every_n_layers)


def assemble_flamingo(
    vision, lm, tokenizer, cross_attn_every_n_layers: int
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """`build_fresh_flamingo` from loaded parts.

    Args:
        vision: the vision tower, a `CLIPVisionModel`, `SiglipVisionModel` or `Siglip2VisionModel`, or the
            `CLIPModel`/`SiglipModel`/`Siglip2Model` holding it (reduced to its `vision_model`). Its preprocessing
            comes with it (`FlamingoImageProcessor.from_flamingo_config`): open_clip's transform for CLIP, SigLIP's
            own settings for SigLIP and SigLIP2.
        lm: a causal LM whose embeddings already match `tokenizer`.
        tokenizer: the LM's tokenizer with the Flamingo tokens (`add_flamingo_tokens`).
        cross_attn_every_n_layers: a gated cross-attention block before every n-th decoder layer.
    Returns:
        the model, its gates closed (it computes exactly `lm`'s logits), and its processor.
    """
    if getattr(vision.config, "vision_config", None) is not None:  # a dual encoder: keep its vision half
        vision = vision.vision_model
    if vision.config.model_type not in VISION_TOWER_HAS_CLS_TOKEN:
        raise ValueError(
            f"A {type(vision).__name__} is not a supported vision tower: give a CLIP, SigLIP or SigLIP2 vision model."
        )
    if lm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        raise ValueError(
            f"The language model has {lm.get_input_embeddings().weight.shape[0]} embedding rows but the tokenizer "
            f"{len(tokenizer)} tokens: resize_token_embeddings(len(tokenizer)) first."
        )
    config = FlamingoConfig(
        vision_config=vision.config.to_dict(),
        text_config=lm.config.to_dict(),
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        media_token_id=tokenizer.encode(MEDIA_TOKEN)[-1],
        eoc_token_id=tokenizer.encode(EOC_TOKEN)[-1],
    )
    model = FlamingoForConditionalGeneration(config)
    unused = () if VISION_TOWER_HAS_CLS_TOKEN[vision.config.model_type] else _UNUSED_SIGLIP_PREFIXES
    state = {"vision_encoder." + k: v for k, v in vision.state_dict().items() if not k.startswith(unused)}
    layers = config.decoder_layers_attr_name
    state.update({language_model_key(k, layers): v for k, v in lm.state_dict().items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    new = [k for k in missing if not (k.startswith(_NEW_PREFIXES) or ".gated_cross_attn_layer." in k)]
    tied = [k for k in new if k.endswith("lm_head.weight") and config.tie_word_embeddings]
    if unexpected or set(new) - set(tied):
        raise ValueError(
            f"The parts do not fit together: unexpected {unexpected[:3]}, missing {sorted(set(new) - set(tied))[:3]}."
        )
    model.tie_weights()
    processor = FlamingoProcessor(
        image_processor=FlamingoImageProcessor.from_flamingo_config(config), tokenizer=tokenizer
    )
    return model, processor


__all__ = ["assemble_flamingo", "build_fresh_flamingo", "load_flamingo", "load_vision_tower"]
