"""Training `--precision fp16` on the CPU, and the step-skip logic on a non-finite gradient norm under each precision.

What Accelerate does on the CPU: `--precision amp_bf16` is bf16 autocast (compared with the original's
`train_one_epoch` under the same autocast in tests/test_train_flags_parity.py). `--precision fp16` is accepted, but
Accelerate builds its GradScaler and turns on autocast only off the CPU (`Accelerator.__init__`: fp16 is native AMP
only when `device.type != "cpu"`, although torch has `GradScaler("cpu")` and fp16 CPU autocast), so the step is the
fp32 one and nothing is scaled; fp16 numerics and the scaler's own overflow skipping need a GPU.

The skip logic does not depend on either: a finite loss whose gradient norm is not finite (an inf injected into one
gradient by a tensor hook) skips the optimiser step and counts it, leaves every weight where it was, the next finite
step moves them again, and `--max_consecutive_skipped_steps` such steps in a row stop the run.
"""

from __future__ import annotations

import math

import pytest
import torch

from modeling_flamingo.training import FlamingoTrainer
from modeling_flamingo.training.trainer import TrainingDivergedError

from train_helpers import batches, fresh_accelerate_state, loader_factory, tiny_model, train_args


def _inf_gradient(model, active: list[bool]):
    """A hook turning the gradient of the first cross-attention gate into inf while `active[0]`: the loss stays
    finite, the gradient norm does not."""
    gate = model.gated_cross_attn_layers[0].attn_gate
    return gate.register_hook(lambda grad: torch.full_like(grad, math.inf) if active[0] else grad)


def test_fp16_on_the_cpu_is_the_fp32_step_and_a_nonfinite_gradient_norm_skips_it(tmp_path):
    model, tokenizer = tiny_model()
    laion, mmc4 = batches(tokenizer, 3)
    with torch.no_grad():
        fp32_loss = float(model(**laion[0], use_cache=False).loss)
    args = train_args(learning_rate=1e-3, warmup_steps=0, logging_steps=0, precision="fp16", run_name=str(tmp_path))
    outputs = set()
    for module in model.language_model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, a, out: outputs.add(out.dtype))
    active = [False]
    _inf_gradient(model, active)
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(laion, mmc4))
        acc = trainer.accelerator
        assert (acc.mixed_precision, acc.native_amp, acc.scaler) == ("fp16", False, None)

        losses = trainer.forward_backward({"laion": laion[0], "mmc4": mmc4[0]}, sync=True)
        assert trainer.optimizer_step()
        assert losses["laion"] == pytest.approx(fp32_loss, abs=1e-6)  # no autocast: the fp32 loss
        assert outputs == {torch.float32}

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


@pytest.mark.parametrize("precision", ["amp_bf16", "fp16"])
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
