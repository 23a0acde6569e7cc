"""Optimiser, learning-rate schedule and gradient masking of the original OpenFlamingo recipe (open_flamingo 2.0.1
`train/train.py`, `train_utils.py`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from modeling_flamingo.training.sharding import local_rows

LR_SCHEDULERS = ("constant", "linear", "cosine")

# The original puts a parameter in the weight-decay group when its name contains this.
WEIGHT_DECAY_MARKER = "gated_cross_attn"


def flamingo_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The original's two AdamW groups over the trainable parameters: weight decay on the gated cross-attention
    blocks only, none on the resampler and the embeddings.

    Frozen parameters are left out. The names are those of `model.named_parameters()`, so this works on the bare
    model and on wrapped ones (DDP's `module.` prefix and similar keep the marker in the name).
    """
    with_wd, without_wd = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (with_wd if WEIGHT_DECAY_MARKER in name else without_wd).append(param)
    if not with_wd and not without_wd:
        raise ValueError("The model has no trainable parameters: call freeze_for_flamingo_training(model) first.")
    return [
        {"params": with_wd, "weight_decay": weight_decay},
        {"params": without_wd, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (torch defaults for betas and eps, as the original) over `flamingo_parameter_groups`."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}.")
    return torch.optim.AdamW(flamingo_parameter_groups(model, weight_decay), lr=learning_rate)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` optimiser steps, then constant, linear decay to 0 or cosine decay to 0 at
    `total_steps` (transformers' schedules, as the original uses)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}.")
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {name!r}.")


class EmbeddingGradientMask:
    """Keeps every input-embedding row but those of the given tokens (`<image>`, `<|endofchunk|>`) from changing, as
    the original does by zeroing the other rows' gradients after the backward pass.

    With a zero gradient and no weight decay (the embeddings are in the group without it) AdamW leaves a row
    untouched, so those rows stay bit-identical. When the language model ties its output head to the input
    embeddings (MPT, MosaicGPT), the head's gradient goes through the same tensor and is masked with it, as in
    the original.

    Two mechanisms, one per kind of training wrapper:
    - `register_hook(weight)`: a gradient hook on the parameter, run before its gradient is accumulated and reduced.
      Works for one process, DDP and DeepSpeed (whose ZeRO stages consume gradients inside `backward`).
    - `apply(weight)`: zero the rows of `weight.grad` after the backward pass. For FSDP2, whose parameters (and
      gradients) are row-sharded `DTensor`s that replace the hooked parameter: only the local rows are touched.

    As the trainer's token-rows strategy (`token_rows.TokenRowsStrategy`): `attach(model, hook=...)` picks one.
    """

    def __init__(self, token_ids: Iterable[int]):
        self.token_ids = sorted({int(t) for t in token_ids})
        if not self.token_ids:
            raise ValueError("EmbeddingGradientMask needs at least one token id to keep trainable.")
        self._mask_before_step = False

    def attach(self, model: nn.Module, hook: bool = True) -> None:
        """Mask the gradient of `model`'s input embeddings: through a gradient hook (`hook`), or, where the training
        wrapper replaces the parameter (FSDP2), in `before_optimizer_step`."""
        self._mask_before_step = not hook
        if hook:
            self.register_hook(model.get_input_embeddings().weight)

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Zero the other rows' gradients of `model` (unwrapped) when no hook does (`attach(model, hook=False)`)."""
        if self._mask_before_step:
            self.apply(model.get_input_embeddings().weight)

    def after_optimizer_step(self) -> None:
        """Nothing: the dense embedding weight is the trained parameter itself."""

    def hides_parameter(self, name: str) -> bool:
        """False: no parameter of its own (every trained parameter is in the state dict)."""
        return False

    def row_mask(self, num_rows: int, start: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
        """(num_rows, 1) mask of rows `start .. start + num_rows - 1`: 1 for the kept tokens, 0 elsewhere."""
        mask = torch.zeros(num_rows, 1, device=device, dtype=dtype)
        for token in self.token_ids:
            if start <= token < start + num_rows:
                mask[token - start] = 1
        return mask

    def _check(self, weight: torch.Tensor) -> None:
        if self.token_ids[-1] >= weight.shape[0]:
            raise ValueError(
                f"token id {self.token_ids[-1]} is outside the input embeddings ({weight.shape[0]} rows): the "
                "tokenizer and the model do not match."
            )

    def register_hook(self, weight: nn.Parameter) -> torch.utils.hooks.RemovableHandle:
        self._check(weight)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.row_mask(grad.shape[0], device=grad.device, dtype=grad.dtype)

        return weight.register_hook(hook)

    @torch.no_grad()
    def apply(self, weight: torch.Tensor) -> None:
        self._check(weight)
        if weight.grad is None:
            return
        local, start = local_rows(weight.grad)  # FSDP2: this process's rows only
        if local.shape[0]:
            local.mul_(self.row_mask(local.shape[0], start=start, device=local.device, dtype=local.dtype))


__all__ = [
    "LR_SCHEDULERS",
    "EmbeddingGradientMask",
    "build_lr_scheduler",
    "build_optimizer",
    "flamingo_parameter_groups",
]
