"""Non-finite training: steps skipped for a NaN/inf loss `--max_consecutive_skipped_steps` times in a row stop the run
with an error (one line and a non-zero exit from the command line), a step that moves the weights starts the count
again, and no export writes NaN or inf weights: the converter's check refuses them, naming the first bad tensor, and
leaves the previous export as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from train_data_helpers import make_laion_shards

from modeling_flamingo.convert.writer import NonFiniteWeightsError
from modeling_flamingo.training import FlamingoTrainer
from modeling_flamingo.training.export import (
    original_checkpoint_state_dict,
    save_original_checkpoint,
    save_pretrained_folder,
)
from modeling_flamingo.training.trainer import TrainingDivergedError

from train_helpers import batches, fresh_accelerate_state, loader_factory, tiny_model, tiny_processor, train_args


def _overflowing(batch: dict) -> dict:
    # Finite pixels (the model refuses NaN in an attended image) that overflow inside the vision tower: the loss of
    # the step is non-finite and the step is skipped (as in test_train_loop).
    return dict(batch, pixel_values=torch.full_like(batch["pixel_values"], 1e38))


@pytest.mark.parametrize(("bad", "stop"), [([1, 3], None), ([1, 2], 3)], ids=["apart", "in_a_row"])
def test_skipped_steps_in_a_row_stop_the_run(tmp_path, bad, stop):
    model, tokenizer = tiny_model()
    laion, mmc4 = batches(tokenizer, 5)
    for i in bad:  # micro-batch i is step i + 1
        mmc4[i] = _overflowing(mmc4[i])
    run = tmp_path / "run"
    args = train_args(
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=0,
        checkpointing_steps=1 if stop else None,  # the stopping run: a checkpoint saved during the streak
        max_consecutive_skipped_steps=2,
        run_name=str(run),
    )
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(laion, mmc4))
        if stop is None:
            trainer.train()
        else:
            with pytest.raises(TrainingDivergedError) as caught:
                trainer.train()
    state = trainer.state
    if stop is None:  # two skipped steps, never two in a row: the run ends normally
        assert (state.global_step, state.skipped_steps, state.consecutive_skipped_steps) == (5, 2, 0)
        return
    assert (state.global_step, state.skipped_steps, state.consecutive_skipped_steps) == (stop, 2, 2)
    message = str(caught.value)
    assert message.startswith(
        "training stopped at step 3: steps 2 to 3 were all skipped because a loss or the gradient"
    )
    assert "the weights of step 1" in message and "--max_consecutive_skipped_steps 2 set this limit" in message
    # Nothing saved at the step that stopped the run; the streak is in the state saved during it.
    assert message.endswith("start again in a new --run_name (--max_consecutive_skipped_steps 2 set this limit)")
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt", "checkpoint_1", "checkpoint_2", "model", "training_run.json",
    ]  # fmt: skip
    saved = json.loads((run / "checkpoint_2" / "trainer_state.json").read_text())
    assert saved["consecutive_skipped_steps"] == 1 and saved["skipped_steps"] == 1


def test_cli_stops_a_diverging_run_with_an_error(tmp_path):
    """`--learning_rate 1e30`: the first step sends the weights to ~1e30, every later loss is NaN. The default limit
    (10 skipped steps in a row) stops the run: exit status 1 and one error line, no traceback."""
    model, tokenizer = tiny_model()
    processor = tiny_processor(tokenizer)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    laion = make_laion_shards(tmp_path / "laion", num_shards=2, samples_per_shard=3)
    run = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "modeling_flamingo.training", "--model", str(tmp_path / "model"),
        "--laion_shards", laion, "--run_name", str(run), "--batch_size_laion", "2", "--train_num_samples_laion", "4",
        "--workers", "0", "--warmup_steps", "0", "--learning_rate", "1e30", "--logging_steps", "0", "--max_steps", "14",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("error: training stopped at step 11: steps 2 to 11 were all skipped")
    assert "lower --learning_rate (now 1e+30)" in errors[0]
    assert "Training done" not in result.stdout
    # Two-step epochs: checkpoints at the ends of epochs 0 to 4 (steps 2 to 10), none at the stop (step 11).
    assert sorted(int(p.name.split("_")[1]) for p in run.glob("checkpoint_*")) == [2, 4, 6, 8, 10]


def _first_non_finite(state: dict[str, torch.Tensor]) -> str:
    return next(name for name, tensor in state.items() if not torch.isfinite(tensor).all())


def test_exports_refuse_non_finite_weights_and_keep_the_previous_export(tmp_path):
    model, tokenizer = tiny_model()
    processor = tiny_processor(tokenizer)
    checkpoint, folder = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "model"
    save_original_checkpoint(model, checkpoint)
    save_pretrained_folder(model, processor, folder)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    with torch.no_grad():  # an inf early in the state dict, NaN in two later tensors
        model.perceiver.layers[0].attention.to_q.weight[1, 2] = float("inf")
        model.gated_cross_attn_layers[1].attn.to_q.weight[0, 0] = float("nan")
        model.gated_cross_attn_layers[1].ff_gate.fill_(float("nan"))

    with pytest.raises(NonFiniteWeightsError) as caught:
        save_original_checkpoint(model, checkpoint)
    first = _first_non_finite(original_checkpoint_state_dict(model))
    assert first == "perceiver.layers.0.0.to_q.weight"  # the original's name for it
    assert str(caught.value).startswith(f"{first} holds non-finite values (1 inf): corrupt or diverged weights?")
    assert f"{checkpoint} not written" in str(caught.value)

    with pytest.raises(NonFiniteWeightsError) as caught:
        save_pretrained_folder(model, processor, folder, state_dict=model.state_dict())
    first = _first_non_finite(model.state_dict())
    assert first == "perceiver.layers.0.attention.to_q.weight"
    assert str(caught.value).startswith(f"{first} holds non-finite values (1 inf)")

    # Nothing written, nothing left behind: the previous exports byte for byte.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
