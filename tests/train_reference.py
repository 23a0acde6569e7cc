"""The original training loop's side of the step-parity tests: its DDP-like wrapper, its parameter groups and batch
formats, and our parameters' names and gradients under the original's names."""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
from torch import nn

from modeling_flamingo.convert.mapping import canonical_original_key, original_key, strip_wrapper_prefixes
from modeling_flamingo.training.export import _to_original_lm_name
from modeling_flamingo.training.token_rows import ROWS_PARAMETER

# The original's train_utils imports wandb at module level and uses it only when reporting to it: a stand-in when
# wandb is not installed (never in place of the real one, which the logging tests use in the same session).
if importlib.util.find_spec("wandb") is None:
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
from open_flamingo.train import train_utils  # noqa: E402, F401 (the original's loop, for the parity tests)


class DDPLike(nn.Module):
    """What the original loop expects from a non-FSDP model: the Flamingo module under `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.losses: list[float] = []

    def forward(self, **kwargs):
        out = self.module(**kwargs)
        self.losses.append(float(out[0].detach()))
        return out


def original_param_groups(named_params, weight_decay: float) -> list[dict]:
    """The grouping written in the original train.py's main() (not importable): weight decay where the name contains
    "gated_cross_attn", none elsewhere, trainable parameters only."""
    with_wd = [p for n, p in named_params if p.requires_grad and "gated_cross_attn" in n]
    without = [p for n, p in named_params if p.requires_grad and "gated_cross_attn" not in n]
    return [{"params": with_wd, "weight_decay": weight_decay}, {"params": without, "weight_decay": 0.0}]


def original_batches(laion: dict, mmc4: dict):
    """The same batches in the original's loader formats (LAION: flat images; MMC4: per-sample (ids, mask) pairs)."""
    laion_images = laion["pixel_values"][:, 0, 0]  # (B, 3, H, W)
    batch_laion = (laion_images, (laion["input_ids"], laion["attention_mask"]))
    mmc4_images = mmc4["pixel_values"][:, :, 0]  # (B, T_img, 3, H, W)
    pairs = [(ids[None], mask[None]) for ids, mask in zip(mmc4["input_ids"], mmc4["attention_mask"], strict=True)]
    return batch_laion, (mmc4_images, pairs)


class OneBatch(list):
    def __init__(self, batch):
        super().__init__([batch])
        self.num_batches = 1


def original_name(ours_name: str, model_type: str) -> str:
    return _to_original_lm_name(original_key(ours_name), model_type)


def canonical_name(name: str, layers_attr: str) -> str:
    return canonical_original_key(strip_wrapper_prefixes(name), layers_attr)[0]


def embedding_name(model) -> str:
    weight = model.get_input_embeddings().weight
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is weight)


def as_original(model, name: str) -> str:
    """The original's name of one of our trainable parameters; our (2, d) trained embedding rows
    (`...flamingo_token_rows`) stand for the original's trained input embedding."""
    if name.endswith("." + ROWS_PARAMETER):
        name = embedding_name(model)
    return original_name(name, model.config.text_config.model_type)


def grads_as_original(model, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trainable parameters' gradients under the original's names. The rows' gradient is scattered into a
    zero (vocab, d) tensor: the original's embedding gradient after its masking has exactly that form."""
    new_rows = sorted({model.config.media_token_id, model.config.eoc_token_id})
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        grad = grads[name]
        if name.endswith("." + ROWS_PARAMETER):
            dense = torch.zeros_like(model.get_input_embeddings().weight)
            dense[new_rows] = grad
            grad = dense
        out[as_original(model, name)] = grad
    return out
