"""Exports of a trained model: a `save_pretrained` folder and a `checkpoint.pt` in the original v2 release layout.

The release layout is what `open_flamingo`'s `save_checkpoint` writes once its wrappers are stripped and what its
evaluation code and our converter read: a flat state dict, under the original module names, of the trainable
parameters (resampler, gated cross-attention, input embeddings) plus every language-model parameter whose original
name contains "embed" (GPT-NeoX's `embed_out` head). No vision tower, no frozen decoder weights.

Neither export writes NaN or infinite weights: they run the converter's check (`convert.writer.check_finite`) on every
tensor before writing anything, so diverged weights never replace a good export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from modeling_flamingo.convert.mapping import LM_KEY_RENAMES, original_key
from modeling_flamingo.convert.writer import check_finite
from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration


def _to_original_lm_name(key: str, model_type: str) -> str:
    """`lang_encoder.lm_head.weight` -> `lang_encoder.embed_out.weight` for GPT-NeoX (hub and release naming)."""
    for old, new in LM_KEY_RENAMES.get(model_type, ()):
        if key.startswith("lang_encoder." + new):
            return "lang_encoder." + old + key[len("lang_encoder." + new) :]
    return key


def original_checkpoint_state_dict(
    model: FlamingoForConditionalGeneration, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Our model's weights as the original's v2 `checkpoint.pt` holds them.

    Args:
        model: the (unwrapped) model; its `requires_grad` flags say what was trained.
        state_dict: its full state dict (e.g. `accelerator.get_state_dict(model)` under FSDP or DeepSpeed, where the
            module's own tensors are shards); defaults to `model.state_dict()`.
    Returns:
        name -> contiguous CPU tensor, names as in `open_flamingo`'s `Flamingo` module.
    """
    if state_dict is None:
        state_dict = model.state_dict()
    model_type = model.config.text_config.model_type
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    input_embedding = model.get_input_embeddings().weight
    embedding_names = {name for name, p in model.named_parameters(remove_duplicate=False) if p is input_embedding}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.startswith("vision_encoder."):
            continue  # the original never saves the vision tower
        if not (key.startswith("perceiver.") or key.startswith("language_model.")):
            continue  # e.g. adapter weights, saved separately
        name = _to_original_lm_name(original_key(key), model_type)
        keep = (
            key.startswith("perceiver.")
            or ".gated_cross_attn_layer." in key
            or key in trainable
            or key in embedding_names
            or "embed" in name
        )
        if keep and name not in out:
            out[name] = tensor.detach().to("cpu").contiguous().clone()
    return out


def _check_finite_weights(state_dict: Mapping[str, torch.Tensor], target: Path) -> None:
    """`NonFiniteWeightsError` naming the first tensor of `state_dict` holding NaN or inf; `target` is untouched."""
    for name, tensor in state_dict.items():
        check_finite(name, tensor, f"{target} not written: what it holds is left as it was")


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_original_checkpoint(
    model: FlamingoForConditionalGeneration,
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `original_checkpoint_state_dict(model, state_dict)` to `path` with `torch.save` (tensors only, so it loads
    with `weights_only=True`); written to a temporary file first and renamed, so a crash never leaves half a file.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or inf (named in the message); nothing is written.
    """
    path = Path(path)
    state = original_checkpoint_state_dict(model, state_dict)
    _check_finite_weights(state, path)
    tmp = _atomic_target(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_pretrained_folder(
    model: FlamingoForConditionalGeneration,
    processor,
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`model.save_pretrained` (with `state_dict` when given) and `processor.save_pretrained` into `folder`, through a
    temporary sibling folder that replaces `folder` only once complete.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or inf (named in the message); nothing is written.
    """
    folder = Path(folder)
    _check_finite_weights(state_dict if state_dict is not None else model.state_dict(), folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(staging, state_dict=dict(state_dict) if state_dict is not None else None)
        if processor is not None:
            processor.save_pretrained(staging)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "content")
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


__all__ = ["original_checkpoint_state_dict", "save_original_checkpoint", "save_pretrained_folder"]
