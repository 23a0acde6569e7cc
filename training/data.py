"""Training data for OpenFlamingo: LAION image-text and MMC4 interleaved WebDataset shards, preprocessed as the
original (`open_flamingo/train/data.py` at the repository's last commit), and a collator for users' own data.

Shards are tar files read as streams from local paths or any fsspec URL (`s3://`, `gs://`, `https://`...; the
protocol's fsspec package must be installed), given as brace patterns (`shards-{0000..0999}.tar`), globs or lists.

What is reproduced exactly (see `tests/test_train_data.py`, parity with the installed original):
    - LAION (img2dataset layout: `KEY.jpg|png|jpeg`, `KEY.txt`, ...): text `<image>{caption.strip()}<|endofchunk|>{eos}`
      tokenized per batch, right padding to the longest sample, at most 32 tokens; images decoded to RGB.
    - MMC4 (one `KEY.json` per document: `text_list`, `image_info[].image_base64`, `similarity_matrix`): images of
      `len(bytes) // 1000 <= 10` dropped, images and sentences matched one to one by linear assignment on the
      similarity matrix (the repository head; the pip release 2.0.1 takes each image's best sentence instead),
      pairs below `textsim_threshold` dropped, the first `max_num_images` kept and zero-padded to `max_num_images`,
      in image order even where the text names them in another order (the original's misalignment, kept by
      default, see `image_order`), `<|endofchunk|><image>` before each matched sentence (the first `<|endofchunk|>`
      removed), `<|endofchunk|>{eos}` appended, 256 tokens padded to length; documents with fewer than
      `min_num_images` `<image>` tokens left dropped, single-image documents dropped half the time, a single
      `<image>` in the last position dropped. ChatGPT-generated documents (`is_gpt`) are not supported (skipped).
    - Labels: `mask_flamingo_labels` (LAION plain, MMC4 `interleaved=True`), the original training loop's masking.
    - Random horizontal flip with probability 0.5 of the whole image tensor the original flips at once: a whole
      LAION batch, all the images of an MMC4 document.
    - Shard order without resampling: the original's seeded buffer shuffle of the shard list (seed + epoch), then
      every `world_size`-th shard from `rank`, every `workers`-th of those from the worker's index; each worker
      cycles through its shards until it has produced its `num_batches / workers` batches.

Deliberate differences:
    - `textsim_threshold` defaults to 0.24, the value of the original's README and scripts (its code default of 30
      drops every image); values outside [0, 1] are refused.
    - Every random choice (shard resampling, the sample shuffle buffer, flips, the single-image drop) comes from
      generators seeded by (seed, epoch, rank, worker, pass over the shards), so a re-created loader yields the same
      batches in the same order; the original seeds some of them from the clock or from torch's worker seed.
    - Bad data is skipped and counted in each batch's `"skipped"` dict (see `SKIP_REASONS`) instead of being logged
      and forgotten; an MMC4 image that does not decode drops that image, not the whole document. A worker whose
      shards yield no batch at all raises instead of ending the epoch early and silently.
    - Images are bounded in pixels (`max_image_pixels`, read from the header before decoding; the original allows
      1e9), and so is their size once the image processor resizes them (see `_check_resized_size`). An MMC4
      document's images are checked from their headers (format identified, size bound), the assignment is solved
      on those, and only the images it keeps are decoded, each straight to its pixel values; one that then fails to
      decode leaves the assignment, which is solved again. This equals decoding every image
      first whenever the images with a readable header decode. The one difference: an image whose header reads but
      whose data is corrupt, and which the assignment pairs below the threshold or past `max_num_images`, is never
      decoded, so it stays in the assignment (where decoding first would have removed it, which may give the other
      images other sentences) and is not counted.
    - Only the image and text members are decoded (never pickles or other members).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import glob
import importlib
import itertools
import json
import logging
import math
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers.image_processing_utils import BaseImageProcessor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.processing.image_loading import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    check_max_image_pixels,
    open_image,
    read_image_size,
)
from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN
from modeling_flamingo.training.labels import mask_flamingo_labels

logger = logging.getLogger(__name__)

LAION_MAX_TOKENS = 32
MMC4_MAX_TOKENS = 256
# The original drops MMC4 images with `len(bytes) // 1000 <= 10`: an image needs at least 11,000 bytes.
MMC4_MIN_IMAGE_KB = 10
# Buffered shuffles of the original: shard list (seeded) and samples.
SHARD_SHUFFLE_BUFFER, SHARD_SHUFFLE_INITIAL = 2000, 500
SAMPLE_SHUFFLE_BUFFER, SAMPLE_SHUFFLE_INITIAL = 5000, 1000
# Tar members larger than this are not read (their sample is skipped): far above a LAION image or an MMC4 document
# (a few MB with its base64 images), far below what a worker can hold.
MAX_TAR_MEMBER_BYTES = 1 << 30
# Image members of a LAION sample, in the order the original picks the first present one.
LAION_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")

SKIP_REASONS = {
    "unreadable_shard": "a shard that could not be opened (counted once per shard pass)",
    "corrupt_tar": "a tar stream that broke off (bad header, truncated file): the rest of that shard is lost",
    "member_too_large": "a sample with a tar member of more than MAX_TAR_MEMBER_BYTES (1 GiB), skipped unread",
    "incomplete_sample": "LAION: a sample without a caption or without a jpg/png/jpeg image",
    "undecodable_image": "an image that does not decode (LAION: the sample; MMC4: that image of the document)",
    "image_too_large": "an image declaring more than max_image_pixels pixels, refused from its header before decoding "
    "(or that the image processor would resize to more): LAION: the sample; MMC4: that image of the document",
    "undecodable_text": "LAION: a caption that is not UTF-8",
    "image_token_in_text": "a caption or MMC4 sentence containing the text `<image>`: it would tokenize to more "
    "`<image>` tokens than the sample has images, which the model refuses (ending the run)",
    "bad_document": "MMC4: a JSON member that does not parse (also nested too deep, numbers of over 4300 digits) or "
    "lacks/garbles text_list (a list of strings), image_info (a list), similarity_matrix",
    "unsupported_document": "MMC4: a ChatGPT-generated document (`is_gpt`), not supported",
    "no_usable_image": "MMC4: no image left after the size filter, decoding and the similarity threshold",
    "too_few_images": "MMC4: fewer than min_num_images `<image>` tokens left after truncation",
    "single_image_dropped": "MMC4: a single-image document dropped by the original's keep-half-of-them rule",
    "image_at_end": "MMC4: a single `<image>` as the last token (every label would be -100)",
    "sample_error": "any other exception while reading one sample (logged with the sample's key): that sample only",
}


def format_skipped(counts: dict[str, int]) -> str:
    """One line for a log: `"3 undecodable_image, 1 corrupt_tar"` (largest first), or `"nothing"`.

    A training loop adds up the `"skipped"` dict of every batch (`totals.update(batch.pop("skipped"))` with a
    `collections.Counter`) and prints this every N steps."""
    items = sorted(
        ((count, reason) for reason, count in counts.items() if count), key=lambda item: (-item[0], item[1])
    )
    return ", ".join(f"{count} {reason}" for count, reason in items) or "nothing"


class SkipSample(Exception):
    """A sample (or document) to skip, with the `SKIP_REASONS` key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------
