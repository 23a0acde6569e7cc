"""The trainer's one interface to how the `<image>` and `<|endofchunk|>` embedding rows are trained
(`token_rows.TokenRowsStrategy`): which strategy each backend gets, and what its hooks do to a real backward pass."""

from __future__ import annotations

import torch

from modeling_flamingo.training import EmbeddingGradientMask, TrainableTokenRows, freeze_for_flamingo_training
from modeling_flamingo.training.backends import DeepSpeedBackend, FsdpBackend, TrainingBackend
from modeling_flamingo.training.token_rows import FrozenTokenRows, select_token_rows_strategy

from train_helpers import MMC4_TEXTS, make_batch, tiny_model


def _backward(backend_class: type, train_embeddings: bool = True, family: str = "mosaic_gpt"):
    """A tiny Flamingo of `family` with the strategy `backend_class` gets, after one backward pass."""
    model, tokenizer = tiny_model(family=family)
    freeze_for_flamingo_training(model, train_embeddings=train_embeddings)
    strategy = select_token_rows_strategy(model, train_embeddings, backend_class(accelerator=None))
    model(**make_batch(tokenizer, MMC4_TEXTS[:2], 2, interleaved=True, seed=0)).loss.backward()
    return model, strategy


def _rows_with_gradient(model) -> list[int]:
    grad = model.get_input_embeddings().weight.grad
    return grad.abs().sum(-1).nonzero().flatten().tolist()


def test_one_process_ddp_and_fsdp_train_the_rows_through_their_own_parameter():
    assert isinstance(_backward(FsdpBackend)[1], TrainableTokenRows)
    model, strategy = _backward(TrainingBackend)
    assert isinstance(strategy, TrainableTokenRows)
    hidden = [name for name, p in model.named_parameters() if p.requires_grad and strategy.hides_parameter(name)]
    assert hidden == ["language_model.transformer.wte.flamingo_token_rows"] and hidden[0] not in model.state_dict()
    with torch.no_grad():
        strategy.rows.add_(1.0)
    strategy.after_optimizer_step()  # the stepped rows reach the embedding weight
    new_rows = sorted({model.config.media_token_id, model.config.eoc_token_id})
    assert torch.equal(model.get_input_embeddings().weight[new_rows], strategy.rows.detach())


def test_deepspeed_masks_the_dense_gradient_with_a_hook():
    model, strategy = _backward(DeepSpeedBackend)
    assert isinstance(strategy, EmbeddingGradientMask) and not strategy.hides_parameter("anything")
    new_rows = sorted({model.config.media_token_id, model.config.eoc_token_id})
    assert _rows_with_gradient(model) == new_rows  # masked in backward


def test_fsdp_masks_the_dense_gradient_before_the_optimiser_step():
    # Gemma2's scaled embedding cannot take the rows parameter (`TrainableTokenRows.supports`): the dense one is masked.
    model, strategy = _backward(FsdpBackend, family="gemma2")
    assert isinstance(strategy, EmbeddingGradientMask)
    new_rows = sorted({model.config.media_token_id, model.config.eoc_token_id})
    assert len(_rows_with_gradient(model)) > len(new_rows)  # no hook: the wrapper would replace the parameter
    strategy.before_optimizer_step(model)
    assert _rows_with_gradient(model) == new_rows


def test_frozen_embeddings_train_no_row():
    model, strategy = _backward(TrainingBackend, train_embeddings=False)
    assert isinstance(strategy, FrozenTokenRows)
    assert not model.get_input_embeddings().weight.requires_grad
    assert not any(strategy.hides_parameter(name) for name, _ in model.named_parameters())
