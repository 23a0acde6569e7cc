"""Shared pieces of the training-loop tests: command-line defaults, tiny batches built with our tokenizer, in-memory
loaders with the data helper's interface, and a fresh Accelerate state per test."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor
from modeling_flamingo.testing import add_flamingo_tokens, make_tiny_tokenizer, tiny_flamingo_config
from modeling_flamingo.training import mask_flamingo_labels
from modeling_flamingo.training.arguments import TrainingArguments
from modeling_flamingo.training.cli import build_parser

LAION_TEXTS = [
    "<image>An image of two cats sleeping on a couch.<|endofchunk|><|endoftext|>",
    "<image>A dog runs.<|endofchunk|><|endoftext|>",
    "<image>A sink in a small bathroom.<|endofchunk|><|endoftext|>",
    "<image>Two people playing tennis.<|endofchunk|><|endoftext|>",
]
# Text before the first image and between a chunk's end and the next image carries no loss (original MMC4 masking).
MMC4_TEXTS = [
    "The quick brown fox. <image>A man riding a wave.<|endofchunk|>Then <image>A plate of food.<|endofchunk|>",
    "<image>Two cats on a couch.<|endofchunk|><|endoftext|>",
    "A red ball. <image>A dog runs after a red ball in the park.<|endofchunk|><|endoftext|>",
    "<image>A sink.<|endofchunk|> a mirror <image>A bus, yellow.<|endofchunk|><|endoftext|>",
]


def train_args(**overrides) -> TrainingArguments:
    """The command line's defaults (original names) with `overrides`, without the data/model checks."""
    groups = build_parser().parse(["--model", "unused", "--laion_shards", "unused"])
    return dataclasses.replace(TrainingArguments.from_groups(*groups), **{"report_to": [], **overrides})


# The released recipes' per-dataset loss multipliers (LAION x 0.2, MMC4 x 1.0).
MULTIPLIERS = {"laion": 0.2, "mmc4": 1.0}


def original_train_args(logging_steps: int = 100) -> argparse.Namespace:
    """The arguments the original's `train_utils.train_one_epoch` reads, for one fp32 process without FSDP."""
    return argparse.Namespace(
        gradient_accumulation_steps=1,
        loss_multiplier_laion=MULTIPLIERS["laion"],
        loss_multiplier_mmc4=MULTIPLIERS["mmc4"],
        freeze_lm_embeddings=False,
        fsdp=False,
        fsdp_use_orig_params=False,
        num_epochs=1,
        precision="fp32",
        rank=0,
        logging_steps=logging_steps,
        report_to_wandb=False,
    )


def make_batch(tokenizer, texts: list[str], num_images: int, interleaved: bool, seed: int, size: int = 42) -> dict:
    """A right-padded batch in the data helper's format: pixel_values (B, T_img, 1, 3, H, W), ids, mask, labels."""
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding="longest")
    media = tokenizer.encode("<image>")[-1]
    eoc = tokenizer.encode("<|endofchunk|>")[-1]
    labels = mask_flamingo_labels(enc.input_ids, tokenizer.pad_token_id, media, eoc, interleaved=interleaved)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(texts), num_images, 1, 3, size, size, generator=gen)
    counts = (enc.input_ids == media).sum(1)
    for b, n in enumerate(counts.tolist()):
        pixels[b, n:] = 0  # padding images, as the data helper pads them
    return {
        "pixel_values": pixels,
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "labels": labels,
    }


class ListLoader:
    """The data helper's `TrainLoader` interface over a list of batches."""

    def __init__(self, batches: list[dict]):
        self.dataloader = batches
        self.num_batches = len(batches)
        self.num_samples = sum(int(b["input_ids"].shape[0]) for b in batches)


def loader_factory(laion: list[dict], mmc4: list[dict]):
    """epoch -> {"laion", "mmc4"} loaders over the same batches every epoch."""
    return lambda epoch: {"laion": ListLoader(laion), "mmc4": ListLoader(mmc4)}


@contextlib.contextmanager
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: reset them around a test that builds an Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def tiny_model(seed: int = 0, family: str = "mosaic_gpt") -> tuple[FlamingoForConditionalGeneration, object]:
    """A tiny Flamingo of `family` with open gates, and its tokenizer (with the Flamingo tokens)."""
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer(bos_token="<s>" if family == "llama" else None))
    torch.manual_seed(seed)
    model = FlamingoForConditionalGeneration(tiny_flamingo_config(family, tokenizer))
    with torch.no_grad():  # open the gates so the cross-attention shapes the loss
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model, tokenizer


def tiny_processor(tokenizer) -> FlamingoProcessor:
    """The processor of `tiny_model`'s tokenizer, with 42 px images (the size `make_batch` and the shards use)."""
    return FlamingoProcessor(image_processor=FlamingoImageProcessor(size=42, crop_size=42), tokenizer=tokenizer)


def scramble_trainable(model: FlamingoForConditionalGeneration, seed: int = 1) -> None:
    """Change every weight the trainer trains (resampler, cross-attention, input embeddings), the same way on every
    process, so that a resumed run must take them all from its checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [model.perceiver, *model.gated_cross_attn_layers, model.get_input_embeddings()]:
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def batches(tokenizer, n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    laion = [make_batch(tokenizer, LAION_TEXTS[i % 4 : i % 4 + 2], 1, False, seed + i) for i in range(n)]
    mmc4 = [make_batch(tokenizer, MMC4_TEXTS[i % 4 : i % 4 + 2], 2, True, seed + 100 + i) for i in range(n)]
    return laion, mmc4


def shard_batches(tokenizer, steps: int, shards: int, seed: int = 0) -> list[list[tuple[dict, dict]]]:
    """`[step][shard] -> (laion batch, mmc4 batch)`, two samples each: the global batch of a step split in shards."""
    out = []
    for step in range(steps):
        row = []
        for shard in range(shards):
            i = step * shards + shard
            laion = make_batch(tokenizer, [LAION_TEXTS[i % 4], LAION_TEXTS[(i + 1) % 4]], 1, False, seed + i)
            mmc4 = make_batch(tokenizer, [MMC4_TEXTS[i % 4], MMC4_TEXTS[(i + 2) % 4]], 2, True, seed + 100 + i)
            row.append((laion, mmc4))
        out.append(row)
    return out


def offline_wandb_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a training CLI subprocess on the CPU, offline, whose W&B files all go under `tmp_path`
    (`wandb_dir/` is the run's `WANDB_DIR`). None of the caller's `WANDB_*` variables, and no `WANDB_MODE`: the
    original's `--offline` must set it."""
    private = tmp_path / "private"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        ACCELERATE_USE_CPU="true",
        HF_HUB_OFFLINE="1",
        WANDB_DIR=str(tmp_path / "wandb_dir"),
        WANDB_CACHE_DIR=str(private / "cache"),
        WANDB_CONFIG_DIR=str(private / "config"),
        WANDB_DATA_DIR=str(private / "data"),
        XDG_CACHE_HOME=str(private / "xdg_cache"),
        XDG_CONFIG_HOME=str(private / "xdg_config"),
    )
    (tmp_path / "wandb_dir").mkdir()
    return env