# Shards


def _require(module: str) -> Any:
    """Import an optional dependency of the `train` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"The training data pipelines need `{module}`: pip install 'openflamingo-transformers[train]'."
        ) from None


def _has_glob_magic(path: str) -> bool:
    return any(char in path for char in "*?[")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """The shard URLs of brace patterns, globs or explicit lists, checked to exist.

    `"/data/{00000..00099}.tar"` expands with `braceexpand`; `"/data/*.tar"` (or `s3://bucket/*.tar`) is globbed
    (sorted); a list may mix both. Local paths must all exist; for remote URLs the first one is checked (one request).

    Raises:
        ValueError: nothing matched, a local shard is missing, or the URL's protocol cannot be opened.
    """
    braceexpand = _require("braceexpand")
    fsspec = _require("fsspec")

    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ValueError(f"Shards must be a non-empty string or list of strings, got {shards!r}.")
    urls: list[str] = []
    for pattern in patterns:
        for path in braceexpand.braceexpand(pattern):
            if not _has_glob_magic(path):
                urls.append(path)
                continue
            if "://" in path:
                fs, _ = _filesystem(path)
                urls.extend(sorted(fs.unstrip_protocol(match) for match in fs.glob(path)))
            else:
                urls.extend(sorted(glob.glob(path)))
    if not urls:
        raise ValueError(f"The shard pattern {shards!r} matches no file.")
    local = [url for url in urls if "://" not in url or url.startswith("file://")]
    missing = [url for url in local if not fsspec.filesystem("file").exists(url.removeprefix("file://"))]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(urls)} shards of {shards!r} do not exist, e.g. {missing[0]!r}; check the "
            "path and the brace range."
        )
    remote = [url for url in urls if url not in local]
    if remote:
        fs, path = _filesystem(remote[0])
        if not fs.exists(path):
            raise ValueError(f"The shard {remote[0]!r} (the first of {len(remote)} remote shards) does not exist.")
    return urls


def _filesystem(url: str):
    fsspec = _require("fsspec")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ValueError(f"Cannot open shards at {url!r}: {error}") from None


def buffer_shuffle(items: Iterable, buffer_size: int, initial: int, rng: random.Random) -> Iterator:
    """webdataset's buffered shuffle, draw for draw (so a seeded shard order equals the original's).

    It fills a buffer of up to `buffer_size` items, reading two items per step while the buffer is not full, starts
    yielding once it holds `initial` items, each time a uniformly drawn one. `buffer_size <= 1` keeps the order.
    """
    items = iter(items)
    initial = min(initial, buffer_size)
    buffer: list = []

    def pop() -> Any:
        index = rng.randint(0, len(buffer) - 1)
        item = buffer[index]
        buffer[index] = buffer[-1]
        buffer.pop()
        return item

    for item in items:
        buffer.append(item)
        if len(buffer) < buffer_size:
            following = next(items, _END)
            if following is not _END:
                buffer.append(following)
        if len(buffer) >= initial:
            yield pop()
    while buffer:
        yield pop()


_END = object()


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`): the sample key ends at the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


class _CheckedTarInfo(tarfile.TarInfo):
    """Records a broken member header on the archive: `tarfile` ends the iteration there as if at the end."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:  # a zero block: the archive's proper end
            raise
        except tarfile.HeaderError as error:  # garbled, truncated, or missing (the file ends without the end marker)
            archive.broken_header = error
            raise


