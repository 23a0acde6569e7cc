"""The training loop end to end on a tiny model: resume mid-epoch gives the weights of an uninterrupted run,
checkpoints hold what they should, a non-finite loss skips the step, accumulation equals a bigger batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from modeling_flamingo.training import FlamingoTrainer, find_latest_checkpoint
from modeling_flamingo.training.token_rows import is_token_rows_name

from train_helpers import (
    batches,
    fresh_accelerate_state,
    loader_factory,
    make_batch,
    scramble_trainable,
    tiny_model,
    train_args,
)


def run(model, tokenizer, data, **overrides) -> FlamingoTrainer:
    args = train_args(
        learning_rate=1e-2, warmup_steps=1, lr_scheduler="linear", logging_steps=1, loss_multiplier_laion=0.2
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(*data))
        trainer.train()
    return trainer


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What training changes: the trainable parameters and the input embeddings (the trained rows are copied into
    them after every step; the (2, d) rows parameter itself never appears in a state dict)."""
    embedding = model.get_input_embeddings().weight
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if (p.requires_grad and not is_token_rows_name(n)) or p is embedding
    }


# qwen2: a head tied to the input embedding, stored once (under the embedding's name) and set again on loading.
@pytest.mark.parametrize("family", ["mosaic_gpt", "qwen2"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, family):
    model, tokenizer = tiny_model(family=family)
    data = batches(tokenizer, 4)
    full = run(model, tokenizer, data, run_name=str(tmp_path / "a"), checkpointing_steps=2)
    assert full.state.global_step == 4 and full.state.epoch == 1
    middle = tmp_path / "a" / "checkpoint_2"
    state = json.loads((middle / "trainer_state.json").read_text())
    assert state == {
        "epoch": 0,
        "batches_done": 2,
        "global_step": 2,
        "skipped_steps": 0,
        "last_step_epoch": 0,
        "consecutive_skipped_steps": 0,
    }

    # The checkpoint holds only what changes: trainable parameters (and the embeddings they include).
    with safe_open(str(middle / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(trainable_state(model))

    # The same frozen base, other trainable weights: all of those must come from the checkpoint.
    resumed_model, _ = tiny_model(family=family)
    scramble_trainable(resumed_model)
    resumed = run(resumed_model, tokenizer, data, run_name=str(tmp_path / "b"), resume_from_checkpoint=str(middle))
    assert resumed.state.global_step == 4
    expected, actual = trainable_state(model), trainable_state(resumed_model)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)
    # and the schedule resumed too (linear decay to 0 at the last step)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(full.optimizer.param_groups[0]["lr"])


def test_run_folder_is_resumed_automatically_and_old_checkpoints_deleted(tmp_path):
    model, tokenizer = tiny_model()
    data = batches(tokenizer, 2)
    run(model, tokenizer, data, run_name=str(tmp_path / "run"), checkpointing_steps=1, delete_previous_checkpoint=True)
    folders = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert folders == ["checkpoint.pt", "checkpoint_2", "model", "training_run.json"]
    assert find_latest_checkpoint(tmp_path / "run").name == "checkpoint_2"
    # The original resumes a run folder by itself: a finished run takes no further step.
    again, _ = tiny_model()
    scramble_trainable(again)
    trainer = run(again, tokenizer, data, run_name=str(tmp_path / "run"), num_epochs=1)
    assert trainer.state.global_step == 2
    for name, value in trainable_state(model).items():
        torch.testing.assert_close(trainable_state(again)[name], value, atol=0, rtol=0)


def test_gradient_accumulation_equals_the_mean_of_micro_batches(tmp_path):
    # Two micro-batches of two samples accumulated = one step on the mean of their losses. With equal label
    # counts per sample the mean of means is the mean over the four samples: one batch of four.
    model_a, tokenizer = tiny_model()
    model_b, _ = tiny_model()
    texts = ["<image>A dog runs after a red ball.<|endofchunk|>"] * 2
    laion = [make_batch(tokenizer, texts, 1, False, seed) for seed in range(4)]
    mmc4 = [make_batch(tokenizer, texts, 1, True, 10 + seed) for seed in range(4)]
    big_laion = [_cat(laion[0], laion[1]), _cat(laion[2], laion[3])]
    big_mmc4 = [_cat(mmc4[0], mmc4[1]), _cat(mmc4[2], mmc4[3])]
    assert (big_laion[0]["labels"] != -100).sum(1).unique().numel() == 1  # equal label counts per sample
    run(model_a, tokenizer, (laion, mmc4), run_name=str(tmp_path / "a"), gradient_accumulation_steps=2)
    run(model_b, tokenizer, (big_laion, big_mmc4), run_name=str(tmp_path / "b"))
    for name, value in trainable_state(model_b).items():
        torch.testing.assert_close(trainable_state(model_a)[name], value, atol=1e-5, rtol=0, msg=name)


def _cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def test_non_finite_loss_skips_the_step_and_training_goes_on(tmp_path, capsys):
    model, tokenizer = tiny_model()
    laion, mmc4 = batches(tokenizer, 3)
    # Finite pixel values (the model refuses NaN in an attended image) that overflow inside the vision tower, as an
    # overflow in low precision would: the loss of this step is non-finite.
    mmc4[1] = dict(mmc4[1], pixel_values=torch.full_like(mmc4[1]["pixel_values"], 1e38))
    laion[2] = dict(laion[2], skipped={"decode_error": 2})
    before = trainable_state(model)
    trainer = run(model, tokenizer, (laion, mmc4), run_name=str(tmp_path / "run"))
    assert trainer.state.global_step == 3 and trainer.state.skipped_steps == 1
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, step skipped on every process" in out
    assert "bad samples skipped since the last log: laion/decode_error: 2" in out
    after = trainable_state(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after)


def _one_step_grads(precision: str = "fp32", gradient_checkpointing: bool = False):
    model, tokenizer = tiny_model()
    laion, mmc4 = batches(tokenizer, 1)
    args = train_args(
        learning_rate=1e-3, warmup_steps=0, precision=precision, gradient_checkpointing=gradient_checkpointing
    )
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(laion, mmc4))
        trainer.model.train()
        losses = trainer.forward_backward({"laion": laion[0], "mmc4": mmc4[0]}, sync=True)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert trainer.optimizer_step()
    return losses, grads, model


def test_gradient_checkpointing_gives_the_same_step():
    losses, grads, _ = _one_step_grads()
    losses_gc, grads_gc, model = _one_step_grads(gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert losses_gc == pytest.approx(losses, abs=1e-6)
    assert grads_gc.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_trains_fp32_weights():
    losses, grads, _ = _one_step_grads()
    losses_bf16, grads_bf16, model = _one_step_grads(precision="amp_bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert all(torch.isfinite(g).all() for g in grads_bf16.values())
    assert losses_bf16 == pytest.approx(losses, rel=2e-2)  # bf16 rounding, not a different computation
    assert losses_bf16 != losses
