"""The Flamingo tokens a pipeline needs, checked once on the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN, MEDIA_TOKEN


@dataclass(frozen=True)
class FlamingoTokens:
    """The ids a pipeline needs, read once from the tokenizer (`check_flamingo_tokenizer`)."""

    media_token_id: int
    eoc_token_id: int
    pad_token_id: int
    eos_token: str


def check_flamingo_tokenizer(tokenizer: PreTrainedTokenizerBase) -> FlamingoTokens:
    """Check that the tokenizer has `<image>`, `<|endofchunk|>` (each one token), a pad and an eos token.

    Raises:
        ValueError: naming what is missing and how to add it (`add_flamingo_tokens` / `FlamingoProcessor`).
    """
    ids = {}
    for token in (MEDIA_TOKEN, EOC_TOKEN):
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if token not in tokenizer.get_vocab() or len(encoded) != 1:
            raise ValueError(
                f"The tokenizer has no {token} token (it encodes to {len(encoded)} ids): add the Flamingo tokens "
                "with `modeling_flamingo.processing.processing_flamingo.add_flamingo_tokens(tokenizer)` or use "
                "the tokenizer of a FlamingoProcessor."
            )
        ids[token] = encoded[0]
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token: `add_flamingo_tokens` adds `<PAD>` as the original does.")
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no eos token; the original templates end every sample with it.")
    return FlamingoTokens(ids[MEDIA_TOKEN], ids[EOC_TOKEN], tokenizer.pad_token_id, tokenizer.eos_token)
