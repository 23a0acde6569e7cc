"""The arguments of `openflamingo-train`, typed: one dataclass per group of flags (as `--help` lists them), parsed by
`modeling_flamingo.arguments.FlamingoArgumentParser` (`--some_flag` and `--some-flag`, defaults in `--help`).

Every flag of the original `open_flamingo/train/train.py` keeps its name, default and meaning, but its distribution
flags (`cli._MOVED_FLAGS`), which the accelerate config replaces. `TrainingArguments` holds all the groups' fields
flat, as the trainer reads them; the data loaders get `DataLoaderArguments` (the data flags and the run's seed).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from modeling_flamingo.arguments import arg
from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
from modeling_flamingo.training.backends import MIXED_PRECISION
from modeling_flamingo.training.optim import LR_SCHEDULERS

# Optimiser steps in a row skipped for a non-finite loss or gradient norm before training stops with an error.
DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS = 10


def _positive_int(text: str) -> int:
    """argparse type of counts and bounds: `error: argument --flag: expected a positive integer, got '0'`."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


@dataclass
class ModelArguments:
    """The model to train: a saved or converted Flamingo (`--model`), or a fresh one from its parts (`--init_from`)."""

    _argument_group_name = "model"

    model: str | None = arg(
        None, help="a saved or converted Flamingo folder, or a hub id (also original OpenFlamingo repos)"
    )
    init_from: bool = arg(
        False, help="build a fresh Flamingo (closed gates) from --vision_encoder_path, --lm_path, --tokenizer_path"
    )
    vision_encoder_path: str = arg(
        "openai/clip-vit-large-patch14",
        help="CLIP, SigLIP or SigLIP2 folder or hub id (a dual encoder's or a vision model's weights); the "
        "original's open_clip name ViT-L-14 means openai/clip-vit-large-patch14",
    )
    vision_encoder_pretrained: str | None = arg(
        None,
        help="the original's open_clip weights tag for an open_clip --vision_encoder_path (default openai: the only "
        "one with a transformers CLIP here); a transformers tower brings its own weights",
    )
    lm_path: str | None = arg(None, help="the language model (folder or hub id), for --init_from")
    tokenizer_path: str | None = arg(None, help="defaults to --lm_path")
    cross_attn_every_n_layers: int = arg(1)
    revision: str | None = arg(None, help="hub revision of --model / --lm_path")


@dataclass
class RunArguments:
    """The run folder, checkpoints and resuming, seeding, logging and trackers."""

    _argument_group_name = "run"

    run_name: str = arg("openflamingo3B", help="output folder: checkpoints, model/, checkpoint.pt")
    resume_from_checkpoint: str | None = arg(
        None,
        help="a checkpoint_<step> folder (or a run folder: its latest); by default the run folder's latest, if any",
    )
    delete_previous_checkpoint: bool = arg(False)
    move_later_checkpoints_aside: bool = arg(
        False,
        help="resuming from a checkpoint older than others in the run folder: move those (and the exports) into a "
        "superseded-<date> subfolder instead of refusing",
    )
    resume_with_new_optimisation_flags: bool = arg(
        False,
        help="let a resume change --learning_rate, --lr_scheduler, --warmup_steps, --weight_decay, --max_grad_norm, "
        "--num_epochs, --max_steps and the loss multipliers: they apply from the resumed step on (docs/training.md)",
    )
    checkpointing_steps: int | None = arg(None, help="save the training state every N steps")
    seed: int = arg(42)
    logging_steps: int = arg(100)
    report_to_wandb: bool = arg(False)
    report_to: list[str] = arg([], help="accelerate trackers", nargs="*", choices=["tensorboard", "wandb"])
    wandb_project: str | None = arg(None)
    wandb_entity: str | None = arg(None)
    save_checkpoints_to_wandb: bool = arg(
        False,
        help="upload every checkpoint folder and checkpoint.pt into the W&B run's files (needs --report_to_wandb)",
    )
    no_set_device_rank: bool = arg(
        False,
        help="accepted as in the original: accelerate already uses GPU local_rank %% visible GPUs, so one visible GPU "
        "per process (CUDA_VISIBLE_DEVICES) needs nothing more",
    )
    offline: bool = arg(False, help="no network (HF_HUB_OFFLINE=1, WANDB_MODE=offline)")


