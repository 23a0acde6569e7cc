"""Prompts as the model sees them, built from the page's fields, in the formats OpenFlamingo was evaluated with.

- few-shot captioning: `<image>Output:{caption}<|endofchunk|>` per demonstration, then `<image>Output:`;
- few-shot VQA: `<image>Question:{question} Short answer:{answer}<|endofchunk|>` per demonstration, then
  `<image>Question:{question} Short answer:`;
- free: the user's own text, with one `<image>` per image (in order) and `<|endofchunk|>` where they want.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "<image>"
END_OF_CHUNK = "<|endofchunk|>"

CAPTIONING = "Few-shot captioning"
VQA = "Few-shot VQA"
FREE = "Free interleaved prompt"
MODES = (CAPTIONING, VQA, FREE)


class InputError(ValueError):
    """A request the app cannot run; its message is shown as it is, in the page and in the API."""


@dataclass
class Demonstration:
    """One (image, text) pair of the page: `question` is used in VQA mode, `text` is the caption or the answer."""

    image: str | None
    text: str = ""
    question: str = ""

    def is_empty(self) -> bool:
        return self.image is None and not self.text.strip() and not self.question.strip()


def _clean(text: str) -> str:
    return " ".join(text.split())


def build_prompt(
    mode: str,
    demonstrations: list[Demonstration],
    query_image: str | None,
    query_question: str = "",
    free_text: str = "",
) -> tuple[str, list[str]]:
    """The prompt and its images, in prompt order.

    Args:
        mode: one of `MODES`.
        demonstrations: the page's demonstration slots; empty slots are skipped.
        query_image: the image to caption or to ask about (in free mode: appended after the demonstrations' images).
        query_question: the question about the query image (VQA).
        free_text: the prompt of the free mode, with `<image>` markers.

    Returns:
        `(prompt, image_paths)`. In free mode the images are those of the filled slots, demonstrations then query.

    Raises:
        InputError: a half-filled demonstration, a missing query image or question, an empty free prompt, or
            `<image>` / `<|endofchunk|>` typed into a caption or question.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    filled = [(number, demo) for number, demo in enumerate(demonstrations, 1) if not demo.is_empty()]
    if mode == FREE:
        if not free_text.strip():
            raise InputError("The prompt is empty: write a prompt, with one <image> where each image goes.")
        images = [demo.image for _, demo in filled if demo.image is not None]
        return free_text, images + ([query_image] if query_image is not None else [])

    fields = [text for _, demo in filled for text in (demo.text, demo.question)] + [query_question]
    if any(IMAGE in text or END_OF_CHUNK in text for text in fields):
        raise InputError(
            f"Captions and questions cannot contain {IMAGE} or {END_OF_CHUNK}: the app places them; use the free "
            "mode to write them yourself."
        )
    parts, images = [], []
    for number, demo in filled:
        if demo.image is None:
            raise InputError(f"Demonstration {number} has text but no image: add its image or clear its text.")
        answer = _clean(demo.text)
        if not answer:
            what = "an answer" if mode == VQA else "a caption"
            raise InputError(f"Demonstration {number} has an image but no {what.split()[-1]}: write {what}.")
        if mode == VQA:
            if not demo.question.strip():
                raise InputError(f"Demonstration {number} has no question: write the question its answer answers.")
            parts.append(f"{IMAGE}Question:{_clean(demo.question)} Short answer:{answer}{END_OF_CHUNK}")
        else:
            parts.append(f"{IMAGE}Output:{answer}{END_OF_CHUNK}")
        images.append(demo.image)
    if query_image is None:
        raise InputError("Add a query image: the image the model should caption or answer about.")
    if mode == VQA:
        if not query_question.strip():
            raise InputError("Write the question to ask about the query image.")
        parts.append(f"{IMAGE}Question:{_clean(query_question)} Short answer:")
    else:
        parts.append(f"{IMAGE}Output:")
    return "".join(parts), images + [query_image]
