"""How much GPU memory the released models need, checked without their weights.

`released_config(name)` rebuilds each release's architecture (the numbers of its language model's hub config.json,
CLIP ViT-L/14, and the embedding rows of its `checkpoint.pt`), so a model can be instantiated on the meta device and
placed with Accelerate's `infer_auto_device_map` exactly as `from_pretrained(..., device_map="auto")` would place it.

`inference_reserve_bytes` is the memory generation needs beside the weights; see its docstring for the terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import infer_auto_device_map, init_empty_weights

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig
from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration

CLIP_VIT_L_14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    hidden_act="quick_gelu",
    projection_dim=768,
)

# GPT-NeoX-20B tokenizer (MPT, RedPajama): 50,277 tokens + <|endofchunk|>, <image>, <PAD>. LLaMA: 32,000 + 3.
_NEOX_VOCAB, _LLAMA_VOCAB = 50280, 32003

RELEASED = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": (
        dict(model_type="mosaic_gpt", d_model=2048, n_heads=16, n_layers=24, mlp_ratio=4, max_seq_len=2048,
             attn_qk_ln=True, alibi=True, no_bias=True, vocab_size=_NEOX_VOCAB),
        1,
    ),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": (
        dict(model_type="gpt_neox", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
             intermediate_size=10240, max_position_embeddings=2048, vocab_size=_NEOX_VOCAB),
        2,
    ),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": (
        dict(model_type="mpt", d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048,
             attn_config={"alibi": True}, vocab_size=_NEOX_VOCAB),
        4,
    ),
    "openflamingo/OpenFlamingo-9B-deprecated": (
        dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             intermediate_size=11008, max_position_embeddings=2048, vocab_size=_LLAMA_VOCAB),
        4,
    ),
}  # fmt: skip
RELEASED["openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct"] = RELEASED["openflamingo/OpenFlamingo-3B-vitl-mpt1b"]
RELEASED["openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct"] = RELEASED["openflamingo/OpenFlamingo-4B-vitl-rpj3b"]


def released_config(name: str) -> FlamingoConfig:
    """The architecture of a released OpenFlamingo (token ids left unset: they do not change sizes)."""
    text, every_n = RELEASED[name]
    return FlamingoConfig(vision_config=dict(CLIP_VIT_L_14), text_config=dict(text), cross_attn_every_n_layers=every_n)


def meta_model(config: FlamingoConfig, dtype: torch.dtype = torch.bfloat16) -> FlamingoForConditionalGeneration:
    """The model with no storage behind its weights."""
    with init_empty_weights():
        model = FlamingoForConditionalGeneration(config)
    model.tie_weights()
    return model.to(dtype)


@dataclass
class InferenceReserve:
    """Memory beside the weights for one generation, in bytes."""

    kv_cache: int
    vision: int
    media_key_values: int
    prefill_transients: int
    cuda_context: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.vision + self.media_key_values + self.prefill_transients + self.cuda_context


def inference_reserve_bytes(
    config: FlamingoConfig, num_images: int = 33, context: int = 2048, batch: int = 1, dtype_bytes: int = 2
) -> InferenceReserve:
    """Upper estimate of what a `num_images`-image, `context`-token generation needs beside the weights.

    - kv_cache: the language model's keys and values for the whole context, 2 x layers x context x width.
    - vision: the largest CLIP activation set at once for all images: hidden states (x4 for the MLP) and the
      attention scores of one layer, all images in one batch (the model encodes them together).
    - media_key_values: keys and values of every image's latents for every cross-attention block (prefill).
    - prefill_transients: the biggest per-layer temporaries of the prefill, all alive at once: a cross-attention
      score matrix over every image's latents, the self-attention scores (no fused kernel assumed), the MLP's
      intermediate activations, the fp32 logits of the last position.
    - cuda_context: the CUDA context and allocator slack (about 1 GiB on recent drivers).
    """
    t, v = config.text_config, config.vision_config
    width, layers = t.hidden_size, t.num_hidden_layers
    heads = t.num_attention_heads
    n_img = batch * num_images
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    latents = config.perceiver_num_latents
    inner = config.cross_attn_heads * config.cross_attn_head_dim
    kv_cache = 2 * layers * batch * context * width * dtype_bytes
    vision = n_img * tokens * (4 * v.hidden_size + v.intermediate_size) * dtype_bytes
    vision += n_img * v.num_attention_heads * tokens * tokens * dtype_bytes
    media_kv = config.num_cross_attn_layers * 2 * n_img * latents * inner * dtype_bytes
    prefill = batch * config.cross_attn_heads * context * num_images * latents * dtype_bytes
    prefill += batch * heads * context * context * dtype_bytes
    prefill += batch * context * 4 * width * 2 * dtype_bytes
    prefill += batch * t.vocab_size * 4
    return InferenceReserve(kv_cache, vision, media_kv, prefill, cuda_context=2**30)


def plan_single_gpu(name: str, gpu_bytes: int, dtype: torch.dtype = torch.bfloat16, **reserve_kwargs) -> dict:
    """Place a released model on GPU 0 of `gpu_bytes`, keeping `inference_reserve_bytes` free.

    Returns the device map, the weight bytes and the reserve; a module that does not fit lands on "cpu".
    """
    config = released_config(name)
    model = meta_model(config, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    reserve = inference_reserve_bytes(config, dtype_bytes=torch.finfo(dtype).bits // 8, **reserve_kwargs)
    device_map = infer_auto_device_map(
        model,
        max_memory={0: gpu_bytes - reserve.total, "cpu": 2**40},
        no_split_module_classes=model._no_split_modules,
        dtype=dtype,
    )
    return {"device_map": device_map, "weights": weights, "reserve": reserve}


__all__ = ["RELEASED", "inference_reserve_bytes", "meta_model", "plan_single_gpu", "released_config"]
