"""MMC4 interleaved documents (one JSON per sample): the original's preprocessing of a document, the pipeline."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import random
from collections import Counter
from typing import Any

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN
from modeling_flamingo.training.data.config import Mmc4StreamConfig
from modeling_flamingo.training.data.images import check_image_header, decode_rgb_image, maybe_flip, pixel_values_of
from modeling_flamingo.training.data.pipeline import ShardPipeline
from modeling_flamingo.training.data.shards import import_train_dependency
from modeling_flamingo.training.data.skips import SkipSample, read_samples
from modeling_flamingo.training.data.tokens import FlamingoTokens
from modeling_flamingo.training.labels import mask_flamingo_labels

MMC4_MAX_TOKENS = 256
# The original drops MMC4 images with `len(bytes) // 1000 <= 10`: an image needs at least 11,000 bytes.
MMC4_MIN_IMAGE_KB = 10


def _match_images_to_sentences(similarity: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(image row, sentence) pairs of the one-to-one assignment maximising the total similarity, by image row,
    without the pairs below `threshold`."""
    rows, columns = import_train_dependency("scipy.optimize").linear_sum_assignment(-similarity)
    return [
        (int(row), int(column))
        for row, column in zip(rows, columns, strict=True)
        if similarity[row, column] >= threshold
    ]


