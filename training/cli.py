"""Command line of the training loop: `accelerate launch -m modeling_flamingo.training ...` (or `python -m`, or the
`openflamingo-train` console script).

Every flag of the original `open_flamingo/train/train.py` keeps its name and meaning and is accepted with `_` or `-`,
but its distribution flags (`_MOVED_FLAGS`): distribution (DDP, FSDP, DeepSpeed, hybrid sharding) comes from the
accelerate config (`accelerate launch --config_file training/configs/...`); see docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
from modeling_flamingo.training.optim import LR_SCHEDULERS
from modeling_flamingo.training.trainer import DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS, PRECISIONS

# Accelerate launch configurations shipped with the package (ddp, fsdp_full, fsdp_hybrid, deepspeed_zero2/3).
CONFIGS_DIR = Path(__file__).parent / "configs"

# Flags of the original that this loop replaces by the accelerate config, and where their setting lives now.
_MOVED_FLAGS = {
    "--fsdp": "distributed_type: FSDP in the accelerate config (training/configs/fsdp_full.yaml)",
    "--fsdp_use_orig_params": "nothing: FSDP2 always keeps the original parameters",
    "--fsdp_sharding_strategy": "fsdp_config in the accelerate config (fsdp_full.yaml / fsdp_hybrid.yaml)",
    "--dist-url": "the accelerate launcher (--main_process_ip/--main_process_port)",
    "--dist_url": "the accelerate launcher (--main_process_ip/--main_process_port)",
    "--dist-backend": "the accelerate launcher (it picks nccl / gloo)",
    "--dist_backend": "the accelerate launcher (it picks nccl / gloo)",
    "--horovod": "nothing: horovod is not supported, use accelerate launch",
}

# The original's open_clip vision towers (`--vision_encoder_path`, `--vision_encoder_pretrained`) that have a
# transformers CLIP with the same weights.
_OPEN_CLIP_VISION_ENCODERS = {("ViT-L-14", "openai"): "openai/clip-vit-large-patch14"}
_OPEN_CLIP_DEFAULT_PRETRAINED = "openai"


class _Parser(argparse.ArgumentParser):
    """Errors as one `error: ...` line on stderr and exit status 2 (no usage block: `--help` has it)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--some_flag` also as `--some-flag`."""
    names = [name]
    dashed = "--" + name[2:].replace("_", "-")
    if dashed != name:
        names.append(dashed)
    parser.add_argument(*names, **kwargs)


def _positive_int(text: str) -> int:
    """argparse type of counts and bounds: `error: argument --flag: expected a positive integer, got '0'`."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="openflamingo-train",
        description="Train OpenFlamingo's resampler and gated cross-attention (the original recipe) on Accelerate.",
    )
    model = parser.add_argument_group("model")
    _add(model, "--model", help="a saved or converted Flamingo folder, or a hub id (also original OpenFlamingo repos)")
    _add(
        model,
        "--init_from",
        action="store_true",
        help="build a fresh Flamingo (closed gates) from --vision_encoder_path, --lm_path, --tokenizer_path",
    )
    _add(
        model,
        "--vision_encoder_path",
        default="openai/clip-vit-large-patch14",
        help="CLIP, SigLIP or SigLIP2 folder or hub id (a dual encoder's or a vision model's weights); the "
        "original's open_clip name ViT-L-14 means openai/clip-vit-large-patch14",
    )
    _add(
        model,
        "--vision_encoder_pretrained",
        help="the original's open_clip weights tag for an open_clip --vision_encoder_path (default openai: the only "
        "one with a transformers CLIP here); a transformers tower brings its own weights",
    )
    _add(model, "--lm_path", help="the language model (folder or hub id), for --init_from")
    _add(model, "--tokenizer_path", help="defaults to --lm_path")
    _add(model, "--cross_attn_every_n_layers", type=int, default=1)
    _add(model, "--revision", help="hub revision of --model / --lm_path")

    run = parser.add_argument_group("run")
    _add(run, "--run_name", default="openflamingo3B", help="output folder: checkpoints, model/, checkpoint.pt")
    _add(
        run,
        "--resume_from_checkpoint",
        help="a checkpoint_<step> folder (or a run folder: its latest); by default the run folder's latest, if any",
    )
    _add(run, "--delete_previous_checkpoint", action="store_true")
    _add(
        run,
        "--move_later_checkpoints_aside",
        action="store_true",
        help="resuming from a checkpoint older than others in the run folder: move those (and the exports) into a "
        "superseded-<date> subfolder instead of refusing",
    )
    _add(
        run,
        "--resume_with_new_optimisation_flags",
        action="store_true",
        help="let a resume change --learning_rate, --lr_scheduler, --warmup_steps, --weight_decay, --max_grad_norm, "
        "--num_epochs, --max_steps and the loss multipliers: they apply from the resumed step on (docs/training.md)",
    )
    _add(run, "--checkpointing_steps", type=int, default=None, help="save the training state every N steps")
    _add(run, "--seed", type=int, default=42)
    _add(run, "--logging_steps", type=int, default=100)
    _add(run, "--report_to_wandb", action="store_true")
    _add(run, "--report_to", nargs="*", default=[], choices=["tensorboard", "wandb"], help="accelerate trackers")
    _add(run, "--wandb_project")
    _add(run, "--wandb_entity")
    _add(
        run,
        "--save_checkpoints_to_wandb",
        action="store_true",
        help="upload every checkpoint folder and checkpoint.pt into the W&B run's files (needs --report_to_wandb)",
    )
    run.add_argument(
        "--no-set-device-rank",
        "--no_set_device_rank",
        action="store_true",
        help="accepted as in the original: accelerate already uses GPU local_rank %% visible GPUs, so one visible GPU "
        "per process (CUDA_VISIBLE_DEVICES) needs nothing more",
    )
    _add(run, "--offline", action="store_true", help="no network (HF_HUB_OFFLINE=1, WANDB_MODE=offline)")

    optim = parser.add_argument_group("optimisation")
    _add(optim, "--learning_rate", type=float, default=1e-4)
    _add(optim, "--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    _add(optim, "--warmup_steps", type=int, default=5000)
    _add(optim, "--weight_decay", type=float, default=0.1)
    _add(optim, "--max_grad_norm", type=float, default=1.0)
    _add(
        optim,
        "--max_consecutive_skipped_steps",
        type=int,
        default=DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS,
        help="stop with an error when this many optimiser steps in a row were skipped for a NaN/inf loss or gradient "
        "norm (0: never stop)",
    )
    _add(optim, "--gradient_accumulation_steps", type=int, default=1)
    _add(
        optim, "--num_epochs", type=int, default=1, help="an epoch is train_num_samples_* samples, as in the original"
    )
    _add(optim, "--max_steps", type=int, default=None, help="stop after this many optimiser steps (overrides epochs)")
    _add(optim, "--precision", default="fp32", choices=list(PRECISIONS))
    _add(optim, "--gradient_checkpointing", action="store_true")
    _add(optim, "--freeze_lm_embeddings", action="store_true")
    _add(optim, "--loss_multiplier_laion", type=float, default=1.0)
    _add(optim, "--loss_multiplier_mmc4", type=float, default=1.0)

    lora = parser.add_argument_group("LoRA on the language model (not in the original recipe; needs peft)")
    _add(lora, "--lora_r", type=int, default=0, help="LoRA rank; 0 (default) trains no adapter")
    _add(lora, "--lora_alpha", type=float, default=16.0)
    _add(lora, "--lora_dropout", type=float, default=0.0)
    _add(
        lora,
        "--lora_target_modules",
        nargs="*",
        default=[],
        help="module names in the decoder layers (default: the attention projections of the LM family)",
    )

    data = parser.add_argument_group("data")
    _add(data, "--laion_shards", help="webdataset shards, e.g. /data/laion/{00000..00999}.tar")
    _add(data, "--mmc4_shards", help="webdataset shards, e.g. /data/mmc4/{00000..00999}.tar")
    _add(data, "--batch_size_laion", type=int, default=128)
    _add(data, "--batch_size_mmc4", type=int, default=128)
    _add(data, "--train_num_samples_laion", type=int, default=10000)
    _add(data, "--train_num_samples_mmc4", type=int, default=10000)
    _add(data, "--dataset_resampled", action="store_true")
    _add(data, "--workers", type=int, default=1)
    _add(data, "--mmc4_textsim_threshold", type=float, default=0.24)
    _add(data, "--mmc4_max_num_images", type=int, default=6)
    _add(data, "--mmc4_min_num_images", type=int, default=1)
    _add(
        data,
        "--mmc4_image_order",
        default="document",
        choices=["document", "text"],
        help="MMC4 images in document order (the original) or each at its matched sentence (docs/training_data.md)",
    )
    _add(data, "--no_flip", action="store_true", help="no random horizontal flips (the original always flips)")
    _add(
        data,
        "--max_image_pixels",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="skip (and count) training images declaring more pixels, read from the header before decoding "
        "(default: %(default)s; the original allows 1e9)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors exit through `parser.error` (one `error: ...` line, status 2)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in _MOVED_FLAGS:
            parser.error(f"{flag} is set in the accelerate config here: {_MOVED_FLAGS[flag]} (see docs/training.md)")
    args = parser.parse_args(argv)
    if args.report_to_wandb and "wandb" not in args.report_to:
        args.report_to.append("wandb")
    if args.save_checkpoints_to_wandb and "wandb" not in args.report_to:
        parser.error("--save_checkpoints_to_wandb needs --report_to_wandb (or --report_to wandb)")
    args.vision_encoder_path = _vision_encoder(parser, args.vision_encoder_path, args.vision_encoder_pretrained)
    if (args.model is None) == (not args.init_from):
        parser.error("give exactly one of --model and --init_from")
    if args.init_from and not args.lm_path:
        parser.error("--init_from needs --lm_path (and --vision_encoder_path, --tokenizer_path)")
    if not args.laion_shards and not args.mmc4_shards:
        parser.error("no training data: give --laion_shards and/or --mmc4_shards")
    for name in ("batch_size_laion", "batch_size_mmc4", "gradient_accumulation_steps", "num_epochs", "workers"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'workers' else 1}; got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be >= 1; got {args.max_steps}")
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        parser.error(f"--checkpointing_steps must be >= 1; got {args.checkpointing_steps}")
    if args.max_consecutive_skipped_steps < 0:
        parser.error(f"--max_consecutive_skipped_steps must be >= 0; got {args.max_consecutive_skipped_steps}")
    if args.lora_r < 0:
        parser.error(f"--lora_r must be >= 0; got {args.lora_r}")
    if args.lora_r:
        try:
            __import__("peft")
        except ImportError:
            parser.error("--lora_r needs the peft package: pip install 'openflamingo-transformers[train]'")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0; got {args.warmup_steps}")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be > 0; got {args.learning_rate}")
    if args.resume_from_checkpoint is not None and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder")
    for tracker in args.report_to:
        try:
            __import__("wandb" if tracker == "wandb" else "tensorboard")
        except ImportError:
            parser.error(f"--report_to {tracker}: the {tracker} package is not installed")
    return args


def _vision_encoder(parser: argparse.ArgumentParser, path: str, pretrained: str | None) -> str:
    """The transformers tower to load for `--vision_encoder_path` and the original's `--vision_encoder_pretrained`."""
    open_clip_names = {name for name, _ in _OPEN_CLIP_VISION_ENCODERS}
    if path in open_clip_names:
        tag = pretrained or _OPEN_CLIP_DEFAULT_PRETRAINED
        if (path, tag) not in _OPEN_CLIP_VISION_ENCODERS:
            known = ", ".join(f"{n} {t} (= {hf})" for (n, t), hf in _OPEN_CLIP_VISION_ENCODERS.items())
            parser.error(
                f"--vision_encoder_path {path} --vision_encoder_pretrained {tag}: no transformers CLIP with these "
                f"open_clip weights is known here ({known}); give an HF CLIP folder or hub id as --vision_encoder_path"
            )
        return _OPEN_CLIP_VISION_ENCODERS[path, tag]
    if pretrained not in (None, _OPEN_CLIP_DEFAULT_PRETRAINED):
        parser.error(
            f"--vision_encoder_pretrained {pretrained} names open_clip weights, but --vision_encoder_path {path} is a "
            "transformers tower, which brings its own: give the folder or hub id of the weights you want"
        )
    return path


def data_loader_factory(args: argparse.Namespace, processor, rank: int, world_size: int):
    """epoch -> {"laion": loader, "mmc4": loader} from `modeling_flamingo.training.data.build_train_loaders`."""
    from modeling_flamingo.training.data import build_train_loaders

    def factory(epoch: int):
        return build_train_loaders(
            args, processor.tokenizer, processor.image_processor, epoch=epoch, rank=rank, world_size=world_size
        )

    return factory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.offline:
        # As the original: no hub access, and a W&B run kept on disk (`wandb sync` uploads it later).
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["WANDB_MODE"] = "offline"
    if args.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
    if args.wandb_entity:
        os.environ.setdefault("WANDB_ENTITY", args.wandb_entity)

    from modeling_flamingo.convert.sources import ConversionError
    from modeling_flamingo.training.model_init import build_fresh_flamingo, load_flamingo
    from modeling_flamingo.training.trainer import FlamingoTrainer, TrainingDivergedError, seed_everything

    try:
        FlamingoTrainer.check_run(args)  # the run folder and the resume, before the model is loaded
        seed_everything(args.seed)  # the same initial weights on every process, as the original
        if args.init_from:
            model, processor = build_fresh_flamingo(
                args.vision_encoder_path,
                args.lm_path,
                args.tokenizer_path or args.lm_path,
                args.cross_attn_every_n_layers,
                revision=args.revision,
            )
        else:
            model, processor = load_flamingo(args.model, revision=args.revision)
        trainer_accelerator = FlamingoTrainer._build_accelerator(args)
        seed_everything(args.seed, trainer_accelerator.process_index)
        factory = data_loader_factory(
            args, processor, trainer_accelerator.process_index, trainer_accelerator.num_processes
        )
        trainer = FlamingoTrainer(args, model, processor, factory, accelerator=trainer_accelerator)
        trainer.train()
    except (ValueError, OSError, ConversionError, TrainingDivergedError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


__all__ = ["CONFIGS_DIR", "build_parser", "data_loader_factory", "main", "parse_args"]
