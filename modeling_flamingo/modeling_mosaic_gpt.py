"""Native transformers port of MosaicML's "MosaicGPT" decoder, the pre-MPT architecture of
`mosaicml/mpt-1b-redpajama-200b` (language model of OpenFlamingo-3B), whose remote code no longer runs.

Numerics follow the remote code (`mosaic_gpt.py`, `gpt_blocks.py`, `attention.py` of the MosaicML examples
repository) in fp32: pre-LN blocks, fused `Wqkv`, optional LayerNorm on the full-width queries and keys, ALiBi or
learned positions, exact GELU MLP, logits from the tied token embedding. Module and parameter names are the remote
ones, so hub weight files load as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig

try:  # transformers >= 5.21
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 5.20: what its causal LMs do inline

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> the positions `logits_to_keep` names: the last n for an int (0: all), else these indices."""
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, positions, :]


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument of `forward` and the cache field of the model outputs from
# `past_key_values` to `cache`. `generate` and the gradient checkpointing layers pass the cache under the installed
# release's name, so it is handed on (and returned) under that name.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_cache_alias(forward: Callable) -> Callable:
    """Decorator of a `forward` that takes the cache as `past_key_values`: the cache may also come as `cache`,
    the name transformers >= 5.24 passes it under, so both names work on every supported release."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "cache" in kwargs:
            cache = kwargs.pop("cache")
            if cache is not None:
                if kwargs.get("past_key_values") is not None:
                    raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
                kwargs["past_key_values"] = cache
        return forward(*args, **kwargs)

    return wrapper


def build_alibi_bias(
    n_heads: int, key_length: int, alibi_bias_max: float = 8, device: torch.device | None = None
) -> torch.Tensor:
    """ALiBi bias of the remote code, for `key_length` keys.

    Key `j` gets `(j - (key_length - 1)) * slope_h` with `slope_h = 2 ** (-h * alibi_bias_max / n_heads)` for heads
    `h = 1..n_heads` (no power-of-two interleaving, unlike transformers' `MptModel`). The bias is relative to the
    last key rather than to each query; it differs from `(j - i) * slope_h` by a constant per query row, which the
    softmax ignores. The remote code precomputed it for `max_seq_len` and kept the last `key_length` columns,
    which gives the same values.

    Returns:
        (1, n_heads, 1, key_length) float32 tensor.
    """
    positions = torch.arange(1 - key_length, 1, dtype=torch.float32, device=device).view(1, 1, 1, key_length)
    exponents = torch.arange(1, n_heads + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n_heads)
    # Same operation order as the remote code, so fp32 values are bit-identical.
    return positions * (1.0 / (2 ** exponents.view(1, n_heads, 1, 1)))


def eager_attention_forward(
    module: MosaicGPTAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out as in the remote code's `scaled_multihead_dot_product_attention`.

    Args:
        query: (B, H, Q, D). key, value: (B, H, K, D).
        attention_mask: bool, broadcastable to (B, 1, Q, K); True where a query may attend to a key.
        position_bias: (1, H, 1, K) or None, added to the scaled scores.
    Returns:
        (B, Q, H, D) attention output and the (B, H, Q, K) attention probabilities.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * module.softmax_scale
    if position_bias is not None:
        scores = scores + position_bias.to(scores.dtype)
    if attention_mask is not None:
        # Fill (not add) the finite minimum, like the remote code: a row with no allowed key (a left-pad query)
        # becomes uniform instead of NaN, so padding never poisons the real tokens.
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def sdpa_attention_forward(
    module: MosaicGPTAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """`eager_attention_forward` through `torch.nn.functional.scaled_dot_product_attention`.

    ALiBi rules out the causal-flag kernels, so mask and bias go in as one additive float mask. Masked entries get
    half the dtype's minimum: SDPA adds the mask to the scores, and the full minimum could overflow to -inf in fp16,
    turning a fully masked (left-pad) row into NaN.

    Returns:
        (B, Q, H, D) attention output and None (SDPA does not expose the probabilities).
    """
    float_mask = None
    if position_bias is not None or attention_mask is not None:
        float_mask = (
            position_bias.to(query.dtype)
            if position_bias is not None
            else torch.zeros((1, 1, 1, key.shape[-2]), dtype=query.dtype, device=query.device)
        )
        if attention_mask is not None:
            float_mask = float_mask.masked_fill(~attention_mask, torch.finfo(query.dtype).min / 2)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=float_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=False,
        scale=module.softmax_scale,
    )
    return output.transpose(1, 2).contiguous(), None


ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "eager": eager_attention_forward,
    "sdpa": sdpa_attention_forward,
}


class MosaicGPTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional LayerNorm on full-width queries/keys."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.d_model = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.softmax_scale = (
            config.softmax_scale
            if config.softmax_scale is not None
            else 1 / math.sqrt(config.d_model / config.n_heads)
        )
        self.attn_dropout_p = config.attn_pdrop
        self.clip_qkv = config.attn_clip_qkv
        bias = not config.no_bias

        self.Wqkv = nn.Linear(self.d_model, 3 * self.d_model, bias=bias)
        self.Wqkv._fused = (0, (self.d_model, 2 * self.d_model))  # split points, for the per-part init
        if config.attn_qk_ln:
            # The remote code builds these as plain nn.LayerNorm whatever `low_precision_layernorm` says.
            self.q_ln = nn.LayerNorm(self.d_model, bias=bias)
            self.k_ln = nn.LayerNorm(self.d_model, bias=bias)
        self.out_proj = nn.Linear(self.d_model, self.d_model, bias=bias)
        self.out_proj._is_residual = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: (B, Q, d_model).
            attention_mask: bool, broadcastable to (B, 1, Q, K) with K = cached + Q keys; True = may attend.
                None attends to every key.
            position_bias: (1, n_heads, 1, K) ALiBi bias, or None.
            past_key_values: cache updated in place with this layer's keys/values.
        Returns:
            (B, Q, d_model) output and (B, n_heads, Q, K) attention probabilities (None with SDPA).
        """
        batch_size, query_length, _ = hidden_states.shape
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:  # truthiness as in the remote code: 0 means no clipping
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = qkv.chunk(3, dim=-1)
        if self.config.attn_qk_ln:
            dtype = query.dtype
            query = self.q_ln(query).to(dtype)
            key = self.k_ln(key).to(dtype)

        head_shape = (batch_size, query_length, self.n_heads, self.head_dim)
        query = query.view(head_shape).transpose(1, 2)
        key = key.view(head_shape).transpose(1, 2)
        value = value.view(head_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_fn = ATTENTION_FUNCTIONS.get(self.config._attn_implementation, sdpa_attention_forward)
        output, probs = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            position_bias,
            dropout=self.attn_dropout_p if self.training else 0.0,
        )
        output = output.reshape(batch_size, query_length, self.d_model)
        return self.out_proj(output), probs


class MosaicGPTMLP(nn.Module):
    """`mlp_down(GELU(mlp_up(x)))` with the exact (erf) GELU."""

    def __init__(self, config: MosaicGPTConfig):
        super().__init__()
        bias = not config.no_bias
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=bias)
        self.mlp_act = nn.GELU()
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=bias)
        self.mlp_down._is_residual = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, Q, d_model) -> (B, Q, d_model)."""
        return self.mlp_down(self.mlp_act(self.mlp_up(hidden_states)))


class MosaicGPTBlock(GradientCheckpointingLayer):
    """Pre-LN decoder block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, with residual dropout on both branches.

    The remote "low-precision LayerNorm" only differs from `nn.LayerNorm` under autocast, so a plain LayerNorm is used.
    """

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        bias = not config.no_bias
        self.ln_1 = nn.LayerNorm(config.d_model, bias=bias)
        self.attn = MosaicGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=bias)
        self.mlp = MosaicGPTMLP(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    @accepts_cache_alias
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, Q, d_model), positional so gradient checkpointing and wrappers see it first.
            attention_mask: bool, broadcastable to (B, 1, Q, K); True = may attend.
            position_bias: (1, n_heads, 1, K) ALiBi bias, or None.
            past_key_values: the model's cache (updated in place), or None; also accepted as `cache`.
            use_cache: unused here (the cache object decides); accepted for the common layer signature.
        Returns:
            (B, Q, d_model).
        """
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            attention_mask=attention_mask,
            position_bias=position_bias,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + self.resid_attn_dropout(attn_output)
        hidden_states = hidden_states + self.resid_mlp_dropout(self.mlp(self.ln_2(hidden_states)))
        return hidden_states


