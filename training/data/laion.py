"""LAION image-text samples (img2dataset layout): decoding, the original's batch preprocessing, the pipeline."""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN
from modeling_flamingo.training.data.images import check_resized_size, decode_rgb_image, maybe_flip, pixel_values_of
from modeling_flamingo.training.data.pipeline import ShardPipeline
from modeling_flamingo.training.data.skips import SkipSample, read_samples
from modeling_flamingo.training.data.tokens import FlamingoTokens
from modeling_flamingo.training.labels import mask_flamingo_labels

LAION_MAX_TOKENS = 32
# Image members of a LAION sample, in the order the original picks the first present one.
LAION_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")


def decode_laion_sample(
    sample: dict[str, Any], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[PIL.Image.Image, str]:
    """(RGB image, caption) of a LAION sample; raises `SkipSample` (`incomplete_sample`, `undecodable_image`,
    `image_too_large`, `undecodable_text`, `image_token_in_text`)."""
    extension = next((ext for ext in LAION_IMAGE_EXTENSIONS if ext in sample), None)
    if "txt" not in sample or extension is None:
        raise SkipSample("incomplete_sample", sample.get("__key__", ""))
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as error:
        raise SkipSample("undecodable_text", repr(error)) from None
    if MEDIA_TOKEN in caption:
        raise SkipSample("image_token_in_text", sample.get("__key__", ""))
    return decode_rgb_image(sample[extension], max_pixels), caption


def preprocess_laion_batch(
    images: list[PIL.Image.Image] | torch.Tensor,
    captions: list[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    tokens: FlamingoTokens,
    flip_generator: torch.Generator | None = None,
    max_tokens: int = LAION_MAX_TOKENS,
) -> dict[str, torch.Tensor]:
    """One LAION batch from decoded samples.

    Args:
        images: RGB images, or their pixel values (B, 3, H, W) already computed with `pixel_values_of`.

    Returns:
        `pixel_values` (B, 1, 1, 3, H, W) float32, `input_ids` / `attention_mask` / `labels` (B, L), L the longest
        tokenized text of the batch and at most `max_tokens`.
    """
    if not isinstance(images, torch.Tensor):
        images = pixel_values_of(images, image_processor)
    pixel_values = maybe_flip(images, flip_generator)
    texts = [f"{MEDIA_TOKEN}{caption.strip()}{EOC_TOKEN}{tokens.eos_token}" for caption in captions]
    encoding = tokenizer(
        texts,
        max_length=max_tokens,
        padding="longest",
        truncation="only_first",
        padding_side="right",
        return_tensors="pt",
    )
    input_ids = encoding["input_ids"]
    return {
        "pixel_values": pixel_values[:, None, None].float(),
        "input_ids": input_ids,
        "attention_mask": encoding["attention_mask"],
        "labels": mask_flamingo_labels(input_ids, tokens.pad_token_id, tokens.media_token_id),
    }


class LaionPipeline(ShardPipeline):
    """LAION batches (`preprocess_laion_batch`) of one process; see `build_laion_loader`."""

    def _read(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str]:
        """(3, H, W) pixel values and the caption of one sample."""
        image, caption = decode_laion_sample(sample, self.config.max_image_pixels)
        check_resized_size(*image.size, self.config.max_image_pixels, self.image_processor)
        # Transformed at once: a batch waits as B small tensors, not B full-size images.
        return pixel_values_of([image], self.image_processor)[0], caption

    def batches(self, samples, worker, sweep, skipped):
        flips = self._flip_generator(worker, sweep)
        pixel_values, captions = [], []
        for pixels, caption in read_samples(samples, self._read, skipped):
            pixel_values.append(pixels)
            captions.append(caption)
            if len(captions) == self.config.batch_size:
                yield preprocess_laion_batch(
                    torch.stack(pixel_values),
                    captions,
                    tokenizer=self.tokenizer,
                    image_processor=self.image_processor,
                    tokens=self.tokens,
                    flip_generator=flips,
                )
                pixel_values, captions = [], []
