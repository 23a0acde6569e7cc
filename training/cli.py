"""Command line of the training loop: `accelerate launch -m modeling_flamingo.training ...` (or `python -m`, or the
`openflamingo-train` console script).

Every flag of the original `open_flamingo/train/train.py` keeps its name and meaning and is accepted with `_` or `-`,
but its distribution flags (`_MOVED_FLAGS`): distribution (DDP, FSDP, DeepSpeed, hybrid sharding) comes from the
accelerate config (`accelerate launch --config_file training/configs/...`); see docs/training.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from modeling_flamingo.arguments import EXIT_FAILURE, EXIT_OK, FlamingoArgumentParser
from modeling_flamingo.training.arguments import ARGUMENT_GROUPS, TrainingArguments

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


def build_parser() -> FlamingoArgumentParser:
    """The parser of the `ARGUMENT_GROUPS` (`parse(argv)` returns one instance of each, unchecked)."""
    return FlamingoArgumentParser(
        ARGUMENT_GROUPS,
        prog="openflamingo-train",
        description="Train OpenFlamingo's resampler and gated cross-attention (the original recipe) on Accelerate.",
    )


def parse_args(argv: list[str] | None = None) -> TrainingArguments:
    """Parse and check the command line; errors exit through `parser.error` (one `error: ...` line, status 2)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in _MOVED_FLAGS:
            parser.error(f"{flag} is set in the accelerate config here: {_MOVED_FLAGS[flag]} (see docs/training.md)")
    args = TrainingArguments.from_groups(*parser.parse(argv))
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
    for name, value, least in (
        ("batch_size_laion", args.batch_size_laion, 1),
        ("batch_size_mmc4", args.batch_size_mmc4, 1),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps, 1),
        ("num_epochs", args.num_epochs, 1),
        ("workers", args.workers, 0),
    ):
        if value < least:
            parser.error(f"--{name} must be >= {least}; got {value}")
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


def _vision_encoder(parser: FlamingoArgumentParser, path: str, pretrained: str | None) -> str:
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


def data_loader_factory(args: TrainingArguments, processor, rank: int, world_size: int):
    """epoch -> {"laion": loader, "mmc4": loader} from `modeling_flamingo.training.data.build_train_loaders`, given
    the data flags and the seed (`TrainingArguments.data_loader_arguments`)."""
    from modeling_flamingo.training.data import build_train_loaders

    data_args = args.data_loader_arguments()

    def factory(epoch: int):
        return build_train_loaders(
            data_args, processor.tokenizer, processor.image_processor, epoch=epoch, rank=rank, world_size=world_size
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
        return EXIT_FAILURE
    return EXIT_OK


__all__ = ["CONFIGS_DIR", "build_parser", "data_loader_factory", "main", "parse_args"]
