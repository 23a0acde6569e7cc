"""The training data loaders: one per dataset (`build_laion_loader`, `build_mmc4_loader`) or both from the
command line's options (`build_train_loaders`)."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS, check_max_image_pixels
from modeling_flamingo.training.data.laion import LaionPipeline
from modeling_flamingo.training.data.mmc4 import Mmc4Pipeline
from modeling_flamingo.training.data.pipeline import SAMPLE_SHUFFLE_BUFFER, SAMPLE_SHUFFLE_INITIAL, ShardPipeline
from modeling_flamingo.training.data.shards import expand_shards
from modeling_flamingo.training.data.tokens import check_flamingo_tokenizer

logger = logging.getLogger(__name__)


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
    pipeline_class: type[ShardPipeline],
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
