"""Worker of tests/test_train_fsdp.py: the real `FlamingoTrainer` loop under Accelerate's FSDP2 on CPU processes.

    ACCELERATE_USE_CPU=true accelerate launch --config_file training/configs/fsdp_full.yaml --num_processes 2 \
        tests/train_fsdp_worker.py OUT_DIR full
    ACCELERATE_USE_CPU=true accelerate launch --config_file training/configs/fsdp_hybrid.yaml --num_machines 1 \
        --num_processes 4 --parallelism_config_dp_replicate_size 2 --parallelism_config_dp_shard_size 2 \
        tests/train_fsdp_worker.py OUT_DIR hybrid
    python tests/train_fsdp_worker.py OUT_DIR single       (the 1-process references, no FSDP; also single_hybrid)

Every run trains a tiny model for `STEPS` optimiser steps on a fixed global batch per step, split in shards: under FSDP
each rank takes its shard, in one process the shards are accumulated (the same global batch).

Accelerate 1.15 turns `distributed_type: FSDP` into FSDP only on GPU-like backends: on the CPU (`ACCELERATE_USE_CPU`,
gloo) `AcceleratorState` stays `MULTI_CPU` and drops the FSDP plugin it was given (the MULTI_CPU branch of
`AcceleratorState.__init__` never reads `ACCELERATE_USE_FSDP`), and `Accelerator()` then refuses a parallelism config
(hybrid sharding) for MULTI_CPU. torch's FSDP2 (`fully_shard`, DTensor over gloo) runs on the CPU, so
`prime_cpu_fsdp_state` builds the process-wide `AcceleratorState` first, from the launcher's configuration as
`Accelerator()` would, and sets the two fields Accelerate sets on a GPU; the `Accelerator` the trainer builds then
takes that state. The rest (wrapping, the device mesh, sharded checkpoints, gathering the state dict) is Accelerate's
own FSDP2 code. The library never does this.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accelerate.parallelism_config import ParallelismConfig  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin  # noqa: E402

from modeling_flamingo.training import FlamingoTrainer  # noqa: E402

from train_helpers import (  # noqa: E402
    ListLoader,
    fresh_accelerate_state,
    scramble_trainable,
    shard_batches,
    tiny_model,
    train_args,
)

STEPS = 4
NAN_STEP = 2  # 1-based step whose MMC4 shard 1 (rank 1 only, under FSDP) overflows to a non-finite loss


def prime_cpu_fsdp_state(mixed_precision: str = "no") -> None:
    """Build the `AcceleratorState` of a CPU process launched with an FSDP config so that the next `Accelerator()`
    takes its FSDP path (see the module docstring). Fails if Accelerate already does this, so the shim is noticed once
    it is no longer needed. Call inside a fresh Accelerate state."""
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with an FSDP accelerate config"
    # What `Accelerator()` builds from the launcher's FSDP_* and PARALLELISM_CONFIG_* variables.
    plugin = FullyShardedDataParallelPlugin()
    use_parallelism = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false") == "true"
    state = AcceleratorState(
        mixed_precision=mixed_precision,
        fsdp_plugin=plugin,
        parallelism_config=ParallelismConfig() if use_parallelism else None,
        dynamo_plugin=TorchDynamoPlugin(),
        _from_accelerator=True,
    )
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def global_batches(tokenizer, shards: int, nan: bool) -> list[list[tuple[dict, dict]]]:
    """`[step][shard] -> (laion, mmc4)`; with `nan`, shard 1's MMC4 batch of `NAN_STEP` overflows in the vision tower
    (finite pixel values of 1e38, as a low-precision overflow would)."""
    data = shard_batches(tokenizer, STEPS, shards)
    if nan:
        laion, mmc4 = data[NAN_STEP - 1][1]
        data[NAN_STEP - 1][1] = (laion, dict(mmc4, pixel_values=torch.full_like(mmc4["pixel_values"], 1e38)))
    return data


def train(
    run_dir: Path, family: str, shards: int, *, nan: bool = False, resume_from: Path | None = None
) -> FlamingoTrainer:
    """One training run of `STEPS` steps (checkpoint and export every 2 steps) on this process's share of the data;
    what it did is written to `reports/<run name>.rank<rank>.json` beside the run folder."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model, tokenizer = tiny_model(family=family)
    data = global_batches(tokenizer, shards, nan)
    if world == 1:
        pairs = [pair for row in data for pair in row]
    else:
        assert world == shards, (world, shards)
        pairs = [row[rank] for row in data]
    laion = ListLoader([p[0] for p in pairs])
    mmc4 = ListLoader([p[1] for p in pairs])
    args = train_args(
        run_name=str(run_dir),
        learning_rate=1e-2,
        warmup_steps=1,
        lr_scheduler="linear",
        gradient_accumulation_steps=shards if world == 1 else 1,
        checkpointing_steps=2,
        logging_steps=1,
        loss_multiplier_laion=0.2,
        resume_from_checkpoint=str(resume_from) if resume_from is not None else None,
    )
    with fresh_accelerate_state():
        if world > 1:
            prime_cpu_fsdp_state()
        accelerator = FlamingoTrainer._build_accelerator(args)
        if world > 1:
            assert accelerator.is_fsdp2
            # One process group for all the runs of a launch: `end_training` would destroy it, and creating a gloo group
            # again in the same processes hangs now and then. `main` destroys it after the last run.
            accelerator.end_training = lambda: None
        if resume_from is not None:
            scramble_trainable(model)
        trainer = FlamingoTrainer(args, model, None, lambda epoch: {"laion": laion, "mmc4": mmc4}, accelerator)
        trainer.train()
        # how the resampler's parameters are laid out over the device mesh (FSDP2 DTensors)
        placements = [repr(p) for p in next(trainer.model.perceiver.parameters()).placements] if world > 1 else []
        report = {
            "rank": rank,
            "placements": placements,
            "world": world,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "fsdp2": bool(trainer.accelerator.is_fsdp2) if world > 1 else False,
            "global_step": trainer.state.global_step,
            "skipped_steps": trainer.state.skipped_steps,
        }
    reports = run_dir.parent / "reports"
    reports.mkdir(exist_ok=True)
    (reports / f"{run_dir.name}.rank{rank}.json").write_text(json.dumps(report))
    return trainer


