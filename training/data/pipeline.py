"""The iterable dataset of one process's batches: its workers' shares of the shards, the seeded draws, the epoch."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.training.data.config import StreamConfig
from modeling_flamingo.training.data.shards import (
    SHARD_SHUFFLE_BUFFER,
    SHARD_SHUFFLE_INITIAL,
    buffer_shuffle,
    iter_tar_samples,
)
from modeling_flamingo.training.data.tokens import FlamingoTokens


class ShardPipeline(IterableDataset):
    """Batches of one process (`config.rank`), split over its DataLoader workers, as `config` says (its epoch
    changed by `set_epoch`). Subclasses turn samples into batches."""

    def __init__(
        self,
        urls: list[str],
        config: StreamConfig,
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        tokens: FlamingoTokens,
    ):
        super().__init__()
        self.urls = urls
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokens = tokens

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s shard order and random draws from the next `iter()` on."""
        self.config = dataclasses.replace(self.config, epoch=epoch)

    def _rng(self, worker: int, purpose: str) -> random.Random:
        # String seeds are hashed with SHA-512: the same in every process and on every machine, unlike hash().
        config = self.config
        return random.Random(f"{config.seed}/{config.epoch}/{config.rank}/{worker}/{purpose}")

    def worker_shards(self, worker: int, num_workers: int, sweep: int = 0) -> Iterable[str]:
        """The shards `worker` reads in pass number `sweep` over them: endless draws with replacement when
        resampling, otherwise its share of the seeded shard order (the same in every pass of an epoch)."""
        if self.config.resampled:
            rng = self._rng(worker, f"shards/{sweep}")
            return (rng.choice(self.urls) for _ in itertools.repeat(None))
        # The original's shard seed, equal on every rank.
        shard_rng = random.Random(self.config.seed + self.config.epoch)
        order = list(buffer_shuffle(self.urls, SHARD_SHUFFLE_BUFFER, SHARD_SHUFFLE_INITIAL, shard_rng))
        return order[self.config.rank :: self.config.world_size][worker::num_workers]

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

        rng = self._rng(worker, f"samples/{sweep}")
        return buffer_shuffle(raw(), self.config.shuffle_buffer, self.config.shuffle_initial, rng)

    def batches(self, samples: Iterator[dict[str, Any]], worker: int, sweep: int, skipped: Counter) -> Iterator[dict]:
        """Batches made of `samples` (without `skipped`, which `__iter__` adds)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: Counter = Counter()
        produced, sweep = 0, 0
        num_worker_batches, _, _ = self.config.epoch_size()

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

        while produced < num_worker_batches:
            produced_before = produced
            shards = self.worker_shards(worker, num_workers, sweep)
            reads: Counter = Counter()
            samples = self.samples(shards, worker, sweep, skipped, reads)
            if self.config.resampled:
                samples = give_up_without_batches(samples, reads)
            for batch in self.batches(samples, worker, sweep, skipped):
                batch["skipped"] = dict(skipped)
                skipped.clear()
                yield batch
                produced += 1
                if produced == num_worker_batches:
                    return
            if produced == produced_before:  # a whole pass over the worker's shards made no batch: so would the next
                names = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
                raise self._no_batch_error(worker, f"its shards {names}", skipped)
            sweep += 1

    def _flip_generator(self, worker: int, sweep: int) -> torch.Generator | None:
        if not self.config.flip:
            return None
        return torch.Generator().manual_seed(self._rng(worker, f"flip/{sweep}").getrandbits(63))

    def _no_batch_error(self, worker: int, source: str, skipped: Counter) -> RuntimeError:
        return RuntimeError(
            f"Worker {worker} of rank {self.config.rank} made no batch of {self.config.batch_size} samples from "
            f"{source}; skipped since its last batch: {dict(skipped) or 'nothing'} (reasons: SKIP_REASONS in "
            f"{__package__}). A worker needs at least batch_size usable samples in its share of the shards."
        )
