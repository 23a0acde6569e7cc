"""The dtypes weights are converted to and loaded in, under both of their spellings: torch's name (`float32`, the
converter's `--dtype`, transformers' `dtype="float32"`) and the short one (`fp32`, the evaluation's `--precision`).

One table, imported by the converter and the evaluation alike; it imports nothing of this package.
"""

from __future__ import annotations

import torch

# (torch's name, short name, dtype), in the order the CLIs list them.
WEIGHT_DTYPES: tuple[tuple[str, str, torch.dtype], ...] = (
    ("float32", "fp32", torch.float32),
    ("bfloat16", "bf16", torch.bfloat16),
    ("float16", "fp16", torch.float16),
)
# "float32" -> torch.float32, ...
DTYPES: dict[str, torch.dtype] = {name: dtype for name, _, dtype in WEIGHT_DTYPES}
# "fp32" -> torch.float32, ...
SHORT_DTYPES: dict[str, torch.dtype] = {short: dtype for _, short, dtype in WEIGHT_DTYPES}