def iter_tar_samples(url: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, read as a stream: `{"__key__", "__url__", ext: bytes, ...}` per key.

    Consecutive members sharing a key form a sample (a repeated extension starts a new one, as the original's
    non-throwing grouping does); `__*__` metadata members are ignored. A shard that cannot be opened counts
    `unreadable_shard`; one that breaks off (truncated, garbled header, no end-of-archive marker) counts
    `corrupt_tar`, and the samples read before the break are kept. A sample with a member larger than
    `MAX_TAR_MEMBER_BYTES` is skipped without reading it (`member_too_large`).
    """
    fsspec = _require("fsspec")
    try:
        fileobj = fsspec.open(url, "rb").open()
    except Exception as error:  # any filesystem's error: the run goes on with the other shards
        skipped["unreadable_shard"] += 1
        logger.warning("Skipping shard %s: it cannot be opened (%r).", url, error)
        return
    sample: dict[str, Any] | None = None
    dropped_key: str | None = None  # the key of a sample with a member too large to read
    broken: BaseException | None = None
    try:
        with fileobj, tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, extension = _split_member_name(member.name)
                if key is None or re.match(r"__[^/]*__($|/)", member.name):
                    continue
                if member.size > MAX_TAR_MEMBER_BYTES:  # the stream skips over it by reading in small blocks
                    skipped["member_too_large"] += 1
                    logger.warning(
                        "Skipping sample %r of %s: its member %s has %d bytes.", key, url, member.name, member.size
                    )
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                    sample, dropped_key = None, key
                    continue
                if key == dropped_key:
                    continue
                dropped_key = None
                data = archive.extractfile(member).read()
                archive.members = []  # a streamed tar would otherwise keep every header in memory
                extension = extension.lower()
                if sample is None or key != sample["__key__"] or extension in sample:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[extension] = data
            broken = getattr(archive, "broken_header", None)
    except Exception as error:  # TarError, OSError, EOFError, zlib.error, or a remote filesystem's own errors
        broken = error
    if broken is not None:
        skipped["corrupt_tar"] += 1
        last_key = sample["__key__"] if sample is not None else None
        logger.warning("Shard %s breaks off after key %r (%r); skipping its rest.", url, last_key, broken)
    if sample is not None:
        yield sample


# ---------------------------------------------------------------------------------------------------------------
# Decoding and preprocessing (one sample at a time, no randomness except through the given generators)


def decode_rgb_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode image bytes into an RGB PIL image as the original does (`Image.open`, `load`, `convert("RGB")`), through
    `open_image`: an image declaring more than `max_pixels` pixels is refused from its header, before decoding.

    Raises:
        SkipSample: `image_too_large` (also PIL's own refusal beyond twice `PIL.Image.MAX_IMAGE_PIXELS`, 179 MP by
            default, whatever `max_pixels`), or `undecodable_image`.
    """
    try:
        with open_image(data, max_pixels) as image:
            return image.convert("RGB")
    except ImageTooLargeError as error:
        raise SkipSample("image_too_large", str(error)) from None
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ValueError...)
        raise SkipSample("undecodable_image", repr(error)) from None


def _check_resized_size(width: int, height: int, max_pixels: int | None, image_processor: Any) -> None:
    """Refuse (`SkipSample("image_too_large")`) an image that the image processor would resize to more than
    `max_pixels` pixels.

    Resizing the shortest side to 224 blows up images of extreme aspect ratio: a 100-byte PNG of 50000x1 pixels
    would take 224x11,200,000 pixels (10 GB). Checked where the processor says how it resizes: a transformers image
    processor with `size["shortest_edge"]` (`FlamingoImageProcessor`, `CLIPImageProcessor`); another callable's
    resize is its own business."""
    if max_pixels is None or not isinstance(image_processor, BaseImageProcessor) or not image_processor.do_resize:
        return
    size = image_processor.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if not shortest or min(width, height) < 1:
        return
    short, long = sorted((width, height))
    resized = shortest * int(shortest * long / short)  # as the processor (and torchvision) compute the long side
    if resized > max_pixels:
        raise SkipSample(
            "image_too_large",
            f"resizing the {width}x{height} image to a shortest side of {shortest} gives {resized:,} pixels, more "
            f"than the limit of {max_pixels:,} (--max_image_pixels)",
        )