@dataclass
class OptimisationArguments:
    """AdamW, the learning-rate schedule, precision and the per-dataset loss multipliers (the original's recipe)."""

    _argument_group_name = "optimisation"

    learning_rate: float = arg(1e-4)
    lr_scheduler: str = arg("constant", choices=LR_SCHEDULERS)
    warmup_steps: int = arg(5000)
    weight_decay: float = arg(0.1)
    max_grad_norm: float = arg(1.0)
    max_consecutive_skipped_steps: int = arg(
        DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS,
        help="stop with an error when this many optimiser steps in a row were skipped for a NaN/inf loss or gradient "
        "norm (0: never stop)",
    )
    gradient_accumulation_steps: int = arg(1)
    num_epochs: int = arg(1, help="an epoch is train_num_samples_* samples, as in the original")
    max_steps: int | None = arg(None, help="stop after this many optimiser steps (overrides epochs)")
    precision: str = arg("fp32", choices=list(MIXED_PRECISION))
    gradient_checkpointing: bool = arg(False)
    freeze_lm_embeddings: bool = arg(False)
    loss_multiplier_laion: float = arg(1.0)
    loss_multiplier_mmc4: float = arg(1.0)

    def loss_multiplier(self, dataset: str) -> float:
        """The loss multiplier of `dataset` ("laion", "mmc4"; 1.0 for a dataset without one)."""
        return float({"laion": self.loss_multiplier_laion, "mmc4": self.loss_multiplier_mmc4}.get(dataset, 1.0))


@dataclass
class LoraArguments:
    """LoRA adapters on the language model's decoder layers (not in the original recipe)."""

    _argument_group_name = "LoRA on the language model (not in the original recipe; needs peft)"

    lora_r: int = arg(0, help="LoRA rank; 0 trains no adapter")
    lora_alpha: float = arg(16.0)
    lora_dropout: float = arg(0.0)
    lora_target_modules: list[str] = arg(
        [], nargs="*", help="module names in the decoder layers (default: the attention projections of the LM family)"
    )


@dataclass
class DataArguments:
    """The LAION and MMC4 webdataset streams (docs/training_data.md); the field names are the flags'."""

    _argument_group_name = "data"

    laion_shards: str | None = arg(None, help="webdataset shards, e.g. /data/laion/{00000..00999}.tar")
    mmc4_shards: str | None = arg(None, help="webdataset shards, e.g. /data/mmc4/{00000..00999}.tar")
    batch_size_laion: int = arg(128)
    batch_size_mmc4: int = arg(128)
    train_num_samples_laion: int = arg(10000)
    train_num_samples_mmc4: int = arg(10000)
    dataset_resampled: bool = arg(False)
    workers: int = arg(1)
    mmc4_textsim_threshold: float = arg(0.24)
    mmc4_max_num_images: int = arg(6)
    mmc4_min_num_images: int = arg(1)
    mmc4_image_order: str = arg(
        "document",
        choices=["document", "text"],
        help="MMC4 images in document order (the original) or each at its matched sentence (docs/training_data.md)",
    )
    no_flip: bool = arg(False, help="no random horizontal flips (the original always flips)")
    max_image_pixels: int = arg(
        DEFAULT_MAX_IMAGE_PIXELS,
        type=_positive_int,
        help="skip (and count) training images declaring more pixels, read from the header before decoding "
        "(default: %(default)s; the original allows 1e9)",
    )


@dataclass
class DataLoaderArguments(DataArguments):
    """What `modeling_flamingo.training.data.build_train_loaders` reads: the data flags and the run's `--seed`."""

    seed: int = dataclasses.field(kw_only=True)


# The groups of flags, in the order `--help` lists them.
ARGUMENT_GROUPS = (ModelArguments, RunArguments, OptimisationArguments, LoraArguments, DataArguments)


@dataclass
class TrainingArguments(DataArguments, LoraArguments, OptimisationArguments, RunArguments, ModelArguments):
    """Every flag of `openflamingo-train` in one object (the fields of the `ARGUMENT_GROUPS`, in their order: the
    bases are listed in reverse because a dataclass puts the fields of its last base first)."""

    @classmethod
    def from_groups(cls, *groups: Any) -> TrainingArguments:
        """One object from an instance of each of the `ARGUMENT_GROUPS` (what the parser returns)."""
        return cls(**{f.name: getattr(group, f.name) for group in groups for f in dataclasses.fields(group)})

    def data_loader_arguments(self) -> DataLoaderArguments:
        """The data flags and the seed, as the data loaders read them."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataArguments)}
        return DataLoaderArguments(**data, seed=self.seed)


__all__ = [
    "ARGUMENT_GROUPS",
    "DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS",
    "DataArguments",
    "DataLoaderArguments",
    "LoraArguments",
    "ModelArguments",
    "OptimisationArguments",
    "RunArguments",
    "TrainingArguments",
]
