"""Where a run stands (`TrainerState`, saved as `trainer_state.json` in every checkpoint folder) and which
checkpoint a run resumes from."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeling_flamingo.training.run_folder import TRAINER_STATE_NAME, list_checkpoints


@dataclass
class TrainerState:
    """Where training stands; saved as `trainer_state.json` in every checkpoint folder.

    `epoch` and `batches_done` are where the data resumes; at the end of an epoch they already point at the next one,
    so the epoch of the last step is `last_step_epoch`.

    Attributes:
        epoch: the epoch (0-based) of the next micro-batch to read; also the number of epochs completed.
        batches_done: micro-batches (per dataset) of that epoch already consumed.
        global_step: optimiser steps taken (including skipped non-finite ones).
        skipped_steps: optimiser steps skipped because a loss or the gradient norm was not finite.
        last_step_epoch: the epoch (0-based) that step `global_step` belongs to, as the log names it.
        consecutive_skipped_steps: skipped steps in a row up to `global_step` (0 when that step moved the weights);
            training stops when it reaches `--max_consecutive_skipped_steps`.
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    skipped_steps: int = 0
    last_step_epoch: int = 0
    consecutive_skipped_steps: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerState:
        """The state of a `trainer_state.json`. The fields added after the first four may be absent (folders written
        before them): `last_step_epoch` then follows from the data position, `consecutive_skipped_steps` is 0."""
        values = {k: int(data[k]) for k in ("epoch", "batches_done", "global_step", "skipped_steps")}
        step_epoch = values["epoch"] - 1 if values["batches_done"] == 0 and values["epoch"] > 0 else values["epoch"]
        values["last_step_epoch"] = int(data.get("last_step_epoch", step_epoch))
        values["consecutive_skipped_steps"] = int(data.get("consecutive_skipped_steps", 0))
        return cls(**values)

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        """The state saved in checkpoint `folder`; a ValueError naming the file when it is not one."""
        try:
            data = json.loads((folder / TRAINER_STATE_NAME).read_text())
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder / TRAINER_STATE_NAME} is not a valid trainer state: {exc}") from None


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint_<step>` folder with the highest step in `run_dir` (complete ones only), or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resume_checkpoint(run_name: str, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint folder a run resumes from: `--resume_from_checkpoint` (a checkpoint folder, or a run folder:
    its latest), else the latest of the run folder `--run_name` (as the original), or None for a new run."""
    if resume_from_checkpoint is None:
        return find_latest_checkpoint(run_name)
    path = Path(resume_from_checkpoint)
    if path.is_dir() and not (path / TRAINER_STATE_NAME).is_file():
        latest = find_latest_checkpoint(path)
        if latest is not None:
            return latest
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a checkpoint folder of this trainer (no {TRAINER_STATE_NAME})."
        )
    return path


__all__ = ["TrainerState", "find_latest_checkpoint", "resume_checkpoint"]
