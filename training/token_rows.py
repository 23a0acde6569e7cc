"""Training only the `<image>` and `<|endofchunk|>` rows of the language model's token embedding.

The original trains the whole (vocab, d) input-embedding matrix and zeroes every other row's gradient after the
backward pass. When the output projection is tied to that matrix (MPT, MosaicGPT: the 3B and 9B models), this costs a
dense (vocab, d) weight gradient of the projection (as many FLOPs as the projection's forward pass), a dense gradient
of the lookup, and a dense AdamW update of vocab x d entries with two moment tensors as large as the embedding, all
to move two rows.

`TrainableTokenRows` computes the same step directly. The embedding weight is frozen; the trained rows live in a
(k, d) parameter `flamingo_token_rows` registered on the embedding module; two forward hooks splice them in:

- the lookup: positions holding one of the k tokens take their row from `flamingo_token_rows`;
- the tied output projection: the logits of the k tokens are `hidden @ flamingo_token_rows^T`, written over the
  columns the frozen projection computed (MPT: a hook on `lm_head`; MosaicGPT computes its tied logits in the
  embedding's own call, `forward(hidden, unembed=True)`, which the embedding's hook handles).

Every row gets the gradient the original's masked gradient gives it (the same terms, summed in another order), AdamW
treats entries independently and the embeddings have no weight decay, and a row with a zero gradient never moves in
the original, so a step is the original's step.

The embedding weight stays the one source of truth outside the step: after each optimiser step `sync_()` copies the
rows into it; the rows parameter never appears in a state dict (so `state_dict`, `save_pretrained`, Accelerate's
checkpoints and the exports are exactly the plain model's), and loading a state dict sets the rows from the loaded
embedding weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from modeling_flamingo.modeling_mosaic_gpt import MosaicGPTSharedEmbedding
from modeling_flamingo.training.optim import EmbeddingGradientMask
from modeling_flamingo.training.sharding import dtensor_class, local_rows

ROWS_PARAMETER = "flamingo_token_rows"


def is_token_rows_name(name: str) -> bool:
    """Whether a parameter name is that of the (k, d) trained rows (they never appear in a state dict)."""
    return name.rsplit(".", 1)[-1] == ROWS_PARAMETER


def tied_output_projection(model: nn.Module) -> tuple[bool, nn.Module | None]:
    """Where the model computes logits from its input-embedding weight.

    Returns:
        (known, module): `known` is False when the layout is not one this module understands (the caller then trains
        the dense embedding); `module` is the projection to hook: the output head when it shares the embedding's
        weight (MPT), the embedding itself when it computes the tied logits in its own call (MosaicGPT's
        `forward(hidden, unembed=True)`), or None when the output head is untied (GPT-NeoX, LLaMA: the head is
        frozen, as in the original).
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None:
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            return False, None
        return True, head if head.weight is embedding.weight else None
    if isinstance(embedding, MosaicGPTSharedEmbedding):
        return True, embedding
    return False, None


