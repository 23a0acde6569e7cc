"""Training helpers that reproduce the original OpenFlamingo recipe (open_flamingo 2.0.1 `train/`)."""

from __future__ import annotations

import torch

from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration


def mask_flamingo_labels(
    input_ids: torch.LongTensor,
    pad_token_id: int,
    media_token_id: int,
    eoc_token_id: int | None = None,
    interleaved: bool = False,
) -> torch.LongTensor:
    """Labels for the language-modelling loss, masked as the original training loop masks them.

    Pad and `<image>` tokens get -100. With `interleaved=True` (the original's MMC4 branch) the tokens before the
    first `<image>` of a sample and the tokens after each `<|endofchunk|>` up to the next `<image>` get -100 too,
    so the model is never asked to predict text that no image precedes.

    Args:
        input_ids: (B, T).
    Returns:
        (B, T) labels; the language model shifts them.
    """
    labels = input_ids.clone()
    if interleaved:
        if eoc_token_id is None:
            raise ValueError("interleaved=True needs eoc_token_id.")
        is_media = input_ids == media_token_id
        is_eoc = input_ids == eoc_token_id
        # A token is masked when the most recent <image>/<|endofchunk|> marker before it is an <|endofchunk|>, or
        # when no <image> came before it at all. Track the position of the last marker of each kind.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_media = torch.where(is_media, positions, -1).cummax(dim=1).values
        last_eoc = torch.where(is_eoc, positions, -1).cummax(dim=1).values
        before_first_image = last_media < 0
        after_eoc = (last_eoc > last_media) & ~is_eoc
        labels[(before_first_image | after_eoc) & ~is_media] = -100
    labels[input_ids == pad_token_id] = -100
    labels[input_ids == media_token_id] = -100
    return labels


def freeze_for_flamingo_training(model: FlamingoForConditionalGeneration, train_embeddings: bool = True) -> None:
    """Freeze everything except what the original trains: the resampler, the gated cross-attention blocks and (unless
    `train_embeddings=False`, the original's `--freeze_lm_embeddings`) the LM's input embeddings."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    for block in model.gated_cross_attn_layers:
        block.requires_grad_(True)
    if train_embeddings:
        model.get_input_embeddings().requires_grad_(True)


__all__ = ["freeze_for_flamingo_training", "mask_flamingo_labels"]