def _residual_divisor(config: MosaicGPTConfig) -> float | None:
    """What the remote init divides residual-branch output projections by (`init_div_is_residual`)."""
    value = config.init_div_is_residual
    if value is False:
        return None
    if value is True:
        return math.sqrt(2 * config.n_layers)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.replace(".", "", 1).isdigit():
        return float(value)
    raise ValueError(f"init_div_is_residual must be a bool or a number, got {value!r}.")


def _weight_init_fn(config: MosaicGPTConfig) -> tuple[Callable[[torch.Tensor], None], float | None]:
    """The remote `param_init_fn` scheme as (in-place init function for a weight, residual divisor)."""
    name = config.param_init_fn
    divisor = _residual_divisor(config)
    kaiming = {"a": config.init_gain, "mode": config.fan_mode, "nonlinearity": config.init_nonlinearity}
    if name == "kaiming_normal_":
        return (lambda t: nn.init.kaiming_normal_(t, **kaiming)), divisor
    if name == "kaiming_uniform_":
        return (lambda t: nn.init.kaiming_uniform_(t, **kaiming)), divisor
    if name == "xavier_uniform_":
        return (lambda t: nn.init.xavier_uniform_(t, gain=config.init_gain)), divisor
    if name == "xavier_normal_":
        return (lambda t: nn.init.xavier_normal_(t, gain=config.init_gain)), divisor
    if name in ("small_init_", "neox_init_"):
        std = math.sqrt(2 / (5 * config.d_model))
        if name == "neox_init_":
            divisor = config.n_layers / math.sqrt(10)
        return (lambda t: nn.init.normal_(t, mean=0.0, std=std)), divisor
    if name != "baseline_":
        logger.warning_once(f"param_init_fn={name!r} is not ported; initialising with baseline_ (normal, init_std).")
    return (lambda t: nn.init.normal_(t, mean=0.0, std=config.init_std)), divisor