class TrainableTokenRows:
    """Train rows `token_ids` of `model.get_input_embeddings()` (and of a tied output projection) through a (k, d)
    parameter, with the rest of the embedding frozen. See the module docstring.

    Args:
        model: a model with `get_input_embeddings()` (an `nn.Embedding`), `get_output_embeddings()` and
            `get_decoder()`; the rows are initialised from its current embedding.
        token_ids: the k tokens whose rows are trained (`<image>`, `<|endofchunk|>`).
    Raises:
        ValueError: a token id outside the embedding, or a layout `tied_output_projection` does not know (check
            `TrainableTokenRows.supports(model)` first).
    """

    def __init__(self, model: nn.Module, token_ids: Iterable[int]):
        self.token_ids = sorted({int(t) for t in token_ids})
        embedding = model.get_input_embeddings()
        if not isinstance(embedding, nn.Embedding) or not self.token_ids:
            raise ValueError("TrainableTokenRows needs an nn.Embedding input embedding and at least one token id.")
        known, projection = tied_output_projection(model)
        if not known:
            raise ValueError("TrainableTokenRows: unknown output-projection layout (see tied_output_projection).")
        weight = embedding.weight
        if self.token_ids[0] < 0 or self.token_ids[-1] >= weight.shape[0]:
            raise ValueError(
                f"token ids {self.token_ids} are not all rows of the input embeddings ({weight.shape[0]} rows): the "
                "tokenizer and the model do not match."
            )
        self.embedding = embedding
        weight.requires_grad_(False)
        rows = nn.Parameter(weight.detach()[self.token_ids].clone())
        embedding.register_parameter(ROWS_PARAMETER, rows)
        # Hooks on the modules themselves, registered before any wrapper's: under FSDP2 they run while the module's
        # parameters (the rows included) are gathered.
        embedding.register_forward_hook(self._embedding_hook, with_kwargs=True)
        if projection is not None and projection is not embedding:
            projection.register_forward_hook(self._projection_hook)
        _state_dict_post_hook(embedding, self._drop_rows_from_state_dict)
        _load_state_dict_pre_hook(embedding, self._rows_from_loaded_weight)

    def before_optimizer_step(self, model: nn.Module) -> None:
        """Nothing: the rows' gradients are theirs alone."""

    def after_optimizer_step(self) -> None:
        """Copy the stepped rows into the embedding weight (`sync_`; collective under FSDP2)."""
        self.sync_()

    def hides_parameter(self, name: str) -> bool:
        """Whether `name` is the (k, d) rows parameter, which never appears in a state dict."""
        return is_token_rows_name(name)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        embedding = model.get_input_embeddings()
        # The lookup hook puts raw rows in place of what the embedding returns: only right for a plain lookup, not
        # for embeddings that transform it in their forward (Gemma's scaled embeddings multiply by sqrt(d)).
        plain = type(embedding).forward in (nn.Embedding.forward, MosaicGPTSharedEmbedding.forward)
        return isinstance(embedding, nn.Embedding) and plain and tied_output_projection(model)[0]

    @property
    def rows(self) -> torch.Tensor:
        """The (k, d) trained rows, as the module holds them now (under FSDP2, the unsharded tensor in forward)."""
        return getattr(self.embedding, ROWS_PARAMETER)

    def _embedding_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if kwargs.get("unembed", False) or (len(args) > 1 and args[1] is True):  # MosaicGPT's tied logits
            return self._projection_hook(module, args[:1], output)
        return self._lookup(args[0] if args else kwargs["input"], output)

    def _lookup(self, input_ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), output (B, T, d) from the frozen weight -> the lookup with the trained rows."""
        slot = torch.full_like(input_ids, -1)
        for i, token in enumerate(self.token_ids):
            slot = slot.masked_fill(input_ids == token, i)
        rows = self.rows.to(output.dtype)[slot.clamp(min=0)]  # (B, T, d)
        return torch.where((slot >= 0).unsqueeze(-1), rows, output)

    def _projection_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0]  # (B, T, d); output: (B, T, vocab) from the frozen weight
        row_logits = F.linear(hidden, self.rows.to(hidden.dtype))  # (B, T, k); under autocast in its dtype
        index = torch.tensor(self.token_ids, device=output.device)
        # In place: the projection's backward needs its inputs, not its output.
        return output.index_copy_(-1, index, row_logits.to(output.dtype))

    @staticmethod
    def _drop_rows_from_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        state_dict.pop(prefix + ROWS_PARAMETER, None)

    def _rows_from_loaded_weight(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is None or prefix + ROWS_PARAMETER in state_dict:
            return
        DTensor = dtensor_class()
        if isinstance(weight, DTensor):  # FSDP2 shards: collective, every process loads
            weight = weight.full_tensor()
        rows = weight[self.token_ids]
        target = self.rows
        if isinstance(target, DTensor):
            from torch.distributed.tensor import distribute_tensor

            rows = distribute_tensor(rows.to(target.dtype), target.device_mesh, target.placements)
        state_dict[prefix + ROWS_PARAMETER] = rows

    @torch.no_grad()
    def sync_(self) -> None:
        """Copy the trained rows into the embedding weight. Collective under FSDP2 (every process must call it)."""
        rows = self.rows
        if isinstance(rows, dtensor_class()):
            rows = rows.full_tensor()
        local, start = local_rows(self.embedding.weight)  # FSDP2: this process's rows only
        for i, token in enumerate(self.token_ids):
            if start <= token < start + local.shape[0]:
                local[token - start] = rows[i].to(local.dtype)


class TokenRowsStrategy(Protocol):
    """How the trainer trains the `<image>` and `<|endofchunk|>` rows of the input embedding (the only embedding
    rows the original recipe moves), attached to the model before Accelerate wraps it.

    `TrainableTokenRows` trains the rows through a (k, d) parameter; `EmbeddingGradientMask` trains the dense
    embedding with the other rows' gradients zeroed (the original's way); `FrozenTokenRows` trains none
    (`--freeze_lm_embeddings`). `select_token_rows_strategy` picks one.
    """

    def before_optimizer_step(self, model: nn.Module) -> None:
        """After the window's last backward pass, before clipping, with the unwrapped `model`."""

    def after_optimizer_step(self) -> None:
        """After an optimiser step that moved the weights (not after a skipped one). Collective under FSDP2."""

    def hides_parameter(self, name: str) -> bool:
        """Whether the trainable parameter `name` is the strategy's own and never in a state dict (so neither in a
        checkpoint nor in the exports, which hold the plain model's weights)."""


class FrozenTokenRows:
    """`--freeze_lm_embeddings`: no embedding row is trained."""

    def before_optimizer_step(self, model: nn.Module) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def hides_parameter(self, name: str) -> bool:
        return False


def select_token_rows_strategy(model: nn.Module, train_embeddings: bool, backend: Any) -> TokenRowsStrategy:
    """The strategy for `model`'s `<image>` and `<|endofchunk|>` rows (`model.config.media_token_id`,
    `eoc_token_id`), attached to it: `TrainableTokenRows` where `backend` (`backends.TrainingBackend`) and the model
    allow it, else the original's masked dense embedding (hooked where the backend keeps the parameter)."""
    if not train_embeddings:
        return FrozenTokenRows()
    new_tokens = [model.config.media_token_id, model.config.eoc_token_id]
    if backend.trains_token_rows and TrainableTokenRows.supports(model):
        # Only the two rows are trained, through a (2, d) parameter: the original's step without its dense embedding
        # gradient and update (module docstring).
        return TrainableTokenRows(model, new_tokens)
    mask = EmbeddingGradientMask(new_tokens)
    mask.attach(model, hook=backend.hooks_survive_wrapping)  # FSDP replaces the parameter: masked before the step
    return mask


def _state_dict_post_hook(module: nn.Module, hook) -> torch.utils.hooks.RemovableHandle:
    if hasattr(module, "register_state_dict_post_hook"):
        return module.register_state_dict_post_hook(hook)
    return module._register_state_dict_hook(hook)  # torch < 2.5: the same hook, private name


def _load_state_dict_pre_hook(module: nn.Module, hook) -> torch.utils.hooks.RemovableHandle:
    if hasattr(module, "register_load_state_dict_pre_hook"):
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)  # torch < 2.5


__all__ = [
    "ROWS_PARAMETER",
    "FrozenTokenRows",
    "TokenRowsStrategy",
    "TrainableTokenRows",
    "is_token_rows_name",
    "select_token_rows_strategy",
    "tied_output_projection",
]
