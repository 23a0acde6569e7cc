"""Training data for OpenFlamingo: LAION image-text and MMC4 interleaved WebDataset shards, preprocessed as the
original (`open_flamingo/train/data.py` at the repository's last commit), and a collator for users' own data.

Shards are tar files read as streams from local paths or any fsspec URL (`s3://`, `gs://`, `https://`...; the
protocol's fsspec package must be installed), given as brace patterns (`shards-{0000..0999}.tar`), globs or lists.

Modules: `shards` (patterns, tar streams, the buffered shuffle), `images` (bounded decoding, pixel values, flips),
`tokens`, `laion` and `mmc4` (each dataset's preprocessing and pipeline), `config` (`StreamConfig`: every option a
loader's batches depend on), `pipeline` (the per-process `IterableDataset` split over workers), `loaders`
(`build_*_loader`, `TrainLoader`), `skips` (`SKIP_REASONS`), `collator` (`FlamingoDataCollator`). Everything public
is importable from this package.

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
      1e9), and so is their size once the image processor resizes them (see `images.check_resized_size`). An MMC4
      document's images are checked from their headers (format identified, size bound), the assignment is solved
      on those, and only the images it keeps are decoded, each straight to its pixel values; one that then fails to
      decode leaves the assignment, which is solved again. This equals decoding every image
      first whenever the images with a readable header decode. The one difference: an image whose header reads but
      whose data is corrupt, and which the assignment pairs below the threshold or past `max_num_images`, is never
      decoded, so it stays in the assignment (where decoding first would have removed it, which may give the other
      images other sentences) and is not counted.
    - Only the image and text members are decoded (never pickles or other members).
"""

from modeling_flamingo.training.data.collator import FlamingoDataCollator
from modeling_flamingo.training.data.config import (
    SAMPLE_SHUFFLE_BUFFER,
    SAMPLE_SHUFFLE_INITIAL,
    Mmc4StreamConfig,
    StreamConfig,
)
from modeling_flamingo.training.data.images import decode_rgb_image, pixel_values_of
from modeling_flamingo.training.data.laion import (
    LAION_IMAGE_EXTENSIONS,
    LAION_MAX_TOKENS,
    LaionPipeline,
    decode_laion_sample,
    preprocess_laion_batch,
)
from modeling_flamingo.training.data.loaders import (
    TrainLoader,
    build_laion_loader,
    build_mmc4_loader,
    build_train_loaders,
)
from modeling_flamingo.training.data.mmc4 import (
    MMC4_MAX_TOKENS,
    MMC4_MIN_IMAGE_KB,
    Mmc4Pipeline,
    preprocess_mmc4_document,
)
from modeling_flamingo.training.data.shards import (
    MAX_TAR_MEMBER_BYTES,
    SHARD_SHUFFLE_BUFFER,
    SHARD_SHUFFLE_INITIAL,
    buffer_shuffle,
    expand_shards,
    iter_tar_samples,
)
from modeling_flamingo.training.data.skips import SKIP_REASONS, SkipSample
from modeling_flamingo.training.data.tokens import FlamingoTokens, check_flamingo_tokenizer

__all__ = [
    "LAION_IMAGE_EXTENSIONS",
    "LAION_MAX_TOKENS",
    "MAX_TAR_MEMBER_BYTES",
    "MMC4_MAX_TOKENS",
    "MMC4_MIN_IMAGE_KB",
    "SAMPLE_SHUFFLE_BUFFER",
    "SAMPLE_SHUFFLE_INITIAL",
    "SHARD_SHUFFLE_BUFFER",
    "SHARD_SHUFFLE_INITIAL",
    "SKIP_REASONS",
    "FlamingoDataCollator",
    "FlamingoTokens",
    "LaionPipeline",
    "Mmc4Pipeline",
    "Mmc4StreamConfig",
    "SkipSample",
    "StreamConfig",
    "TrainLoader",
    "buffer_shuffle",
    "build_laion_loader",
    "build_mmc4_loader",
    "build_train_loaders",
    "check_flamingo_tokenizer",
    "decode_laion_sample",
    "decode_rgb_image",
    "expand_shards",
    "iter_tar_samples",
    "pixel_values_of",
    "preprocess_laion_batch",
    "preprocess_mmc4_document",
]
