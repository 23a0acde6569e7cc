"""Training `--precision fp16` on the CPU, and the step-skip logic on a non-finite gradient norm under each precision.

What Accelerate does on the CPU: `--precision amp_bf16` is bf16 autocast (compared with the original's
`train_one_epoch` under the same autocast in tests/test_train_flags_parity.py). For fp16 (`fp16`, the original's
`amp`) Accelerate builds its GradScaler and turns on autocast only off the CPU (`Accelerator.__init__`: fp16 is native
AMP only when `device.type != "cpu"`, although torch has `GradScaler("cpu")` and fp16 CPU autocast): the run would
silently train in fp32, so it is refused with one error line. fp16 numerics and the scaler's own overflow skipping
need a GPU.

The skip logic does not depend on the precision: a finite loss whose gradient norm is not finite (an inf injected
into one gradient by a tensor hook) skips the optimiser step and counts it, leaves every weight where it was, the next
finite step moves them again, and `--max_consecutive_skipped_steps` such steps in a row stop the run.
"""

from __future__ import annotations

import math

import pytest
import torch

from modeling_flamingo.training import FlamingoTrainer
from modeling_flamingo.training.cli import main
from modeling_flamingo.training.trainer import TrainingDivergedError

from train_helpers import batches, fresh_accelerate_state, loader_factory, tiny_model, tiny_processor, train_args


def _inf_gradient(model, active: list[bool]):
    """A hook turning the gradient of the first cross-attention gate into inf while `active[0]`: the loss stays
    finite, the gradient norm does not."""
    gate = model.gated_cross_attn_layers[0].attn_gate
    return gate.register_hook(lambda grad: torch.full_like(grad, math.inf) if active[0] else grad)


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_fp16_on_the_cpu_is_refused_in_one_line(precision, tmp_path, capsys):
    """Through the CLI: one `error:` line naming the flag and what to use, before any run folder is written."""
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "model")
    tiny_processor(tokenizer).save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    argv = ["--model", str(tmp_path / "model"), "--laion_shards", str(tmp_path / "none.tar"), "--precision", precision]
    with fresh_accelerate_state():
        assert main([*argv, "--run_name", str(run)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: --precision {precision} needs a GPU: on the CPU Accelerate runs neither fp16 autocast nor a gradient "
        "scaler, so the run would train in fp32; use --precision amp_bf16 (bf16 autocast) or fp32"
    ]
    assert not run.exists()


def test_a_nonfinite_gradient_norm_skips_the_step_and_the_next_finite_one_moves_the_weights(tmp_path):
    model, tokenizer = tiny_model()
    laion, mmc4 = batches(tokenizer, 3)
    args = train_args(
        learning_rate=1e-3, warmup_steps=0, logging_steps=0, precision="amp_bf16", run_name=str(tmp_path)
    )
    active = [False]
    _inf_gradient(model, active)
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(laion, mmc4))
        assert trainer.accelerator.mixed_precision == "bf16"
        trainer.forward_backward({"laion": laion[0], "mmc4": mmc4[0]}, sync=True)
        assert trainer.optimizer_step()

        active[0] = True
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = trainer.forward_backward({"laion": laion[1], "mmc4": mmc4[1]}, sync=True)
        assert all(math.isfinite(v) for v in losses.values())  # the loss is finite: the norm decides
        assert not trainer.optimizer_step()
        assert (trainer.state.skipped_steps, trainer.state.consecutive_skipped_steps) == (1, 1)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]), name
        assert all(p.grad is None for p in model.parameters())  # the bad gradients are dropped

        active[0] = False
        trainer.forward_backward({"laion": laion[2], "mmc4": mmc4[2]}, sync=True)
        assert trainer.optimizer_step()
        assert (trainer.state.skipped_steps, trainer.state.consecutive_skipped_steps) == (1, 0)
        gate = model.gated_cross_attn_layers[0].attn_gate
        assert not torch.equal(gate, before[next(n for n, p in model.named_parameters() if p is gate)])


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_nonfinite_gradient_norms_in_a_row_stop_the_run(precision, tmp_path):
    model, tokenizer = tiny_model()
    laion, mmc4 = batches(tokenizer, 4)
    _inf_gradient(model, [True])
    args = train_args(
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=0,
        precision=precision,
        max_consecutive_skipped_steps=2,
        run_name=str(tmp_path / "run"),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(laion, mmc4))
        with pytest.raises(TrainingDivergedError, match="--max_consecutive_skipped_steps 2"):
            trainer.train()
    state = trainer.state
    assert (state.global_step, state.skipped_steps, state.consecutive_skipped_steps) == (2, 2, 2)
    params = dict(model.named_parameters())
    for name, value in before.items():  # (the trainer adds the rows of the Flamingo tokens as a parameter)
        assert torch.equal(params[name], value), name
