"""The training data loaders: one per dataset (`build_laion_loader`, `build_mmc4_loader`) or both from the
command line's options (`build_train_loaders`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.training.data.config import Mmc4StreamConfig, StreamConfig
from modeling_flamingo.training.data.laion import LaionPipeline
from modeling_flamingo.training.data.mmc4 import Mmc4Pipeline
from modeling_flamingo.training.data.pipeline import ShardPipeline
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
        self.dataloader.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataloader)

    def __len__(self) -> int:
        return self.num_batches


def _build_loader(
    pipeline_class: type[ShardPipeline],
    shards: str | Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    config: StreamConfig,
) -> TrainLoader:
    """The loader of `pipeline_class` over `shards`, as `config` says; the tokenizer and the shards are checked here,
    once, before any worker starts."""
    tokens = check_flamingo_tokenizer(tokenizer)
    urls = expand_shards(shards)
    if not config.resampled and len(urls) < config.num_workers * config.world_size:
        raise ValueError(
            f"{len(urls)} shards cannot feed {config.num_workers} workers x {config.world_size} processes without "
            "resampling: every worker needs a shard of its own. Use fewer workers or resampled=True "
            "(--dataset_resampled)."
        )
    _, num_batches, total_samples = config.epoch_size()
    if total_samples != config.num_samples:
        logger.warning(
            "num_samples=%d is not a multiple of batch_size %d x %d processes x %d workers: an epoch takes %d samples "
            "(%d batches per process), rounded up as the original does.",
            config.num_samples,
            config.batch_size,
            config.world_size,
            config.num_workers,
            total_samples,
            num_batches,
        )
    dataset = pipeline_class(urls, config, tokenizer=tokenizer, image_processor=image_processor, tokens=tokens)
    dataloader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=config.workers)
    return TrainLoader(dataloader=dataloader, num_batches=num_batches, num_samples=total_samples)


def build_laion_loader(
    shards: str | Sequence[str], *, tokenizer: PreTrainedTokenizerBase, image_processor: Any, **config: Any
) -> TrainLoader:
    """A loader of LAION-style image-text shards (img2dataset layout), preprocessed as the original.

    Args:
        shards: brace pattern, glob or list of tar shards (local or fsspec URLs), see `expand_shards`.
        tokenizer: the language model's tokenizer with the Flamingo tokens (`add_flamingo_tokens`).
        image_processor: `FlamingoImageProcessor` sized for the vision tower, or a callable PIL image -> (3, H, W).
        config: the fields of `StreamConfig`: `batch_size` and `num_samples`, and optionally `resampled`,
            `workers`, `seed`, `epoch`, `rank`, `world_size`, `flip`, `shuffle_buffer`, `shuffle_initial`,
            `max_image_pixels` (their defaults and meaning there).

    Each batch: `pixel_values` (B, 1, 1, 3, H, W), `input_ids`/`attention_mask`/`labels` (B, L <= 32), `skipped`.

    Raises:
        ValueError: a shard pattern that matches nothing or a missing shard, a tokenizer without the Flamingo tokens,
            fewer shards than workers x processes without resampling, a non-positive size or `max_image_pixels`.
    """
    return _build_loader(LaionPipeline, shards, tokenizer, image_processor, StreamConfig(**config))


def build_mmc4_loader(
    shards: str | Sequence[str], *, tokenizer: PreTrainedTokenizerBase, image_processor: Any, **config: Any
) -> TrainLoader:
    """A loader of MMC4 shards (one JSON document per sample, as `convert_mmc4_to_wds.py` writes them), preprocessed
    as the original (`preprocess_mmc4_document`).

    Args are those of `build_laion_loader`, `config` being the fields of `Mmc4StreamConfig`: those of
    `StreamConfig` plus `textsim_threshold`, `max_num_images`, `min_num_images` and `image_order`.

    Each batch: `pixel_values` (B, max_num_images, 1, 3, H, W) (zeros after a document's images), `input_ids` /
    `attention_mask` / `labels` (B, 256), `skipped`.
    """
    return _build_loader(Mmc4Pipeline, shards, tokenizer, image_processor, Mmc4StreamConfig(**config))


def build_train_loaders(
    args: Any,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: Any,
    *,
    epoch: int,
    rank: int,
    world_size: int,
) -> dict[str, TrainLoader]:
    """The loaders of the datasets `args` names, keyed `"laion"` and `"mmc4"`, from the original `train.py` options.

    Args:
        args: the command line's arguments (`modeling_flamingo.training.cli`), of which the data ones are read:
            `laion_shards`, `mmc4_shards` (each None or empty for no such dataset), `batch_size_laion`,
            `batch_size_mmc4`, `train_num_samples_laion`, `train_num_samples_mmc4`, `dataset_resampled`, `workers`,
            `seed`, `mmc4_textsim_threshold`, `mmc4_max_num_images`, `mmc4_min_num_images`, `mmc4_image_order`,
            `no_flip`, `max_image_pixels`. Their defaults are the command line's.
        tokenizer, image_processor: as for `build_laion_loader`.
        epoch, rank, world_size: the epoch and this process's place (`StreamConfig`).

    Raises:
        ValueError: no dataset given, or the two datasets give different numbers of batches per epoch (the original
            steps through both together, one LAION and one MMC4 batch per step).
    """
    shared = {
        "resampled": args.dataset_resampled,
        "workers": args.workers,
        "seed": args.seed,
        "epoch": epoch,
        "rank": rank,
        "world_size": world_size,
        "flip": not args.no_flip,
        "max_image_pixels": args.max_image_pixels,
    }
    loaders: dict[str, TrainLoader] = {}
    if args.laion_shards:
        laion = StreamConfig(batch_size=args.batch_size_laion, num_samples=args.train_num_samples_laion, **shared)
        loaders["laion"] = _build_loader(LaionPipeline, args.laion_shards, tokenizer, image_processor, laion)
    if args.mmc4_shards:
        mmc4 = Mmc4StreamConfig(
            batch_size=args.batch_size_mmc4,
            num_samples=args.train_num_samples_mmc4,
            textsim_threshold=args.mmc4_textsim_threshold,
            max_num_images=args.mmc4_max_num_images,
            min_num_images=args.mmc4_min_num_images,
            image_order=args.mmc4_image_order,
            **shared,
        )
        loaders["mmc4"] = _build_loader(Mmc4Pipeline, args.mmc4_shards, tokenizer, image_processor, mmc4)
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
