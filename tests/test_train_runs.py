"""Run folders a researcher can trust: `--delete_previous_checkpoint` deletes only this run's own previous
checkpoint, a resume never mixes lineages, flags or models, folders not written by a training run are never written
into, and a full disk, a corrupt checkpoint file or a data position past the data end the run with one line."""

from __future__ import annotations

import pytest

from modeling_flamingo.training import FlamingoTrainer

from train_helpers import batches, fresh_accelerate_state, loader_factory, scramble_trainable, tiny_model, train_args


def make_trainer(model, data, **overrides) -> FlamingoTrainer:
    """A trainer with the flags of tests/test_train_loop.py (`overrides` on top), in a fresh Accelerate state."""
    args = train_args(
        learning_rate=1e-2, warmup_steps=1, lr_scheduler="linear", logging_steps=0, loss_multiplier_laion=0.2
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return FlamingoTrainer(args, model, None, loader_factory(*data))


def run(model, data, **overrides) -> FlamingoTrainer:
    with fresh_accelerate_state():
        trainer = make_trainer(model, data, **overrides)
        trainer.train()
    return trainer


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Crash(Exception):
    """Stands for a run killed right after one of its checkpoints was saved."""


def crash_after_first_save(monkeypatch) -> None:
    save = FlamingoTrainer.save_checkpoint

    def save_then_crash(self):
        path = save(self)
        raise Crash(path.name)

    monkeypatch.setattr(FlamingoTrainer, "save_checkpoint", save_then_crash)


@pytest.fixture
def four_checkpoints(tmp_path):
    """A finished 4-step run with a checkpoint after every step, and the batches it trained on."""
    model, tokenizer = tiny_model()
    data = batches(tokenizer, 4)
    run(model, data, run_name=str(tmp_path / "run"), checkpointing_steps=1)
    return tmp_path / "run", data


def test_delete_previous_checkpoint_deletes_only_the_checkpoint_this_run_resumed_from(four_checkpoints, monkeypatch):
    run_dir, data = four_checkpoints
    assert [n for n in names(run_dir) if n.startswith("checkpoint_")] == [f"checkpoint_{i}" for i in range(1, 5)]
    model, _ = tiny_model()
    scramble_trainable(model)
    crash_after_first_save(monkeypatch)
    with pytest.raises(Crash, match="checkpoint_2"):
        run(model, data, run_name=str(run_dir), resume_from_checkpoint=str(run_dir / "checkpoint_1"),
            checkpointing_steps=1, delete_previous_checkpoint=True)  # fmt: skip
    # The resumed lineage replaced checkpoint_2 and deleted checkpoint_1, the one it came from; the old lineage's
    # checkpoint_4 (the highest step) is not this run's to delete.
    assert [n for n in names(run_dir) if n.startswith("checkpoint_")] == [
        "checkpoint_2",
        "checkpoint_3",
        "checkpoint_4",
    ]
