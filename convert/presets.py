"""The released OpenFlamingo checkpoints and what each needs besides its `checkpoint.pt`."""

from __future__ import annotations

from dataclasses import dataclass

# Every release uses OpenAI's CLIP ViT-L/14; this repo holds the same weights in transformers' format.
CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
# The MPT-7B copy OpenFlamingo-9B was trained with; later revisions of that repo changed the remote code and files.
MPT_7B_REVISION = "68e1a8e0ebb9b30f3c45c1ef6195980f29063ae2"


@dataclass(frozen=True)
class Preset:
    """One released model.

    Attributes:
        repo_id: hub repo holding the original `checkpoint.pt`.
        language_model: hub repo of the language model (its tokenizer is the model's tokenizer), or None when the
            user must supply it (`--language-model`, the LLaMA-7B licence).
        language_model_revision: revision to fetch the language model (and tokenizer) at; None for the default branch.
        cross_attn_every_n_layers: interval of the gated cross-attention blocks.
        code_line: "v2" (open_flamingo 2.x checkpoints) or "v1" (the legacy 0.1 LLaMA checkpoint).
        vision_model: HF CLIP repo of the vision tower.
    """

    repo_id: str
    language_model: str | None
    language_model_revision: str | None
    cross_attn_every_n_layers: int
    code_line: str = "v2"
    vision_model: str = CLIP_VIT_L14


PRESETS: dict[str, Preset] = {
    p.repo_id: p
    for p in (
        Preset("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b", None, 1),
        Preset(
            "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
            "anas-awadalla/mpt-1b-redpajama-200b-dolly",
            None,
            1,
        ),
        Preset("openflamingo/OpenFlamingo-4B-vitl-rpj3b", "togethercomputer/RedPajama-INCITE-Base-3B-v1", None, 2),
        Preset(
            "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
            "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
            None,
            2,
        ),
        Preset("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", MPT_7B_REVISION, 4),
        Preset("openflamingo/OpenFlamingo-9B-deprecated", None, None, 4, code_line="v1"),
    )
}


def get_preset(repo_id: str) -> Preset | None:
    """The preset of a released repo id (exact spelling, or differing only in case as the hub treats ids), or None."""
    if repo_id in PRESETS:
        return PRESETS[repo_id]
    lowered = {k.lower(): v for k, v in PRESETS.items()}
    return lowered.get(repo_id.lower())
