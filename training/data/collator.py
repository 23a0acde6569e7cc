"""Batches of users' own interleaved image-text data, for transformers' `Trainer` or a `DataLoader`."""

from __future__ import annotations

from typing import Any

import torch

from modeling_flamingo.training.data.tokens import check_flamingo_tokenizer
from modeling_flamingo.training.labels import mask_flamingo_labels


class FlamingoDataCollator:
    r"""Collates interleaved image-text samples into training batches, for transformers' `Trainer`
    (`data_collator=`) or a `torch.utils.data.DataLoader` (`collate_fn=`), e.g. over an HF `datasets.Dataset`.

    Sample format: a dict with
        - `"text"`: the document with one `<image>` where each image goes, each image's chunk closed by
          `<|endofchunk|>`, as the original's templates write them: `"<image>A cat.<|endofchunk|><image>A dog
          runs.<|endofchunk|>"`. The tokenizer's eos token is appended (unless `add_eos_token=False` or the text
          already ends with it).
        - `"images"`: the sample's images in order, one per `<image>` (PIL images, as a `datasets.Image` feature
          yields them, arrays or tensors, or local paths); empty or absent for a text-only sample.

    Batches: `input_ids`, `attention_mask`, `labels` (B, L), right-padded to the longest sample (or `max_length`
    with `padding="max_length"`), and `pixel_values` (B, T_img, 1, 3, H, W) float32, T_img the most images of a
    sample, zeros after a sample's own (absent when no sample has an image). `labels` follow the original's
    masking (`mask_flamingo_labels`): pad and `<image>` tokens always get -100; with `interleaved=True` (its MMC4
    branch) so does text before the first `<image>` and between an `<|endofchunk|>` and the next `<image>`, with
    `interleaved=False` (its LAION branch) nothing else.

    With `Trainer`, pass `TrainingArguments(remove_unused_columns=False)`: otherwise it drops the `text` and `images`
    columns, which the model's `forward` does not name, before the collator sees them.

    Args:
        processor ([`FlamingoProcessor`]): tokenizer and image processor (sized for the model's vision tower).
        max_length (`int`, *optional*): truncate longer texts to this many tokens; a cut that would remove an
            `<image>` raises a `ValueError` (the processor refuses to drop an image's place silently).
        interleaved (`bool`, defaults to `True`): the label masking, see above.
        padding (`str`, defaults to `"longest"`): or `"max_length"` (needs `max_length`).
        add_eos_token (`bool`, defaults to `True`): append the eos token, as the original's templates do.
        text_key, images_key (`str`): the sample keys.
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_length: int | None = None,
        interleaved: bool = True,
        padding: str = "longest",
        add_eos_token: bool = True,
        text_key: str = "text",
        images_key: str = "images",
    ):
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}.")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length.")
        self.processor = processor
        self.tokens = check_flamingo_tokenizer(processor.tokenizer)
        self.max_length = max_length
        self.interleaved = interleaved
        self.padding = padding
        self.add_eos_token = add_eos_token
        self.text_key = text_key
        self.images_key = images_key

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("FlamingoDataCollator got an empty list of samples.")
        texts, images = [], []
        for index, sample in enumerate(samples):
            text = sample.get(self.text_key) if isinstance(sample, dict) else None
            if not isinstance(text, str):
                found = f"keys {sorted(sample)}" if isinstance(sample, dict) else type(sample).__name__
                raise ValueError(
                    f"Sample {index} has no {self.text_key!r} string ({found}). With transformers' Trainer, set "
                    "TrainingArguments(remove_unused_columns=False) so that the dataset's columns reach the collator."
                )
            if self.add_eos_token and not text.endswith(self.tokens.eos_token):
                text += self.tokens.eos_token
            texts.append(text)
            images.append(list(sample.get(self.images_key) or []))
        batch = self.processor(
            images=images if any(images) else None,
            text=texts,
            padding=self.padding,
            padding_side="right",
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids = batch["input_ids"]
        result = {
            "input_ids": input_ids,
            "attention_mask": batch["attention_mask"],
            "labels": mask_flamingo_labels(
                input_ids,
                self.tokens.pad_token_id,
                self.tokens.media_token_id,
                self.tokens.eoc_token_id,
                interleaved=self.interleaved,
            ),
        }
        if "pixel_values" in batch:
            result["pixel_values"] = batch["pixel_values"]
        return result
