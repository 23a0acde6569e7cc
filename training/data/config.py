"""The stream configuration of a training data loader: every option its batches depend on, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS, check_max_image_pixels

# The original's buffered shuffle of the samples.
SAMPLE_SHUFFLE_BUFFER, SAMPLE_SHUFFLE_INITIAL = 5000, 1000


def _check_ints(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}.")


@dataclass(frozen=True)
class StreamConfig:
    """How a loader turns shards into batches: given the shards, its batches are a function of these fields only.

    Built once per loader (by `build_laion_loader(shards, **fields)` or, from the command line's options, by
    `build_train_loaders`) and read by the pipeline and its workers; checked when built.

    Attributes:
        batch_size: samples per batch and process (the original's `--batch_size_laion` / `--batch_size_mmc4`).
        num_samples: samples per epoch over all processes (`--train_num_samples_laion` / `--train_num_samples_mmc4`);
            rounded up to whole batches on every worker as the original does (`TrainLoader.num_samples` says by how
            much).
        resampled: draw shards with replacement (`--dataset_resampled`) instead of a shuffled pass over them.
        workers: DataLoader worker processes (0: in the main process, same batches as 1).
        seed, epoch, rank, world_size: the random draws and this process's share of the shards.
        flip: random horizontal flips (one draw per LAION batch or MMC4 document, as the original); `False` for
            evaluation or parity.
        shuffle_buffer, shuffle_initial: the sample shuffle buffer (the original's 5000 and 1000; 1 keeps the order).
        max_image_pixels: images declaring more pixels (`width * height`, read from the header, before decoding)
            are skipped and counted as `image_too_large` (`--max_image_pixels`; None: no bound of ours, PIL still
            refuses beyond 179 MP). The original allows 1e9, a 4 GB decode from a file of a few hundred KB.

    Raises:
        ValueError: a size that is not a positive int, `rank` outside `[0, world_size)`, a bad `max_image_pixels`.
    """

    batch_size: int
    num_samples: int
    resampled: bool = False
    workers: int = 1
    seed: int = 42
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    flip: bool = True
    shuffle_buffer: int = SAMPLE_SHUFFLE_BUFFER
    shuffle_initial: int = SAMPLE_SHUFFLE_INITIAL
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        _check_ints(
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            workers=self.workers,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
        )
        _check_ints(
            world_size=self.world_size, shuffle_buffer=self.shuffle_buffer, shuffle_initial=self.shuffle_initial
        )
        if self.batch_size < 1 or self.num_samples < 1:
            raise ValueError(
                f"batch_size and num_samples must be positive, got {self.batch_size} and {self.num_samples}."
            )
        if self.workers < 0 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"Need workers >= 0 and 0 <= rank < world_size, got {self.workers}, {self.rank}, {self.world_size}."
            )
        check_max_image_pixels(self.max_image_pixels)

    @property
    def num_workers(self) -> int:
        """Workers that read shards: `workers=0` reads them in the main process, as one worker."""
        return max(1, self.workers)

    def epoch_size(self) -> tuple[int, int, int]:
        """(batches per worker, batches per process, samples per epoch), rounded up as the original does."""
        global_batch_size = self.batch_size * self.world_size
        num_worker_batches = math.ceil(math.ceil(self.num_samples / global_batch_size) / self.num_workers)
        num_batches = num_worker_batches * self.num_workers
        return num_worker_batches, num_batches, num_batches * global_batch_size


@dataclass(frozen=True)
class Mmc4StreamConfig(StreamConfig):
    """`StreamConfig` of an MMC4 loader, with the document preprocessing's options (`preprocess_mmc4_document`).

    Attributes:
        textsim_threshold: drop matched image-sentence pairs below this CLIP similarity (`--mmc4_textsim_threshold`;
            0.24 as in the original's README and scripts; its code default of 30 would drop every image).
        max_num_images: images kept per document (the rest dropped), and T_img of `pixel_values`.
        min_num_images: documents with fewer `<image>` tokens after truncation to 256 tokens are dropped.
        image_order: `"document"` (the original, default) or `"text"`, which gives every `<image>` its own matched
            image where the original's order misaligns them (see `preprocess_mmc4_document`).
    """

    textsim_threshold: float = 0.24
    max_num_images: int = 6
    min_num_images: int = 1
    image_order: str = "document"

    def __post_init__(self) -> None:
        if not 0.0 <= self.textsim_threshold <= 1.0:
            raise ValueError(
                f"textsim_threshold={self.textsim_threshold} is outside [0, 1], the range of MMC4's CLIP similarities: "
                "every image would be kept or dropped. The original recipe uses 0.24 (its code default of 30 is a "
                "bug)."
            )
        _check_ints(max_num_images=self.max_num_images, min_num_images=self.min_num_images)
        if self.max_num_images < 1 or not 0 <= self.min_num_images <= self.max_num_images:
            raise ValueError(
                f"Need 0 <= min_num_images <= max_num_images >= 1, got {self.min_num_images}, {self.max_num_images}."
            )
        if self.image_order not in ("document", "text"):
            raise ValueError(f"image_order must be 'document' (the original) or 'text', got {self.image_order!r}.")
        super().__post_init__()
