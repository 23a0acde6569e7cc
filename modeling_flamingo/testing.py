"""Tiny, deterministic building blocks for tests, the offline demo and the benchmarks.

Nothing here downloads anything: tokenizers are trained on a fixed corpus with `tokenizers`, models are built
from small configs with seeded random weights.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from modeling_flamingo.processing.processing_flamingo import add_flamingo_tokens  # noqa: F401  (re-exported)

TINY_CORPUS = [
    "An image of two cats sleeping on a couch.",
    "A sink in a small bathroom with a mirror.",
    "A dog runs after a red ball in the park.",
    "Question: what colour is the bus? Short answer: yellow.",
    "Output: a plate of food with rice and vegetables.",
    "The quick brown fox jumps over the lazy dog.",
    "A man riding a wave on top of a surfboard.",
    "Two people playing tennis on a sunny day.",
]


def make_tiny_tokenizer(vocab_size: int = 320, bos_token: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `TINY_CORPUS`, shaped like the released LMs' tokenizers.

    Args:
        vocab_size: target vocabulary size (256 byte symbols plus merges plus `<|endoftext|>`).
        bos_token: if given (LLaMA style), it is added to the vocabulary and prepended by `encode`.

    Like GPT-NeoX and MPT tokenizers it has `<|endoftext|>` as eos and no pad token, so the Flamingo tokens
    (`<|endofchunk|>`, `<image>`, `<PAD>`) are added exactly as the original `create_model_and_transforms` does.
    """
    special = ["<|endoftext|>"] + ([bos_token] if bos_token else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    if bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token=bos_token,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------------------------
# Tiny model configurations. The resampler and cross-attention keep the released shapes (8 heads of 64, 64 latents):
# the original code hard-codes them.

FAMILIES = ("llama", "gpt_neox", "mpt", "mosaic_gpt")
# Newer language models, found and wrapped with no code of their own (tests/test_families.py). "llama3" is LLaMA with
# Llama-3's settings (grouped-query attention, llama3 rope scaling); windows of 4 tokens make the sliding-window
# layers of mistral, gemma2 and gemma3_text matter at test lengths.
EXTRA_FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2")
ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES
_SLIDING_WINDOW = 4

# Hub files of MPT and RedPajama have more embedding rows than tokens; the original shrinks them to len(tokenizer).
TINY_LM_VOCAB = 336


def tiny_text_config(family: str, vocab_size: int = TINY_LM_VOCAB, num_layers: int = 4, hidden: int = 64):
    """A 4-layer, 64-wide language model config of the given family (one of `ALL_FAMILIES`)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MptConfig

    if family in EXTRA_FAMILIES:
        return _extra_text_config(family, vocab_size, num_layers, hidden)
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=0,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=False,
        )
    if family == "mpt":
        return MptConfig(
            vocab_size=vocab_size,
            d_model=hidden,
            n_heads=4,
            n_layers=num_layers,
            max_seq_len=512,
            attn_config={"alibi": True, "alibi_bias_max": 8},
            use_cache=True,
        )
    if family == "mosaic_gpt":
        from modeling_flamingo.configuration.configuration_mosaic_gpt import MosaicGPTConfig

        return MosaicGPTConfig(
            vocab_size=vocab_size,
            d_model=hidden,
            n_heads=4,
            n_layers=num_layers,
            max_seq_len=512,
            mlp_ratio=4,
            alibi=True,
            alibi_bias_max=8,
            attn_qk_ln=True,
            low_precision_layernorm=True,
        )
    raise ValueError(f"unknown family {family!r}; choose from {ALL_FAMILIES}")


def _extra_text_config(family: str, vocab_size: int, num_layers: int, hidden: int):
    """`tiny_text_config` of the `EXTRA_FAMILIES`: 4 heads of 16, grouped-query attention (2 key/value heads) where
    the family has it, each family's own head tying (tied: qwen2 as Qwen2-0.5B, gemma2, gemma3_text, gpt2)."""
    import transformers

    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": None,
    }
    head_dim = hidden // 4
    alternating = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (
        num_layers % 2
    )
    if family == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=_SLIDING_WINDOW, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=False)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=_SLIDING_WINDOW,
            layer_types=alternating,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            tie_word_embeddings=True,
        )
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=_SLIDING_WINDOW,
            layer_types=alternating,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    if family == "phi3":
        return transformers.Phi3Config(**common, tie_word_embeddings=False)
    if family == "olmo2":
        return transformers.Olmo2Config(**common, tie_word_embeddings=False)
    # gpt2: learned absolute positions, Conv1D projections, tied head.
    return transformers.GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=4,
        n_positions=512,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )


def tiny_vision_config(image_size: int = 42, hidden: int = 64, num_layers: int = 2):
    """A CLIP vision tower with 14-px patches (9 patch tokens at 42 px), QuickGELU like OpenAI's weights."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        patch_size=14,
        image_size=image_size,
        hidden_act="quick_gelu",
        projection_dim=32,
    )


CROSS_ATTN_EVERY = {"llama": 2, "gpt_neox": 2, "mpt": 4, "mosaic_gpt": 1, **dict.fromkeys(EXTRA_FAMILIES, 2)}


def tiny_flamingo_config(family: str, tokenizer=None, cross_attn_every_n_layers: int | None = None, **kwargs):
    """A tiny FlamingoConfig whose token ids come from `tokenizer` (with the Flamingo tokens added); the CLIP tower
    of `tiny_vision_config` unless `vision_config` is given."""
    from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig

    if tokenizer is None:
        tokenizer = add_flamingo_tokens(make_tiny_tokenizer(bos_token="<s>" if family == "llama" else None))
    text = tiny_text_config(family)
    text.vocab_size = len(tokenizer)
    kwargs.setdefault("vision_config", tiny_vision_config().to_dict())
    return FlamingoConfig(
        text_config=text.to_dict(),
        cross_attn_every_n_layers=cross_attn_every_n_layers or CROSS_ATTN_EVERY[family],
        media_token_id=tokenizer.encode("<image>")[-1],
        eoc_token_id=tokenizer.encode("<|endofchunk|>")[-1],
        **kwargs,
    )


SIGLIP_TOWERS = ("siglip", "siglip2")


def tiny_siglip_vision_config(tower: str = "siglip", hidden: int = 64, num_layers: int = 2):
    """A SigLIP or SigLIP2 (NaFlex) vision tower taking 32-px images in 8-px patches (16 tokens, no CLS token)."""
    from transformers import Siglip2VisionConfig, SiglipVisionConfig

    shape = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": num_layers}
    shape |= {"num_attention_heads": 4, "patch_size": 8}
    if tower == "siglip":
        return SiglipVisionConfig(image_size=32, **shape)
    if tower == "siglip2":
        return Siglip2VisionConfig(num_patches=16, **shape)
    raise ValueError(f"unknown tower {tower!r}; choose from {SIGLIP_TOWERS}")
