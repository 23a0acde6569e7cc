"""Worker of tests/test_train_distributed.py and test_train_deepspeed.py: trains the tiny model for a few steps on a
fixed global batch per step, one of which has a non-finite loss on one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_dist_worker.py RUN_DIR   (DDP)
    python tests/train_dist_worker.py RUN_DIR                                                          (1 process)
    ... RUN_DIR CHECKPOINT   (resume from CHECKPOINT, with every trainable weight changed first: all must come back)

With N processes each rank trains on its shard of every step's global batch; in one process the shards are
accumulated (`gradient_accumulation_steps` = number of shards), which is the same global batch.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from modeling_flamingo.training import FlamingoTrainer  # noqa: E402

from train_helpers import ListLoader, scramble_trainable, shard_batches, tiny_model, train_args  # noqa: E402

STEPS = 4
SHARDS = 2
# At this step the last shard's MMC4 batch overflows inside the model (non-finite loss): in N processes on one rank
# only, in one process in one micro-batch; either way the whole step must be skipped, on every process together.
NAN_STEP = 3


def main(argv: list[str]) -> int:
    run_dir = argv[0]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model, tokenizer = tiny_model()
    resume_from = argv[1] if len(argv) > 1 else None
    if resume_from is not None:
        scramble_trainable(model)
    data = shard_batches(tokenizer, STEPS, SHARDS)
    laion_bad, mmc4_bad = data[NAN_STEP - 1][SHARDS - 1]
    data[NAN_STEP - 1][SHARDS - 1] = (
        laion_bad,
        {**mmc4_bad, "pixel_values": torch.full_like(mmc4_bad["pixel_values"], 1e38)},
    )
    if world == 1:
        pairs = [pair for row in data for pair in row]
        accumulation = SHARDS
    else:
        assert world == SHARDS, world
        pairs = [row[rank] for row in data]
        accumulation = 1
    laion = ListLoader([p[0] for p in pairs])
    mmc4 = ListLoader([p[1] for p in pairs])
    args = train_args(
        run_name=run_dir,
        learning_rate=1e-2,
        warmup_steps=1,
        gradient_accumulation_steps=accumulation,
        checkpointing_steps=2,
        logging_steps=1,
        loss_multiplier_laion=0.2,
        resume_from_checkpoint=resume_from,
    )
    trainer = FlamingoTrainer(args, model, None, lambda epoch: {"laion": laion, "mmc4": mmc4})
    trainer.train()
    state = trainer.state
    print(
        f"rank {rank}/{world} {trainer.accelerator.distributed_type} done at step {state.global_step}, skipped {state.skipped_steps}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
