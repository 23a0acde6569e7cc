"""What the training loop does differently under each of Accelerate's distribution backends, in one place.

The loop never wraps the model itself: Accelerate does, from the launch configuration. Three things differ between
the backends, and `select_backend` picks the object that knows them once, from the prepared `Accelerator`:

- `TrainingBackend` (one process, DDP): the loop accumulates gradients over micro-steps, skipping the gradient
  all-reduce (`no_sync`) until the last backward of the window, then clips and steps AdamW itself;
- `FsdpBackend` (FSDP2): as above, but every backward reduce-scatters, and the model's FSDP units are filled in;
- `DeepSpeedBackend`: DeepSpeed clips, steps and counts micro-batches inside its one backward per micro-step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from modeling_flamingo.modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.training.run_folder import check_checkpoint_files, check_deepspeed_files

# --precision values of the original and the Accelerate mixed-precision mode each one means here. The original's
# "bf16"/"fp16" cast only the inputs of an fp32 model (which then fails); here they mean autocast like "amp_*".
MIXED_PRECISION = {
    "fp32": "no",
    "amp_bf16": "bf16",
    "amp_bfloat16": "bf16",
    "bf16": "bf16",
    "amp": "fp16",
    "fp16": "fp16",
}


def build_accelerator(args: Any) -> Accelerator:
    """The `Accelerator` of a run: mixed precision from `--precision`, the trackers of `--report_to`, and the launch
    configuration (DDP, FSDP, DeepSpeed) from the environment `accelerate launch` sets."""
    if args.precision not in MIXED_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(MIXED_PRECISION)}; got {args.precision!r}.")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if deepspeed and _deepspeed_on_cpu():
        # Accelerate picks a process-group backend only for accelerator devices (or for its own CPU mode, which
        # excludes DeepSpeed): DeepSpeed's CPU accelerator communicates over gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        kwargs_handlers=handlers,
        mixed_precision=MIXED_PRECISION[args.precision],
        # DeepSpeed counts micro-batches itself; elsewhere the loop accumulates (two datasets per micro-step).
        gradient_accumulation_steps=int(args.gradient_accumulation_steps) if deepspeed else 1,
        log_with=build_trackers(args) or None,
        project_dir=str(args.run_name),
        # The schedule counts optimiser steps, like the original (not optimiser steps x processes).
        step_scheduler_with_optimizer=False,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate enables fp16 autocast and its GradScaler only off the CPU: the run would silently be fp32.
        raise ValueError(
            f"--precision {args.precision} needs a GPU: on the CPU Accelerate runs neither fp16 autocast nor a "
            "gradient scaler, so the run would train in fp32; use --precision amp_bf16 (bf16 autocast) or fp32"
        )
    return accelerator


def build_trackers(args: Any) -> list[GeneralTracker]:
    """The Accelerate trackers named by `--report_to` (`--report_to_wandb` adds "wandb").

    TensorBoard writes its event files under `{run_name}/tensorboard/`. The W&B run is the original's
    (`open_flamingo/train/train.py`): project `--wandb_project` (W&B's default, or `WANDB_PROJECT`, when unset),
    entity `--wandb_entity`, named `--run_name`; its files go where W&B puts them (`WANDB_DIR`, else `./wandb`).
    """
    trackers: list[GeneralTracker] = []
    for name in dict.fromkeys(args.report_to or []):  # once each, in order
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(args.run_name)))
        elif name == "wandb":
            init = {"name": str(args.run_name)}
            if args.wandb_entity:
                init["entity"] = args.wandb_entity
            trackers.append(WandBTracker(args.wandb_project, **init))
        else:
            raise ValueError(f"report_to: unknown tracker {name!r}; expected tensorboard or wandb.")
    return trackers


def fsdp_wrap_classes(model: FlamingoForConditionalGeneration) -> list[str]:
    """The FSDP units: the classes of `model._no_split_modules` the model holds (the vision tower's encoder layers,
    the resampler, the gated cross-attention blocks and the language model's decoder layers, taken from the built
    model). Accelerate's default takes the whole list, which also gathers the lists of the vision tower's and language
    model's own classes, and fails on the classes this model lacks (e.g. CLIP's text embeddings)."""
    present = {type(module).__name__ for module in model.modules()}
    return sorted(name for name in model._no_split_modules if name in present)


class TrainingBackend:
    """One process or DDP: the loop accumulates the gradients of a window's micro-steps itself (without the
    all-reduce until the window's last backward), then clips them and steps AdamW and the schedule.

    Attributes:
        trains_token_rows: whether `TrainableTokenRows` (a (k, d) parameter registered on the embedding) works here.
        hooks_survive_wrapping: whether a gradient hook on a model parameter still runs once Accelerate prepared the
            model (FSDP replaces the parameters by sharded ones).
    """

    trains_token_rows = True
    hooks_survive_wrapping = True

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def configure(self, model: FlamingoForConditionalGeneration, args: Any) -> None:
        """Fill in what the launch configuration leaves to the model, before `accelerator.prepare`."""

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, accumulation: int, sync: bool) -> None:
        """The backward pass of one dataset's `loss` (already weighted by its multiplier); `sync`: the last backward
        of the accumulation window, where the gradients are all-reduced."""
        acc = self.accelerator
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            acc.backward(loss / accumulation)

    def end_micro_step(self, sync: bool, skip: bool) -> None:
        """After the last dataset of a micro-step; `skip`: a loss of the window was not finite on some process."""

    def step(self, model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float) -> bool:
        """Clip the gradients and step AdamW and the schedule, unless the gradient norm is not finite. Returns
        whether the weights moved."""
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        if norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)).all()):
            return False
        optimizer.step()
        scheduler.step()
        return True

    def load_state(self, folder: Path, saved_keys: set[str]) -> None:
        """Check the checkpoint files this process reads, then `accelerator.load_state`. The weights file holds the
        trainable parameters and the input embeddings (`saved_keys`): loaded non-strictly, after checking that it
        holds exactly those."""
        from safetensors import safe_open

        weights = folder / "model.safetensors"
        if weights.is_file():
            try:
                with safe_open(str(weights), "pt") as f:
                    stored = set(f.keys())
            except Exception as exc:
                raise ValueError(
                    f"cannot resume from {folder}: {weights.name}: it is truncated or corrupt ({exc}); resume "
                    "from another checkpoint"
                ) from None
            if stored != saved_keys:
                missing = sorted(saved_keys - stored)[:3]
                extra = sorted(stored - saved_keys)[:3]
                raise ValueError(
                    f"Checkpoint {folder} does not match this model's trainable set (missing {missing}, "
                    f"unexpected {extra}): resume with the same model and flags."
                )
        check_checkpoint_files(folder, self.accelerator.process_index)
        self._load_state(folder, strict=False)

    def _load_state(self, folder: Path, **kwargs: Any) -> None:
        try:
            self.accelerator.load_state(str(folder), **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            message = " ".join(str(exc).split())[:160]
            raise ValueError(f"cannot resume from {folder}: {message}; resume from another checkpoint") from exc


class FsdpBackend(TrainingBackend):
    """FSDP2: the model is sharded in units (`fsdp_wrap_classes`) and its parameters replaced by row-sharded
    DTensors; every backward reduce-scatters; checkpoints hold the whole sharded model."""

    hooks_survive_wrapping = False

    def configure(self, model: FlamingoForConditionalGeneration, args: Any) -> None:
        if not self.accelerator.is_fsdp2:
            raise ValueError(
                "Only FSDP2 (fsdp_version: 2 in the accelerate config) is supported; see docs/training.md."
            )
        plugin = self.accelerator.state.fsdp_plugin
        if getattr(plugin, "transformer_cls_names_to_wrap", None) is None:
            plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, accumulation: int, sync: bool) -> None:
        # Skipping the sync would keep full-size gradients across micro-steps (the memory FSDP saves) outside the
        # sharded `.grad`, where a skipped step's `zero_grad` cannot drop them.
        self.accelerator.backward(loss / accumulation)

    def load_state(self, folder: Path, saved_keys: set[str]) -> None:
        check_checkpoint_files(folder, self.accelerator.process_index)
        self._load_state(folder)


class DeepSpeedBackend(TrainingBackend):
    """DeepSpeed: one backward per micro-step over all datasets; DeepSpeed clips (`gradient_clipping` in its
    config) and steps the optimiser inside it at the window's end. Its ZeRO stages partition the parameters, which
    the (k, d) token-rows parameter does not survive: the dense embedding is trained with its gradient masked."""

    trains_token_rows = False

    def __init__(self, accelerator: Accelerator):
        super().__init__(accelerator)
        self._combined: torch.Tensor | None = None

    def configure(self, model: FlamingoForConditionalGeneration, args: Any) -> None:
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            # Accelerate reads it from prepared data loaders, which this loop does not pass; DeepSpeed only counts
            # samples with it (one micro-step holds a batch of each dataset).
            ds_config["train_micro_batch_size_per_gpu"] = int(args.batch_size_laion)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor, accumulation: int, sync: bool) -> None:
        # DeepSpeed steps inside its backward: the datasets' losses are summed into one backward per micro-step, and
        # DeepSpeed divides by the accumulation steps itself.
        self._combined = loss if self._combined is None else self._combined + loss

    def end_micro_step(self, sync: bool, skip: bool) -> None:
        # Our window sets DeepSpeed's accumulation boundary (Accelerate's own count would miss an epoch's end: the
        # loaders are not prepared). A micro-step with a non-finite loss on any process runs no backward anywhere.
        combined, self._combined = self._combined, None
        self.accelerator.sync_gradients = sync
        if combined is not None and not skip:
            self.accelerator.backward(combined)

    def step(self, model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float) -> bool:
        # DeepSpeed clipped and stepped in backward; the schedule was prepared apart from its engine.
        scheduler.step()
        return True

    def load_state(self, folder: Path, saved_keys: set[str]) -> None:
        check_checkpoint_files(folder, self.accelerator.process_index)
        check_deepspeed_files(folder)
        self._load_state(folder)


def select_backend(accelerator: Accelerator) -> TrainingBackend:
    """The backend object of `accelerator`'s distribution type."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return FsdpBackend(accelerator)
    return TrainingBackend(accelerator)


def _deepspeed_on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


__all__ = [
    "MIXED_PRECISION",
    "DeepSpeedBackend",
    "FsdpBackend",
    "TrainingBackend",
    "build_accelerator",
    "build_trackers",
    "fsdp_wrap_classes",
    "select_backend",
]
