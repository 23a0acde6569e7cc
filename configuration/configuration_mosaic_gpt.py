"""Configuration of MosaicML's "MosaicGPT" decoder (MPT-1B-RedPajama-200B, the language model of OpenFlamingo-3B)."""

from __future__ import annotations

from transformers import PretrainedConfig

# Keys of the hub config.json that only made sense for the original remote code and are dropped on load:
# `auto_map` points at remote-code files that checkpoints saved by this package do not ship; the remote config
# class deletes `name` and `loss_fn` itself.
_DROPPED_KEYS = ("auto_map", "name", "loss_fn")


class MosaicGPTConfig(PretrainedConfig):
    r"""
    Configuration of a MosaicGPT model (`model_type="mosaic_gpt"`), the pre-MPT architecture of MosaicML's examples
    repository used by `mosaicml/mpt-1b-redpajama-200b` and its copy `anas-awadalla/mpt-1b-redpajama-200b`.

    Field names and defaults are those of the original remote-code config class, so a hub `config.json` gives the
    same model through `MosaicGPTConfig.from_dict`. The MPT-1B checkpoint sets `d_model=2048, n_heads=16,
    n_layers=24, vocab_size=50432, attn_impl="torch", attn_qk_ln=True, alibi=True, no_bias=True`.

    Args:
        d_model (`int`, defaults to 2048): width of the residual stream.
        n_heads (`int`, defaults to 16): attention heads.
        n_layers (`int`, defaults to 24): decoder blocks.
        mlp_ratio (`int`, defaults to 4): MLP hidden width is `mlp_ratio * d_model`.
        max_seq_len (`int`, defaults to 2048): length of the learned position table when `alibi=False`, and the
            longest sequence the original code accepted (ALiBi itself is computed for any length here).
        vocab_size (`int`, defaults to 50368): rows of the (tied) token embedding.
        attn_pdrop, resid_pdrop, emb_pdrop (`float`, default 0.0): dropout on attention probabilities, on the
            attention/MLP branch outputs before the residual add, and on the embeddings.
        attn_impl (`str`, defaults to `"triton"`): kernel choice of the original code (`torch`, `flash`, `triton`);
            kept for the record only, the attention kernel here is chosen with `attn_implementation`.
        attn_qk_ln (`bool`, defaults to `False`): LayerNorm on queries and keys over the full width, before the
            head split.
        attn_clip_qkv (`float`, *optional*): clamp the fused qkv projection to `[-clip, clip]`.
        softmax_scale (`float`, *optional*): attention score scale, `1/sqrt(head_dim)` when `None`.
        prefix_lm (`bool`, defaults to `False`), attn_uses_sequence_id (`bool`, defaults to `False`): prefix-LM
            and packed-sequence attention of the original code; not supported by this port (both are off in every
            released checkpoint).
        alibi (`bool`, defaults to `False`): ALiBi attention bias instead of learned position embeddings.
        alibi_bias_max (`int`, defaults to 8): head `h` (1-based) gets slope `2 ** (-h * alibi_bias_max / n_heads)`.
        init_device (`str`, defaults to `"cpu"`): ignored (kept for the record).
        logit_scale (`float` or `"inv_sqrt_d_model"`, *optional*): multiplies the logits.
        no_bias (`bool`, defaults to `False`): drop the biases of every Linear and LayerNorm (the original code
            removes them after construction; MPT-1B sets it, its weights have no `.bias` keys).
        verbose (`int`, defaults to 0): ignored.
        param_init_fn, init_div_is_residual, init_std, emb_init_std, emb_init_uniform_lim, init_gain, fan_mode,
        init_nonlinearity: parameter initialisation of fresh models (see `MosaicGPTPreTrainedModel._init_weights`).
        embedding_fraction (`float`, defaults to 1.0): scales the gradient reaching the embeddings (GLM-130B trick);
            the forward value is unchanged.
        low_precision_layernorm (`bool`, defaults to `True`): the original code ran LayerNorms in the autocast dtype;
            outside autocast this is a plain LayerNorm, which is what this port computes.
        use_cache (`bool`, defaults to `False`): default of `use_cache` in `forward` (`generate` caches regardless).
        tie_word_embeddings (`bool`, defaults to `True`): logits always use `wte`, there is no separate head.
    """

    model_type = "mosaic_gpt"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}
    # The cache's output name before and from transformers 5.24 on (Trainer.predict leaves it out of the logits).
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    mlp_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    attn_impl: str = "triton"
    attn_qk_ln: bool = False
    attn_clip_qkv: float | None = None
    softmax_scale: float | None = None
    prefix_lm: bool | None = False
    attn_uses_sequence_id: bool | None = False
    alibi: bool = False
    alibi_bias_max: int = 8
    init_device: str = "cpu"
    logit_scale: float | str | None = None
    no_bias: bool = False
    verbose: int = 0
    param_init_fn: str = "kaiming_normal_"
    init_div_is_residual: int | float | str | bool = True
    init_std: float = 0.02
    emb_init_std: float | None = None
    emb_init_uniform_lim: tuple[float, float] | list[float] | float | None = None
    init_gain: float = 0
    fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    embedding_fraction: float = 1.0
    low_precision_layernorm: bool = True
    use_cache: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        for key in _DROPPED_KEYS:
            kwargs.pop(key, None)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """The checks of the original `_validate_config`, minus those about kernels this port does not use."""
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}).")
        if any(not 0 <= p <= 1 for p in (self.attn_pdrop, self.resid_pdrop, self.emb_pdrop)):
            raise ValueError("attn_pdrop, resid_pdrop and emb_pdrop are probabilities and must be in [0, 1].")
        if self.attn_impl not in ("torch", "flash", "triton"):
            raise ValueError(f"Unknown attn_impl={self.attn_impl!r}.")
        if not 0 < self.embedding_fraction <= 1:
            raise ValueError("embedding_fraction must be in (0, 1].")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ValueError(f"logit_scale={self.logit_scale!r}: use a number or 'inv_sqrt_d_model'.")


__all__ = ["MosaicGPTConfig"]
