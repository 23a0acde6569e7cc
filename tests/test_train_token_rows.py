"""`TrainableTokenRows`: the `<image>` and `<|endofchunk|>` rows trained through a (2, d) parameter.

Its step equals the original's dense, masked step (tests/test_train_step.py, every family). Here: the hooked model
computes what a plain model whose embedding holds the rows computes (lookup and tied head), and the rows parameter
never shows in a state dict, while loading one sets the rows from its embedding weight.
"""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_flamingo.testing import FAMILIES
from modeling_flamingo.training import freeze_for_flamingo_training
from modeling_flamingo.training.token_rows import ROWS_PARAMETER, TrainableTokenRows, tied_output_projection

from train_helpers import MMC4_TEXTS, make_batch, tiny_model


def _model(family: str):
    model, tokenizer = tiny_model(family=family)
    freeze_for_flamingo_training(model)
    return model, tokenizer


def _new_rows(model) -> list[int]:
    return sorted({model.config.media_token_id, model.config.eoc_token_id})


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_model_computes_what_the_plain_model_with_those_rows_computes(family):
    model, tokenizer = _model(family)
    batch = make_batch(tokenizer, MMC4_TEXTS[:2], 2, interleaved=True, seed=0)
    plain, stale = copy.deepcopy(model), copy.deepcopy(model)
    rows = TrainableTokenRows(model, _new_rows(model))
    tied = tied_output_projection(model)[1] is not None
    assert tied == (family in ("mpt", "mosaic_gpt"))
    with torch.no_grad():  # rows that differ from the (stale) embedding weight
        getattr(model.get_input_embeddings(), ROWS_PARAMETER).add_(
            torch.randn(2, model.config.text_config.hidden_size)
        )
        plain.get_input_embeddings().weight[_new_rows(model)] = rows.rows
    ours, expected = model(**batch).logits, plain(**batch).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # The rows matter: the model's own (stale) embedding weight gives other logits.
    assert not torch.allclose(ours, stale(**batch).logits, atol=1e-3)
    # Gradients reach the rows only (the dense weight, tied head included, is frozen).
    model(**batch).loss.backward()
    assert rows.rows.grad is not None and rows.rows.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad is None


def test_state_dict_is_the_plain_model_s_and_loading_sets_the_rows():
    model, _ = _model("mpt")
    keys = set(model.state_dict())
    rows = TrainableTokenRows(model, _new_rows(model))
    assert set(model.state_dict()) == keys  # no flamingo_token_rows
    with torch.no_grad():
        rows.rows.add_(1.0)
    rows.sync_()
    weight = model.get_input_embeddings().weight
    assert torch.equal(model.state_dict()[_embedding_key(model)][_new_rows(model)], rows.rows.detach())

    # Loading a plain state dict (strict) takes the rows from its embedding weight.
    other, _ = _model("mpt")
    with torch.no_grad():
        other.get_input_embeddings().weight.normal_()
    missing, unexpected = model.load_state_dict(other.state_dict(), strict=True)
    assert not missing and not unexpected
    assert torch.equal(weight, other.get_input_embeddings().weight)
    assert torch.equal(rows.rows.detach(), other.get_input_embeddings().weight[_new_rows(model)])


def _embedding_key(model) -> str:
    weight = model.get_input_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is weight)


def test_token_ids_outside_the_embedding_are_refused():
    model, _ = _model("llama")
    with pytest.raises(ValueError, match="not all rows of the input embeddings"):
        TrainableTokenRows(model, [model.get_input_embeddings().weight.shape[0]])
