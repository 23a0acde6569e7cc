"""What the training loop reports: its counters between two log lines, the log line itself (and the trackers'
values), and the progress bar of the main process."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from modeling_flamingo.training.state import TrainerState


class TrainingMeters:
    """Losses, samples, tokens and skipped bad samples of this process since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sums: dict[str, float] = defaultdict(float)
        self.loss_counts: dict[str, int] = defaultdict(int)
        self.skipped: dict[str, int] = defaultdict(int)
        self.samples = 0
        self.tokens = 0
        self.since = time.perf_counter()

    def add_batch(self, name: str, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Count the samples and (unpadded) tokens of dataset `name`'s `batch` and the bad samples its loader
        skipped (`batch["skipped"]`: reason -> count); returns the batch without `skipped`."""
        batch = dict(batch)
        for reason, count in (batch.pop("skipped", None) or {}).items():
            self.skipped[f"{name}/{reason}"] += int(count)
        self.samples += int(batch["input_ids"].shape[0])
        if "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"].sum())
        else:
            self.tokens += int(batch["input_ids"].numel())
        return batch

    def add_loss(self, name: str, value: float) -> None:
        # A non-finite loss (its step skipped, counted in skipped_steps) would turn the mean into NaN.
        self.loss_sums[name] += value if math.isfinite(value) else 0.0
        self.loss_counts[name] += int(math.isfinite(value))

    def log(
        self, acc: Accelerator, progress, state: TrainerState, total_steps: int, lr: float, to_trackers: bool
    ) -> None:
        """Write the log line of step `state.global_step` (mean losses, learning rate, throughput over every process,
        skipped steps) and the bad samples every process skipped since the last one; send them to the trackers when
        `to_trackers`. Collective: every process calls it. Then start counting again."""
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        local = torch.tensor([float(self.samples), float(self.tokens)], device=acc.device)
        samples, tokens = (acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local).tolist()
        logs = {
            f"loss_{name}": self.loss_sums[name] / count if (count := self.loss_counts[name]) else float("nan")
            for name in self.loss_sums
        }
        logs.update(
            lr=lr,
            samples_per_second=samples / elapsed,
            tokens_per_second=tokens / elapsed,
            skipped_steps=state.skipped_steps,
        )
        skipped = gather_object([dict(self.skipped)]) if acc.num_processes > 1 else [dict(self.skipped)]
        total_skipped: dict[str, int] = defaultdict(int)
        for counts in skipped:
            for key, value in counts.items():
                total_skipped[key] += value
        if acc.is_main_process:
            text = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
            progress.write(f"step {state.global_step}/{total_steps} (epoch {state.last_step_epoch}) {text}")
            short = {"samples_per_second": "samples/s", "tokens_per_second": "tokens/s"}
            progress.set_postfix({short.get(k, k): v for k, v in logs.items() if k != "skipped_steps"}, refresh=False)
            if total_skipped:
                summary = ", ".join(f"{k}: {v}" for k, v in sorted(total_skipped.items()))
                progress.write(f"  bad samples skipped since the last log: {summary}")
            if to_trackers:
                acc.log({**logs, **{f"skipped/{k}": v for k, v in total_skipped.items()}}, step=state.global_step)
        self.reset()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(acc: Accelerator, total: int, initial: int):
    """A tqdm bar of optimiser steps on the main process; on the others, one that shows nothing."""
    if not acc.is_main_process:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", dynamic_ncols=True)


__all__ = ["TrainingMeters", "progress_bar"]
