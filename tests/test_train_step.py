"""One training step against the original's own `train_one_epoch` (open_flamingo 2.0.1), every language model family.

Both start from the same weights (tests/reference.py) and the same LAION and MMC4 batch; the original is driven
through `open_flamingo.train.train_utils.train_one_epoch` with one-batch loaders, its gradients captured when it calls
`optimizer.step()`. Losses, the clipped and masked gradients of every trainable parameter and the weights after the
step must agree; the optimiser's parameter groups must be the original's.
"""

from __future__ import annotations

import pytest
import torch

from modeling_flamingo.testing import FAMILIES
from modeling_flamingo.training import FlamingoTrainer, flamingo_parameter_groups
from modeling_flamingo.training.token_rows import ROWS_PARAMETER

from reference import build_original, ours_from_original
from train_helpers import (
    LAION_TEXTS,
    MMC4_TEXTS,
    MULTIPLIERS,
    ListLoader,
    fresh_accelerate_state,
    make_batch,
    original_train_args,
    train_args,
)
from train_reference import (
    DDPLike,
    OneBatch,
    as_original,
    canonical_name,
    embedding_name,
    grads_as_original,
    original_batches,
    original_name,
    original_param_groups,
    train_utils,
)

LR = 1e-3


def _run_original(original, tokenizer, laion, mmc4):
    wrapped = DDPLike(original)
    named = list(wrapped.named_parameters())
    optimizer = torch.optim.AdamW(original_param_groups(named, 0.1), lr=LR)
    from transformers import get_constant_schedule_with_warmup

    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=0)
    grads: dict[str, torch.Tensor] = {}
    inner_step = optimizer.step

    def step(*a, **k):
        grads.update({n: p.grad.clone() for n, p in named if p.grad is not None})
        return inner_step(*a, **k)

    optimizer.step = step
    batch_laion, batch_mmc4 = original_batches(laion, mmc4)
    args = original_train_args(logging_steps=100)
    train_utils.train_one_epoch(
        args=args,
        model=wrapped,
        epoch=0,
        laion_loader=OneBatch(batch_laion),
        mmc4_loader=OneBatch(batch_mmc4),
        tokenizer=tokenizer,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        device_id="cpu",
        wandb=None,
    )
    return wrapped.losses, grads, optimizer