# name -> (family, shards of the global batch, nan, resumed from (run name, checkpoint folder))
RUNS = {
    "mosaic_gpt": ("mosaic_gpt", 2, False, None),
    "mosaic_gpt_resumed": ("mosaic_gpt", 2, False, ("mosaic_gpt", "checkpoint_2")),
    "gpt_neox": ("gpt_neox", 2, False, None),
    "mosaic_gpt_nan": ("mosaic_gpt", 2, True, None),
    "mosaic_gpt_4": ("mosaic_gpt", 4, False, None),
    # Newer families, tied heads: Qwen2's rows trained through TrainableTokenRows, Gemma2's scaled embedding densely.
    "qwen2": ("qwen2", 2, False, None),
    "gemma2": ("gemma2", 2, False, None),
}
# What each launch of the test runs, in order (a resumed run after the run it resumes).
PLANS = {
    "full": ["mosaic_gpt", "mosaic_gpt_resumed", "gpt_neox", "mosaic_gpt_nan", "qwen2", "gemma2"],
    "single": ["mosaic_gpt", "gpt_neox", "mosaic_gpt_nan", "qwen2", "gemma2"],
    "hybrid": ["mosaic_gpt_4"],
    "single_hybrid": ["mosaic_gpt_4"],
}


def main(argv: list[str]) -> int:
    out, plan = Path(argv[0]), argv[1]
    for name in PLANS[plan]:
        family, shards, nan, resume = RUNS[name]
        resume_from = out / resume[0] / resume[1] if resume else None
        train(out / name, family, shards, nan=nan, resume_from=resume_from)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