class MosaicGPTPreTrainedModel(PreTrainedModel):
    config: MosaicGPTConfig
    config_class = MosaicGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicGPTBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False  # ALiBi needs an additive bias
    _supports_flex_attn = False
    _can_record_outputs = {"hidden_states": MosaicGPTBlock, "attentions": MosaicGPTAttention}

    def __init__(self, config: MosaicGPTConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        if config.prefix_lm or config.attn_uses_sequence_id:
            raise NotImplementedError("MosaicGPT prefix_lm / attn_uses_sequence_id are not supported by this port.")
        if config.no_bias:
            # The remote code deletes every bias after construction, so biases in a weight file were silently
            # unused there; ignore them here too instead of reporting them as unexpected.
            self._keys_to_ignore_on_load_unexpected = [r"\.bias$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The remote `param_init_fn` (default `kaiming_normal_`): fused qkv initialised per part, residual output
        projections divided by `init_div_is_residual`, embeddings from `emb_init_std`/`emb_init_uniform_lim` when
        set, LayerNorms to identity, biases to zero. Values are drawn into a scratch tensor and copied with
        `init.copy_`, which leaves weights loaded from a checkpoint untouched."""
        config = self.config
        weight_init, divisor = _weight_init_fn(config)
        # Weights loaded from a checkpoint: skip drawing a scratch tensor that `init.copy_` would discard anyway.
        loaded = getattr(getattr(module, "weight", None), "_is_hf_initialized", False)
        if isinstance(module, nn.Linear):
            if module.bias is not None:
                init.zeros_(module.bias)
            if loaded:
                return
            value = torch.empty_like(module.weight)
            fused = getattr(module, "_fused", None)
            if fused is None:
                weight_init(value)
            else:
                dim, splits = fused
                bounds = (0, *splits, value.shape[dim])
                for start, end in zip(bounds[:-1], bounds[1:], strict=False):
                    weight_init(value.narrow(dim, start, end - start))
            if divisor is not None and getattr(module, "_is_residual", False):
                value = value / divisor
            init.copy_(module.weight, value)
        elif isinstance(module, nn.Embedding) and not loaded:
            value = torch.empty_like(module.weight)
            if config.emb_init_std is not None:
                nn.init.normal_(value, mean=0.0, std=config.emb_init_std)
            elif config.emb_init_uniform_lim is not None:
                lim = config.emb_init_uniform_lim
                low, high = (lim[0], lim[1]) if isinstance(lim, (list, tuple)) else (-lim, lim)
                nn.init.uniform_(value, a=low, b=high)
            else:
                weight_init(value)
            init.copy_(module.weight, value)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class MosaicGPTSharedEmbedding(nn.Embedding):
    """The token embedding, also the tied output projection: `forward(hidden_states, unembed=True)` gives the logits.

    Computing the logits through the module's own call (not by reading `.weight` from outside, as the remote code
    does) lets wrappers that gather parameters in forward hooks see that use: under FSDP2 the embedding is its own
    sharded unit, and `.weight` read outside its forward is the local shard. Same parameter name as `nn.Embedding`.
    """

    def forward(self, input: torch.Tensor, unembed: bool = False) -> torch.Tensor:
        """(B, Q) token ids -> (B, Q, d) embeddings; with `unembed`, (B, Q, d) hidden states -> (B, Q, vocab)."""
        if unembed:
            return F.linear(input, self.weight)
        return super().forward(input)


class MosaicGPTModel(MosaicGPTPreTrainedModel):
    """The MosaicGPT decoder (`transformer.*` in the weight files) without the tied output projection."""

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.wte = MosaicGPTSharedEmbedding(config.vocab_size, config.d_model)
        if not config.alibi:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList([MosaicGPTBlock(config, layer_idx) for layer_idx in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model, bias=not config.no_bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _learned_positions(
        self, attention_mask: torch.Tensor | None, past_length: int, query_length: int, device: torch.device
    ) -> torch.LongTensor:
        """Positions for `wpe` (alibi=False), shifted left past padding as in the remote code.

        Returns:
            (1 or B, Q) position ids.
        """
        positions = torch.arange(past_length, past_length + query_length, device=device).unsqueeze(0)
        if attention_mask is not None and attention_mask.ndim == 2:
            pads_before = torch.cumsum((~attention_mask.bool()).to(torch.int32), dim=1)[:, past_length:]
            positions = torch.clamp(positions - pads_before, min=0)
        if past_length + query_length > self.config.max_seq_len:
            raise ValueError(
                f"{past_length + query_length} tokens exceed max_seq_len={self.config.max_seq_len} of the learned "
                "position embeddings."
            )
        return positions

    @staticmethod
    def _attention_allowed(
        attention_mask: torch.Tensor | None, past_length: int, query_length: int, device: torch.device
    ) -> torch.Tensor:
        """Boolean attention mask, True where a query may attend to a key.

        Args:
            attention_mask: None, (B, K) padding mask over cached + new tokens (1 = real token), or a ready 4-D
                mask broadcastable to (B, 1, Q, K): bool (True = attend) or additive float (0 = attend).
        Returns:
            (B or 1, 1, Q, K) bool tensor: causal, and restricted to non-pad keys.
        """
        if attention_mask is not None and attention_mask.ndim == 4:
            return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        key_length = past_length + query_length
        query_positions = torch.arange(past_length, key_length, device=device)
        key_positions = torch.arange(key_length, device=device)
        allowed = (key_positions[None, :] <= query_positions[:, None])[None, None]
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[-1] != key_length:
                raise ValueError(
                    f"attention_mask must be (batch, {key_length}) (cached + new tokens) or 4-D; "
                    f"got {tuple(attention_mask.shape)}."
                )
            allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        return allowed

    @accepts_cache_alias
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """
        Args:
            input_ids: (B, Q) token ids, or give `inputs_embeds` (B, Q, d_model) instead.
            attention_mask: (B, K) with K = cached + Q tokens, 1 for real tokens and 0 for (left) padding; or a 4-D
                mask (see `_attention_allowed`).
            position_ids: accepted for API compatibility and ignored: positions come from ALiBi (or, with learned
                positions, from the cache length and the padding mask, as in the remote code).
            past_key_values: a `Cache` (also accepted as `cache`); created (`DynamicCache`) when `use_cache` and
                none is given.
        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` (B, Q, d_model) after `ln_f` and the cache under
            `CACHE_NAME`.
        """
        del position_ids  # see docstring
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        query_length = inputs_embeds.shape[1]
        device = inputs_embeds.device

        hidden_states = inputs_embeds
        if not self.config.alibi:
            hidden_states = hidden_states + self.wpe(
                self._learned_positions(attention_mask, past_length, query_length, device)
            )
        fraction = self.config.embedding_fraction
        if fraction != 1:
            # GLM-130B: forward value unchanged, only `fraction` of the gradient reaches the embeddings.
            hidden_states = hidden_states * fraction + hidden_states.detach() * (1 - fraction)
        hidden_states = self.emb_drop(hidden_states)

        allowed = self._attention_allowed(attention_mask, past_length, query_length, device)
        position_bias = None
        if self.config.alibi:
            position_bias = build_alibi_bias(
                self.config.n_heads, allowed.shape[-1], self.config.alibi_bias_max, device=device
            )

        for block in self.blocks:
            hidden_states = block(
                hidden_states,
                attention_mask=allowed,
                position_bias=position_bias,
                use_cache=use_cache,
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: past_key_values})


class MosaicGPTForCausalLM(MosaicGPTPreTrainedModel, GenerationMixin):
    """MosaicGPT with logits `hidden @ transformer.wte.weight^T` (times `logit_scale` if set).

    There is no `lm_head` module (nor weight key): the output projection *is* the input embedding, so
    `get_output_embeddings()` returns None and `resize_token_embeddings` only has `wte` to resize, after which the
    logits follow the new vocabulary automatically.
    """

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.transformer = MosaicGPTModel(config)
        logit_scale = config.logit_scale
        if logit_scale == "inv_sqrt_d_model":
            logit_scale = 1 / math.sqrt(config.d_model)
        self.logit_scale: float | None = logit_scale
        self.post_init()
        self._cache_when_generating()

    def _cache_when_generating(self) -> None:
        """Hub configs carry the remote code's training default `use_cache: false`, which a generation config
        derived from the model config inherits, so `generate` would decode without a cache (quadratic time).
        Cached and uncached decoding give the same tokens, so such derived configs are switched to caching;
        `forward` still follows `config.use_cache`, and an explicit generation_config.json is left alone."""
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None and getattr(generation_config, "_from_model_config", False):
            if generation_config.use_cache is False:
                generation_config.use_cache = True

    def adjust_generation_fn(self, *args, **kwargs) -> None:
        """`from_pretrained` rebuilds the generation config here; re-apply `_cache_when_generating`."""
        super().adjust_generation_fn(*args, **kwargs)
        self._cache_when_generating()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> None:
        """None: the logits are computed from `get_input_embeddings().weight` (see the class docstring)."""
        return None

    @accepts_cache_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """
        Args:
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache: see
                `MosaicGPTModel.forward`.
            labels: (B, Q) targets, shifted inside (`-100` = ignored); gives `loss`.
            logits_to_keep: compute logits only for the last `n` positions (0 = all), or for given indices.
        Returns:
            `CausalLMOutputWithPast` with `logits` (B, Q or kept, vocab_size) and the cache under `CACHE_NAME`.
        """
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        wte = self.transformer.wte
        if isinstance(wte, MosaicGPTSharedEmbedding):
            logits = wte(hidden_states, unembed=True)
        else:  # an embedding module set by `set_input_embeddings`
            logits = F.linear(hidden_states, wte.weight)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


__all__ = [
    "MosaicGPTBlock",
    "MosaicGPTForCausalLM",
    "MosaicGPTModel",
    "MosaicGPTPreTrainedModel",
    "MosaicGPTSharedEmbedding",
    "build_alibi_bias",
]