def _check_image_header(data: bytes, max_pixels: int | None, image_processor: Any) -> None:
    """Check from its header, without decoding a pixel, that `data` is an image of a format PIL identifies, of at
    most `max_pixels` pixels (the check `open_image` makes before decoding), and not resized by the image processor
    to more (`_check_resized_size`). Raises `SkipSample` (`image_too_large`, `undecodable_image`)."""
    try:
        width, height = read_image_size(data, max_pixels)
    except ImageTooLargeError as error:
        raise SkipSample("image_too_large", str(error)) from None
    except Exception as error:
        raise SkipSample("undecodable_image", repr(error)) from None
    _check_resized_size(width, height, max_pixels, image_processor)


def pixel_values_of(images: list[PIL.Image.Image], image_processor: Any) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values of RGB images, with a transformers image processor (e.g.
    `FlamingoImageProcessor`, batched) or a callable mapping one PIL image to a (3, H, W) tensor (e.g. open_clip's
    transform)."""
    if isinstance(image_processor, BaseImageProcessor):
        return torch.as_tensor(np.stack(image_processor(images, return_tensors=None)["pixel_values"]))
    return torch.stack([image_processor(image) for image in images])


def _maybe_flip(pixel_values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip the whole tensor horizontally with probability 0.5 (one draw, as torchvision's RandomHorizontalFlip
    applied to a stacked tensor)."""
    if generator is not None and torch.rand(1, generator=generator).item() < 0.5:
        return pixel_values.flip(-1)
    return pixel_values


@dataclass(frozen=True)
class FlamingoTokens:
    """The ids a pipeline needs, read once from the tokenizer (`check_flamingo_tokenizer`)."""

    media_token_id: int
    eoc_token_id: int
    pad_token_id: int
    eos_token: str


def check_flamingo_tokenizer(tokenizer: PreTrainedTokenizerBase) -> FlamingoTokens:
    """Check that the tokenizer has `<image>`, `<|endofchunk|>` (each one token), a pad and an eos token.

    Raises:
        ValueError: naming what is missing and how to add it (`add_flamingo_tokens` / `FlamingoProcessor`).
    """
    ids = {}
    for token in (MEDIA_TOKEN, EOC_TOKEN):
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if token not in tokenizer.get_vocab() or len(encoded) != 1:
            raise ValueError(
                f"The tokenizer has no {token} token (it encodes to {len(encoded)} ids): add the Flamingo tokens "
                "with `modeling_flamingo.processing.processing_flamingo.add_flamingo_tokens(tokenizer)` or use "
                "the tokenizer of a FlamingoProcessor."
            )
        ids[token] = encoded[0]
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: `add_flamingo_tokens` adds `<PAD>` as the original does.")
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no eos token; the original templates end every sample with it.")
    return FlamingoTokens(ids[MEDIA_TOKEN], ids[EOC_TOKEN], tokenizer.pad_token_id, tokenizer.eos_token)


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
    pixel_values = _maybe_flip(images, flip_generator)
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