def preprocess_mmc4_document(
    document: dict[str, Any],
    *,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    tokens: FlamingoTokens,
    textsim_threshold: float = 0.24,
    min_num_images: int = 1,
    max_num_images: int = 6,
    max_tokens: int = MMC4_MAX_TOKENS,
    image_order: str = "document",
    rng: random.Random,
    flip_generator: torch.Generator | None = None,
    skipped: Counter | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Preprocess one MMC4 document as the original does (see the module docstring).

    Args:
        document: the parsed JSON (`text_list`, `image_info`, `similarity_matrix` of shape (images, sentences)).
        image_order: `"document"` (the original): the matched images are kept and stacked in the document's order,
            while their `<image>` tokens follow their sentences' order, so where the assignment crosses (image 1
            matched to a later sentence than image 2) the k-th `<image>` attends to another image than its own.
            `"text"`: the images in the order of their sentences (the first `max_num_images` of the text kept), so
            every `<image>` gets its matched image.
        rng: draws the single-image drop (one `rng.random()` per document with exactly one `<image>` left).
        flip_generator: draws the flip of the document's images (one draw per document); `None` never flips.
        skipped: counts images that do not decode (`undecodable_image`) or declare more than `max_image_pixels`
            pixels (`image_too_large`); the document goes on without them.
        max_image_pixels: the bound of `decode_rgb_image`.

    Returns:
        pixel values (max_num_images, 3, H, W) float32 (zeros after the document's images), input ids and attention
        mask (max_tokens,).

    Raises:
        SkipSample: the document is dropped (`bad_document`, `unsupported_document`, `image_token_in_text`,
            `no_usable_image`, `too_few_images`, `single_image_dropped`, `image_at_end`).
    """
    if "is_gpt" in document:
        raise SkipSample("unsupported_document", "ChatGPT-generated documents are not supported")
    try:
        sentences, image_info = document["text_list"], document["image_info"]
        similarity = np.asarray(document["similarity_matrix"], dtype=np.float64)
    except (KeyError, TypeError, ValueError, RecursionError) as error:
        raise SkipSample("bad_document", repr(error)) from None
    # The original joins the sentences (a non-string fails there) and indexes both lists.
    if not isinstance(sentences, list) or not all(isinstance(sentence, str) for sentence in sentences):
        raise SkipSample("bad_document", "text_list is not a list of strings")
    if not isinstance(image_info, list):
        raise SkipSample("bad_document", "image_info is not a list")
    if any(MEDIA_TOKEN in sentence for sentence in sentences):
        raise SkipSample("image_token_in_text", "a sentence contains the text <image>")
    sentences = list(sentences)

    skipped = Counter() if skipped is None else skipped
    # Only headers are read here: the similarity assignment decides which images are worth decoding.
    candidates: dict[int, bytes] = {}  # image index -> encoded bytes of a plausible image
    for index, info in enumerate(image_info):
        if not isinstance(info, dict) or "image_base64" not in info:
            continue
        try:
            raw = base64.b64decode(info["image_base64"])
        except (binascii.Error, TypeError, ValueError):
            skipped["undecodable_image"] += 1
            continue
        if len(raw) // 1000 <= MMC4_MIN_IMAGE_KB:
            continue
        try:
            check_image_header(raw, max_image_pixels, image_processor)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        candidates[index] = raw
    if not candidates:
        raise SkipSample("no_usable_image", "no image of at least 11,000 bytes has a readable header")
    rows = list(candidates)
    if similarity.ndim != 2 or similarity.shape[1] != len(sentences) or similarity.shape[0] <= max(rows):
        raise SkipSample("bad_document", f"similarity_matrix of shape {similarity.shape}")
    if not np.isfinite(similarity[rows]).all():
        raise SkipSample("bad_document", "similarity_matrix has non-finite values")
    if image_order not in ("document", "text"):
        raise ValueError(f"image_order must be 'document' or 'text', got {image_order!r}.")

    # Decode the kept images only, each straight to its pixel values (one full-size image in memory at a time). One
    # that fails to decode leaves the assignment, which is solved again without it: the result is the one of
    # decoding every image first and matching the ones that decode (see the module docstring for the exception).
    image_pixels: dict[int, torch.Tensor] = {}
    while True:
        pairs = [
            (rows[position], sentence)
            for position, sentence in _match_images_to_sentences(similarity[rows], textsim_threshold)
        ]
        if image_order == "text":
            pairs.sort(key=lambda pair: pair[1])
        pairs = pairs[:max_num_images]
        if not pairs:
            raise SkipSample("no_usable_image", f"no image-sentence similarity reaches {textsim_threshold}")
        undecodable = None
        for row, _ in pairs:
            if row in image_pixels:
                continue
            try:
                # The decoded image lives only for this call: one full-size image in memory at a time.
                image_pixels[row] = pixel_values_of(
                    [decode_rgb_image(candidates[row], max_image_pixels)], image_processor
                )[0]
            except SkipSample as skip:
                skipped[skip.reason] += 1
                undecodable = row
                break
        if undecodable is None:
            break
        rows.remove(undecodable)
        if not rows:
            raise SkipSample("no_usable_image", "no image of at least 11,000 bytes decodes")

    pixel_values = maybe_flip(torch.stack([image_pixels[row] for row, _ in pairs]), flip_generator)
    if len(pairs) < max_num_images:
        padding = pixel_values.new_zeros((max_num_images - len(pairs), *pixel_values.shape[1:]))
        pixel_values = torch.cat([pixel_values, padding])

    for _, sentence in pairs:
        sentences[sentence] = f"{EOC_TOKEN}{MEDIA_TOKEN}{sentences[sentence]}"
    text = " ".join(sentences).replace(EOC_TOKEN, "", 1)  # no chunk ends before the first image
    text = text.replace(f" {EOC_TOKEN}", EOC_TOKEN).replace(f"{MEDIA_TOKEN} ", MEDIA_TOKEN)
    text = text.replace(f" {MEDIA_TOKEN}", MEDIA_TOKEN)
    encoding = tokenizer(
        f"{text}{EOC_TOKEN}{tokens.eos_token}",
        max_length=max_tokens,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    )
    input_ids, attention_mask = encoding["input_ids"][0], encoding["attention_mask"][0]

    num_images = int((input_ids == tokens.media_token_id).sum())
    if num_images < min_num_images:
        raise SkipSample("too_few_images", f"{num_images} < {min_num_images}")
    if num_images == 1 and rng.random() <= 0.5:
        raise SkipSample("single_image_dropped")
    if num_images == 1 and input_ids[-1] == tokens.media_token_id:
        raise SkipSample("image_at_end")
    return pixel_values.float(), input_ids, attention_mask


class Mmc4Pipeline(ShardPipeline):
    """MMC4 batches (`preprocess_mmc4_document`) of one process, as its `Mmc4StreamConfig` says; see
    `build_mmc4_loader`."""

    config: Mmc4StreamConfig

    def drop_rng(self, worker: int, sweep: int = 0) -> random.Random:
        """The generator of the single-image drops of `worker` in pass `sweep` (one `random()` per such document)."""
        return self._rng(worker, f"drop/{sweep}")

    def _read(
        self, sample: dict[str, Any], rng: random.Random, flips: torch.Generator | None, skipped: Counter
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pixel values, input ids and attention mask of one document (`preprocess_mmc4_document`)."""
        if "json" not in sample:
            raise SkipSample("bad_document", "no json member")
        try:
            document = json.loads(sample["json"])
        except (ValueError, RecursionError) as error:  # also too deep nesting, integers of > 4300 digits
            raise SkipSample("bad_document", repr(error)) from None
        if not isinstance(document, dict):
            raise SkipSample("bad_document", "the JSON is not an object")
        config = self.config
        return preprocess_mmc4_document(
            document,
            tokenizer=self.tokenizer,
            image_processor=self.image_processor,
            tokens=self.tokens,
            textsim_threshold=config.textsim_threshold,
            min_num_images=config.min_num_images,
            max_num_images=config.max_num_images,
            max_image_pixels=config.max_image_pixels,
            image_order=config.image_order,
            rng=rng,
            flip_generator=flips,
            skipped=skipped,
        )

    def batches(self, samples, worker, sweep, skipped):
        read = functools.partial(
            self._read, rng=self.drop_rng(worker, sweep), flips=self._flip_generator(worker, sweep), skipped=skipped
        )
        documents = []
        for document in read_samples(samples, read, skipped):
            documents.append(document)
            if len(documents) == self.config.batch_size:
                pixel_values, input_ids, attention_mask = (
                    torch.stack(column) for column in zip(*documents, strict=True)
                )
                documents = []
                yield {
                    "pixel_values": pixel_values[:, :, None],
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "labels": mask_flamingo_labels(
                        input_ids,
                        self.tokens.pad_token_id,
                        self.tokens.media_token_id,
                        self.tokens.eoc_token_id,
                        interleaved=True,
                    ),
                }
