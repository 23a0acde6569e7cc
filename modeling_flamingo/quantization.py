"""8-bit and 4-bit loading through bitsandbytes.

Only the language model's decoder layers are quantized. The vision tower, the resampler and the gated
cross-attention blocks stay in the loading dtype: they are a small share of the weights (under 20% of the 9B) and
the released cross-attention was trained against un-quantized image features, and the output head stays as
transformers keeps it by default.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

# Modules bitsandbytes must leave alone. transformers matches each entry as a regex from the start of a module's full
# name (up to a name boundary) or as its suffix.
FLAMINGO_SKIP_MODULES = ["vision_encoder", "perceiver", r".*\.gated_cross_attn_layer", "lm_head", "embed_out"]


def flamingo_bnb_config(bits: int = 8, compute_dtype: torch.dtype = torch.bfloat16, **kwargs) -> BitsAndBytesConfig:
    """A `BitsAndBytesConfig` quantizing the language model only.

    Example:
        model = FlamingoForConditionalGeneration.from_pretrained(
            path, quantization_config=flamingo_bnb_config(4), device_map="auto", dtype=torch.bfloat16
        )
    """
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(FLAMINGO_SKIP_MODULES), **kwargs)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_type=kwargs.pop("bnb_4bit_quant_type", "nf4"),
            llm_int8_skip_modules=list(FLAMINGO_SKIP_MODULES),
            **kwargs,
        )
    raise ValueError(f"bits must be 8 or 4, got {bits}.")


__all__ = ["FLAMINGO_SKIP_MODULES", "flamingo_bnb_config"]