@pytest.fixture(scope="module", params=FAMILIES)
def stepped(request):
    family = request.param
    original, tokenizer = build_original(family)
    ours = ours_from_original(original, tokenizer, family).train()
    original.train()
    laion = make_batch(tokenizer, LAION_TEXTS[:3], 1, interleaved=False, seed=1)
    mmc4 = make_batch(tokenizer, MMC4_TEXTS[:3], 2, interleaved=True, seed=2)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}

    original_losses, original_grads, original_optimizer = _run_original(original, tokenizer, laion, mmc4)

    with fresh_accelerate_state():
        args = train_args(
            learning_rate=LR,
            warmup_steps=0,
            max_steps=1,
            run_name="unused",
            loss_multiplier_laion=MULTIPLIERS["laion"],
            loss_multiplier_mmc4=MULTIPLIERS["mmc4"],
        )
        factory = lambda epoch: {"laion": ListLoader([laion]), "mmc4": ListLoader([mmc4])}  # noqa: E731
        trainer = FlamingoTrainer(args, ours, None, factory)
        grads: dict[str, torch.Tensor] = {}
        inner_step = trainer.optimizer.step

        def step(*a, **k):
            grads.update({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
            return inner_step(*a, **k)

        trainer.optimizer.step = step
        losses = trainer.forward_backward({"laion": laion, "mmc4": mmc4}, sync=True)
        assert trainer.optimizer_step()
    layers_attr = ours.config.decoder_layers_attr_name
    return {
        "family": family,
        "ours": ours,
        "original": original,
        "before": before,
        "losses": losses,
        "grads": grads,
        "original_losses": original_losses,
        "original_grads": {canonical_name(n, layers_attr): g for n, g in original_grads.items()},
        "original_optimizer": original_optimizer,
        "trainer": trainer,
    }


def test_losses_match(stepped):
    ours = [stepped["losses"]["laion"], stepped["losses"]["mmc4"]]
    assert ours == pytest.approx(stepped["original_losses"], abs=1e-5)
    assert all(v > 0 for v in ours)


def test_gradients_of_every_trainable_parameter_match(stepped):
    mapped = grads_as_original(stepped["ours"], stepped["grads"])
    assert set(mapped) == set(stepped["original_grads"])
    for name, grad in mapped.items():
        torch.testing.assert_close(
            grad, stepped["original_grads"][name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
    # The step was not trivial: the gates and the resampler received gradient.
    assert any(g.abs().sum() > 0 for n, g in mapped.items() if n.endswith("attn_gate"))


def test_weights_after_the_step_match(stepped):
    # A first AdamW step moves each entry by about lr * g / (|g| + eps): entries whose gradient is near eps (1e-8)
    # turn 1e-12 differences of the gradient into visible ones, so those few are compared at lr / 10. Everywhere
    # else the tolerance (1e-6) is ten times below the weight-decay term (lr * 0.1 * |w| ~ 1e-5), so a wrong group
    # or learning rate shows.
    ours, original = stepped["ours"], stepped["original"]
    model_type = ours.config.text_config.model_type
    layers_attr = ours.config.decoder_layers_attr_name
    theirs = {canonical_name(n, layers_attr): p for n, p in original.named_parameters()}
    embedding = embedding_name(ours)
    for name, p in ours.named_parameters():
        if name.endswith("." + ROWS_PARAMETER):  # compared through the embedding weight they were copied into
            name, p = embedding, ours.get_input_embeddings().weight
        elif not p.requires_grad:
            continue
        key = original_name(name, model_type)
        other, grad = theirs[key], stepped["original_grads"][key]
        stable = grad.abs() > 1e-6
        torch.testing.assert_close(p[stable], other[stable], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(p[~stable], other[~stable], atol=LR / 10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_parameter_groups_match_the_original(stepped):
    ours, original = stepped["ours"], stepped["original"]
    layers_attr = ours.config.decoder_layers_attr_name
    ours_groups = flamingo_parameter_groups(ours, weight_decay=0.1)
    names = {id(p): as_original(ours, n) for n, p in ours.named_parameters() if p.requires_grad}
    original_names = {id(p): canonical_name(n, layers_attr) for n, p in original.named_parameters()}
    theirs = original_param_groups(list(original.named_parameters()), 0.1)
    assert [g["weight_decay"] for g in ours_groups] == [g["weight_decay"] for g in theirs]
    for mine, other in zip(ours_groups, theirs, strict=True):
        assert sorted(names[id(p)] for p in mine["params"]) == sorted(original_names[id(p)] for p in other["params"])
    # The trainer's optimiser holds exactly these groups, with the learning rate asked for.
    optimizer = stepped["trainer"].optimizer
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in ours_groups]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_frozen_weights_unchanged_and_only_the_two_new_rows_moved(stepped):
    ours, before = stepped["ours"], stepped["before"]
    embedding = ours.get_input_embeddings().weight
    emb_name = next(n for n, p in ours.named_parameters() if p is embedding)
    for name, p in ours.named_parameters():
        if name == emb_name:
            continue
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name
    new_rows = [ours.config.media_token_id, ours.config.eoc_token_id]
    others = torch.ones(embedding.shape[0], dtype=torch.bool)
    others[new_rows] = False
    assert torch.equal(embedding[others], before[emb_name][others])
    for row in new_rows:
        assert not torch.equal(embedding[row], before[emb_name][row]), row
    # and the resampler did move
    assert not torch.equal(ours.perceiver.latents, before["perceiver.latents"])


def test_only_the_two_rows_are_trained_parameters(stepped):
    # The dense embedding (and a head tied to it) is frozen and got no gradient: the step above trained the two rows
    # through the (2, d) parameter and copied them into the weight, and still matched the original's dense step.
    ours = stepped["ours"]
    embedding = ours.get_input_embeddings()
    assert not embedding.weight.requires_grad and embedding.weight.grad is None
    rows = getattr(embedding, ROWS_PARAMETER)
    assert rows.requires_grad and rows.shape == (2, embedding.weight.shape[1])
    new_rows = sorted({ours.config.media_token_id, ours.config.eoc_token_id})
    assert torch.equal(embedding.weight[new_rows], rows.detach())
    assert stepped["trainer"].token_rows is not None and stepped["trainer"].embedding_mask is None