def _match_images_to_sentences(similarity: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """(image row, sentence) pairs of the one-to-one assignment maximising the total similarity, by image row,
    without the pairs below `threshold`."""
    rows, columns = _require("scipy.optimize").linear_sum_assignment(-similarity)
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
            _check_image_header(raw, max_image_pixels, image_processor)
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

    pixel_values = _maybe_flip(torch.stack([image_pixels[row] for row, _ in pairs]), flip_generator)
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


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


class _ShardPipeline(IterableDataset):
    """Batches of one process (rank), split over its DataLoader workers. Subclasses turn samples into batches."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        num_worker_batches: int,
        resampled: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        flip: bool,
        shuffle_buffer: int,
        shuffle_initial: int,
        max_image_pixels: int | None,
    ):
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.num_worker_batches = num_worker_batches
        self.resampled = resampled
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.flip = flip
        self.max_image_pixels = max_image_pixels
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_initial = shuffle_initial

    def _rng(self, worker: int, purpose: str) -> random.Random:
        # String seeds are hashed with SHA-512: the same in every process and on every machine, unlike hash().
        return random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{purpose}")

    def worker_shards(self, worker: int, num_workers: int, sweep: int = 0) -> Iterable[str]:
        """The shards `worker` reads in pass number `sweep` over them: endless draws with replacement when
        resampling, otherwise its share of the seeded shard order (the same in every pass of an epoch)."""
        if self.resampled:
            rng = self._rng(worker, f"shards/{sweep}")
            return (rng.choice(self.urls) for _ in itertools.repeat(None))
        shard_rng = random.Random(self.seed + self.epoch)  # the original's shard seed, equal on every rank
        order = list(buffer_shuffle(self.urls, SHARD_SHUFFLE_BUFFER, SHARD_SHUFFLE_INITIAL, shard_rng))
        return order[self.rank :: self.world_size][worker::num_workers]

    def samples(
        self, shards: Iterable[str], worker: int, sweep: int, skipped: Counter, reads: Counter | None = None
    ) -> Iterator[dict[str, Any]]:
        """Raw samples (tar members grouped by key) of `shards`, through the shuffle buffer; `reads` counts the
        `"shards"` and `"samples"` read."""
        reads = Counter() if reads is None else reads
        patience = 10 * len(self.urls)

        def raw() -> Iterator[dict[str, Any]]:
            last_with_samples = 0
            for number, url in enumerate(shards):
                if number - last_with_samples > patience:  # only with resampling: the shard stream never ends
                    raise self._no_batch_error(worker, f"{patience} resampled shards without a sample", skipped)
                reads["shards"] += 1
                for sample in iter_tar_samples(url, skipped):
                    last_with_samples = number
                    reads["samples"] += 1
                    yield sample

        return buffer_shuffle(raw(), self.shuffle_buffer, self.shuffle_initial, self._rng(worker, f"samples/{sweep}"))

    def batches(self, samples: Iterator[dict[str, Any]], worker: int, sweep: int, skipped: Counter) -> Iterator[dict]:
        """Batches made of `samples` (without `skipped`, which `__iter__` adds)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: Counter = Counter()
        produced, sweep = 0, 0

        def give_up_without_batches(samples: Iterator[dict[str, Any]], reads: Counter) -> Iterator[dict[str, Any]]:
            # Resampled shards never end: give up once the samples consumed since the last batch amount to 10 passes
            # over the shards (at the average samples per shard read so far), instead of hanging.
            batches_seen, consumed = produced, 0
            for sample in samples:
                if produced != batches_seen:  # `batches` asks for a sample only once its previous batch was taken
                    batches_seen, consumed = produced, 0
                consumed += 1
                if consumed > 10 * len(self.urls) * reads["samples"] / max(1, reads["shards"]):
                    raise self._no_batch_error(worker, "10 passes' worth of resampled shards", skipped)
                yield sample

        while produced < self.num_worker_batches:
            produced_before = produced
            shards = self.worker_shards(worker, num_workers, sweep)
            reads: Counter = Counter()
            samples = self.samples(shards, worker, sweep, skipped, reads)
            if self.resampled:
                samples = give_up_without_batches(samples, reads)
            for batch in self.batches(samples, worker, sweep, skipped):
                batch["skipped"] = dict(skipped)
                skipped.clear()
                yield batch
                produced += 1
                if produced == self.num_worker_batches:
                    return
            if produced == produced_before:  # a whole pass over the worker's shards made no batch: so would the next
                names = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
                raise self._no_batch_error(worker, f"its shards {names}", skipped)
            sweep += 1

    def _flip_generator(self, worker: int, sweep: int) -> torch.Generator | None:
        if not self.flip:
            return None
        return torch.Generator().manual_seed(self._rng(worker, f"flip/{sweep}").getrandbits(63))

    def _no_batch_error(self, worker: int, source: str, skipped: Counter) -> RuntimeError:
        return RuntimeError(
            f"Worker {worker} of rank {self.rank} made no batch of {self.batch_size} samples from {source}; skipped "
            f"since its last batch: {dict(skipped) or 'nothing'} (reasons: SKIP_REASONS in {__name__}). A worker "
            "needs at least batch_size usable samples in its share of the shards."
        )


def _count_sample_error(sample: dict[str, Any], error: Exception, skipped: Counter) -> None:
    """Count (`sample_error`) and log an unexpected exception raised while reading one sample.

    `Exception` only: KeyboardInterrupt, SystemExit and GeneratorExit (a closed loader) still propagate."""
    skipped["sample_error"] += 1
    logger.warning("Skipping sample %r of %s: %r", sample.get("__key__"), sample.get("__url__"), error)


class LaionPipeline(_ShardPipeline):
    """LAION batches (`preprocess_laion_batch`) of one process; see `build_laion_loader`."""

    def __init__(self, urls, *, tokenizer, image_processor, tokens: FlamingoTokens, **kwargs):
        super().__init__(urls, **kwargs)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens = tokens

    def batches(self, samples, worker, sweep, skipped):
        flips = self._flip_generator(worker, sweep)
        pixel_values, captions = [], []
        for sample in samples:
            try:
                image, caption = decode_laion_sample(sample, self.max_image_pixels)
                _check_resized_size(*image.size, self.max_image_pixels, self.image_processor)
                # Transformed at once: a batch waits as B small tensors, not B full-size images.
                pixel_values.append(pixel_values_of([image], self.image_processor)[0])
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            except Exception as error:  # a bug or an input nobody foresaw must not end a run of days
                _count_sample_error(sample, error, skipped)
                continue
            captions.append(caption)
            if len(captions) == self.batch_size:
                yield preprocess_laion_batch(
                    torch.stack(pixel_values),
                    captions,
                    tokenizer=self.tokenizer,
                    image_processor=self.image_processor,
                    tokens=self.tokens,
                    flip_generator=flips,
                )
                pixel_values, captions = [], []


class Mmc4Pipeline(_ShardPipeline):
    """MMC4 batches (`preprocess_mmc4_document`) of one process; see `build_mmc4_loader`."""

    def __init__(
        self,
        urls,
        *,
        tokenizer,
        image_processor,
        tokens: FlamingoTokens,
        textsim_threshold: float,
        max_num_images: int,
        min_num_images: int,
        image_order: str,
        **kwargs,
    ):
        super().__init__(urls, **kwargs)
        self.image_order = image_order
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens = tokens
        self.textsim_threshold = textsim_threshold
        self.max_num_images = max_num_images
        self.min_num_images = min_num_images

    def drop_rng(self, worker: int, sweep: int = 0) -> random.Random:
        """The generator of the single-image drops of `worker` in pass `sweep` (one `random()` per such document)."""
        return self._rng(worker, f"drop/{sweep}")

    def batches(self, samples, worker, sweep, skipped):
        rng = self.drop_rng(worker, sweep)
        flips = self._flip_generator(worker, sweep)
        documents = []
        for sample in samples:
            try:
                if "json" not in sample:
                    raise SkipSample("bad_document", "no json member")
                try:
                    document = json.loads(sample["json"])
                except (ValueError, RecursionError) as error:  # also too deep nesting, integers of > 4300 digits
                    raise SkipSample("bad_document", repr(error)) from None
                if not isinstance(document, dict):
                    raise SkipSample("bad_document", "the JSON is not an object")
                documents.append(
                    preprocess_mmc4_document(
                        document,
                        tokenizer=self.tokenizer,
                        image_processor=self.image_processor,
                        tokens=self.tokens,
                        textsim_threshold=self.textsim_threshold,
                        min_num_images=self.min_num_images,
                        max_num_images=self.max_num_images,
                        max_image_pixels=self.max_image_pixels,
                        image_order=self.image_order,
                        rng=rng,
                        flip_generator=flips,
                        skipped=skipped,
                    )
                )
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            except Exception as error:  # a bug or an input nobody foresaw must not end a run of days
                _count_sample_error(sample, error, skipped)
                continue
            if len(documents) == self.batch_size:
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


@dataclass
class TrainLoader:
    """A training data loader and its epoch size, like the original's `DataInfo`.

    Iterating `dataloader` yields exactly `num_batches` batch dicts per epoch (each DataLoader worker cycles through
    its shards as often as needed), each with `pixel_values` (B, T_img, 1, 3, H, W) float32, `input_ids`,
    `attention_mask`, `labels` (B, L) and `skipped` (a dict reason -> count of what that worker skipped since its
    previous batch; see `SKIP_REASONS`).

    Attributes:
        dataloader: a `torch.utils.data.DataLoader` (non-persistent workers, so `set_epoch` takes effect at the
            next `iter()`).
        num_batches: batches per epoch of this process.
        num_samples: samples per epoch over all processes (`num_batches * batch_size * world_size`).
    """

    dataloader: DataLoader
    num_batches: int
    num_samples: int

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s shard order and random draws from the next `iter(dataloader)` on."""
        self.dataloader.dataset.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataloader)

    def __len__(self) -> int:
        return self.num_batches


def _epoch_size(num_samples: int, batch_size: int, world_size: int, workers: int) -> tuple[int, int, int]:
    """(batches per worker, batches per process, samples per epoch), rounded up as the original does."""
    global_batch_size = batch_size * world_size
    num_batches = math.ceil(num_samples / global_batch_size)
    num_workers = max(1, workers)
    num_worker_batches = math.ceil(num_batches / num_workers)
    num_batches = num_worker_batches * num_workers
    return num_worker_batches, num_batches, num_batches * global_batch_size


def _check_ints(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}.")


def _build_loader(
    pipeline_class: type[_ShardPipeline],
    shards: str | Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    batch_size: int,
    num_samples: int,
    resampled: bool,
    workers: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    flip: bool,
    shuffle_buffer: int,
    shuffle_initial: int,
    max_image_pixels: int | None,
    **pipeline_kwargs,
) -> TrainLoader:
    _check_ints(batch_size=batch_size, num_samples=num_samples, workers=workers, seed=seed, epoch=epoch, rank=rank)
    _check_ints(world_size=world_size, shuffle_buffer=shuffle_buffer, shuffle_initial=shuffle_initial)
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"batch_size and num_samples must be positive, got {batch_size} and {num_samples}.")
    if workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need workers >= 0 and 0 <= rank < world_size, got {workers}, {rank}, {world_size}.")
    check_max_image_pixels(max_image_pixels)
    tokens = check_flamingo_tokenizer(tokenizer)
    urls = expand_shards(shards)
    if not resampled and len(urls) < max(1, workers) * world_size:
        raise ValueError(
            f"{len(urls)} shards cannot feed {max(1, workers)} workers x {world_size} processes without resampling: "
            "every worker needs a shard of its own. Use fewer workers or resampled=True (--dataset_resampled)."
        )
    num_worker_batches, num_batches, total_samples = _epoch_size(num_samples, batch_size, world_size, workers)
    if total_samples != num_samples:
        logger.warning(
            "num_samples=%d is not a multiple of batch_size %d x %d processes x %d workers: an epoch takes %d samples "
            "(%d batches per process), rounded up as the original does.",
            num_samples,
            batch_size,
            world_size,
            max(1, workers),
            total_samples,
            num_batches,
        )
    dataset = pipeline_class(
        urls,
        tokenizer=tokenizer,
        image_processor=image_processor,
        tokens=tokens,
        batch_size=batch_size,
        num_worker_batches=num_worker_batches,
        resampled=resampled,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        flip=flip,
        shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial,
        max_image_pixels=max_image_pixels,
        **pipeline_kwargs,
    )
    dataloader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
    return TrainLoader(dataloader=dataloader, num_batches=num_batches, num_samples=total_samples)


def build_laion_loader(
    shards: str | Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    batch_size: int,
    num_samples: int,
    resampled: bool = False,
    workers: int = 1,
    seed: int = 42,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    flip: bool = True,
    shuffle_buffer: int = SAMPLE_SHUFFLE_BUFFER,
    shuffle_initial: int = SAMPLE_SHUFFLE_INITIAL,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> TrainLoader:
    """A loader of LAION-style image-text shards (img2dataset layout), preprocessed as the original.

    Args:
        shards: brace pattern, glob or list of tar shards (local or fsspec URLs), see `expand_shards`.
        tokenizer: the language model's tokenizer with the Flamingo tokens (`add_flamingo_tokens`).
        image_processor: `FlamingoImageProcessor` sized for the vision tower, or a callable PIL image -> (3, H, W).
        batch_size: samples per batch and process (the original's `--batch_size_laion`).
        num_samples: samples per epoch over all processes (`--train_num_samples_laion`); rounded up to whole
            batches on every worker as the original does (`TrainLoader.num_samples` says by how much).
        resampled: draw shards with replacement (`--dataset_resampled`) instead of a shuffled pass over them.
        workers: DataLoader worker processes (0: in the main process, same batches as 1).
        seed, epoch, rank, world_size: the batches are a function of these (and of `workers`) only.
        flip: random horizontal flips (one draw per batch, as the original); `False` for evaluation or parity.
        shuffle_buffer, shuffle_initial: the sample shuffle buffer (the original's 5000 and 1000; 1 keeps the order).
        max_image_pixels: images declaring more pixels (`width * height`, read from the header, before decoding)
            are skipped and counted as `image_too_large` (`--max_image_pixels`; None: no bound of ours, PIL still
            refuses beyond 179 MP). The original allows 1e9, a 4 GB decode from a file of a few hundred KB.

    Each batch: `pixel_values` (B, 1, 1, 3, H, W), `input_ids`/`attention_mask`/`labels` (B, L <= 32), `skipped`.

    Raises:
        ValueError: a shard pattern that matches nothing or a missing shard, a tokenizer without the Flamingo tokens,
            fewer shards than workers x processes without resampling, a non-positive size or `max_image_pixels`.
    """
    return _build_loader(
        LaionPipeline,
        shards,
        tokenizer=tokenizer,
        image_processor=image_processor,
        batch_size=batch_size,
        num_samples=num_samples,
        resampled=resampled,
        workers=workers,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        flip=flip,
        shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial,
        max_image_pixels=max_image_pixels,
    )


def build_mmc4_loader(
    shards: str | Sequence[str],
    *,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    batch_size: int,
    num_samples: int,
    resampled: bool = False,
    workers: int = 1,
    seed: int = 42,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    flip: bool = True,
    textsim_threshold: float = 0.24,
    max_num_images: int = 6,
    min_num_images: int = 1,
    image_order: str = "document",
    shuffle_buffer: int = SAMPLE_SHUFFLE_BUFFER,
    shuffle_initial: int = SAMPLE_SHUFFLE_INITIAL,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> TrainLoader:
    """A loader of MMC4 shards (one JSON document per sample, as `convert_mmc4_to_wds.py` writes them), preprocessed
    as the original (`preprocess_mmc4_document`).

    Args are those of `build_laion_loader` (with `--batch_size_mmc4`, `--train_num_samples_mmc4`), plus:
        textsim_threshold: drop matched image-sentence pairs below this CLIP similarity (`--mmc4_textsim_threshold`;
            0.24 as in the original's README and scripts; its code default of 30 would drop every image).
        max_num_images: images kept per document (the rest dropped), and T_img of `pixel_values`.
        min_num_images: documents with fewer `<image>` tokens after truncation to 256 tokens are dropped.
        image_order: `"document"` (the original, default) or `"text"`, which gives every `<image>` its own matched
            image where the original's order misaligns them (see `preprocess_mmc4_document`).

    Each batch: `pixel_values` (B, max_num_images, 1, 3, H, W) (zeros after a document's images), `input_ids` /
    `attention_mask` / `labels` (B, 256), `skipped`.
    """
    if not 0.0 <= textsim_threshold <= 1.0:
        raise ValueError(
            f"textsim_threshold={textsim_threshold} is outside [0, 1], the range of MMC4's CLIP similarities: "
            "every image would be kept or dropped. The original recipe uses 0.24 (its code default of 30 is a bug)."
        )
    _check_ints(max_num_images=max_num_images, min_num_images=min_num_images)
    if max_num_images < 1 or not 0 <= min_num_images <= max_num_images:
        raise ValueError(f"Need 0 <= min_num_images <= max_num_images >= 1, got {min_num_images}, {max_num_images}.")
    if image_order not in ("document", "text"):
        raise ValueError(f"image_order must be 'document' (the original) or 'text', got {image_order!r}.")
    return _build_loader(
        Mmc4Pipeline,
        shards,
        tokenizer=tokenizer,
        image_processor=image_processor,
        batch_size=batch_size,
        num_samples=num_samples,
        resampled=resampled,
        workers=workers,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        flip=flip,
        shuffle_buffer=shuffle_buffer,
        shuffle_initial=shuffle_initial,
        max_image_pixels=max_image_pixels,
        textsim_threshold=textsim_threshold,
        max_num_images=max_num_images,
        min_num_images=min_num_images,
        image_order=image_order,
    )


def build_train_loaders(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    *,
    epoch: int,
    rank: int,
    world_size: int,
) -> dict[str, TrainLoader]:
    """The loaders of the datasets `args` names, keyed `"laion"` and `"mmc4"`, from the original `train.py` options.

    Read from `args`: `laion_shards`, `batch_size_laion`, `train_num_samples_laion` (when `laion_shards` is set),
    `mmc4_shards`, `batch_size_mmc4`, `train_num_samples_mmc4` (when `mmc4_shards` is set), and optionally
    `dataset_resampled` (False), `workers` (1), `seed` (42), `mmc4_textsim_threshold` (0.24),
    `mmc4_max_num_images` (6), `mmc4_min_num_images` (1), `mmc4_image_order` ("document"), `no_flip` (False),
    `max_image_pixels` (`DEFAULT_MAX_IMAGE_PIXELS`).

    Raises:
        ValueError: no dataset given, or the two datasets give different numbers of batches per epoch (the original
            steps through both together, one LAION and one MMC4 batch per step).
    """
    common = {
        "tokenizer": tokenizer,
        "image_processor": image_processor,
        "resampled": bool(getattr(args, "dataset_resampled", False)),
        "workers": getattr(args, "workers", 1),
        "seed": getattr(args, "seed", 42),
        "epoch": epoch,
        "rank": rank,
        "world_size": world_size,
        "flip": not getattr(args, "no_flip", False),
        "max_image_pixels": getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
    }
    loaders: dict[str, TrainLoader] = {}
    if getattr(args, "laion_shards", None):
        loaders["laion"] = build_laion_loader(
            args.laion_shards,
            batch_size=args.batch_size_laion,
            num_samples=args.train_num_samples_laion,
            **common,
        )
    if getattr(args, "mmc4_shards", None):
        loaders["mmc4"] = build_mmc4_loader(
            args.mmc4_shards,
            batch_size=args.batch_size_mmc4,
            num_samples=args.train_num_samples_mmc4,
            textsim_threshold=getattr(args, "mmc4_textsim_threshold", 0.24),
            max_num_images=getattr(args, "mmc4_max_num_images", 6),
            min_num_images=getattr(args, "mmc4_min_num_images", 1),
            image_order=getattr(args, "mmc4_image_order", "document"),
            **common,
        )
    if not loaders:
        raise ValueError("No training data: give laion_shards, mmc4_shards or both.")
    if len(loaders) == 2 and loaders["laion"].num_batches != loaders["mmc4"].num_batches:
        raise ValueError(
            f"LAION gives {loaders['laion'].num_batches} batches per epoch (train_num_samples_laion="
            f"{args.train_num_samples_laion} / batch_size_laion={args.batch_size_laion} x {world_size} processes) but "
            f"MMC4 gives {loaders['mmc4'].num_batches} (train_num_samples_mmc4={args.train_num_samples_mmc4} / "
            f"batch_size_mmc4={args.batch_size_mmc4} x {world_size}); each step takes one batch of each, so choose "
            "sample counts in the ratio of the batch sizes (the original recipe: 250000 / 64 and 125000 / 32)."
        )
    return loaders


# ---------------------------------------------------------------------------------------------------------------
# Users' own data


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


__all__ = [
    "SKIP_REASONS",
    "FlamingoDataCollator",
    "FlamingoTokens",
    "SkipSample",
    "TrainLoader",
    "buffer_shuffle",
    "build_laion_loader",
    "build_mmc4_loader",
    "build_train_loaders",
    "check_flamingo_tokenizer",
    "decode_laion_sample",
    "decode_rgb_image",
    "expand_shards",
    "format_skipped",
    "iter_tar_samples",
    "preprocess_laion_batch",
    "preprocess_mmc4_document",
]
