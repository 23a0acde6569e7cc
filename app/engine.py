"""The model behind the page and the API: input checks, whole-answer generation, and token streaming.

Streaming runs `model.generate` in a worker thread with transformers' `TextIteratorStreamer`; the caller iterates
over the decoded pieces. Setting the caller's stop event (the page's stop button) or closing the iterator (the content
filter flagged the answer, a client went away) stops the worker at its next token through a stopping criterion.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.app.prompt import IMAGE, InputError
from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, open_image
from modeling_flamingo.weight_dtypes import SHORT_DTYPES  # --precision name -> weights dtype, as evaluation

logger = logging.getLogger(__name__)

# Documented in docs/app.md: 8 images is a 7-shot prompt, more than the 4 shots the model cards show.
DEFAULT_MAX_IMAGES = 8
MAX_NEW_TOKENS = 256
MAX_BEAMS = 8


@dataclass
class GenerationSettings:
    """What the page's settings and the API's arguments control."""

    max_new_tokens: int = 20
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0

    def check(self) -> None:
        """Raises `InputError` for values out of the app's ranges."""
        for name, value, top in (
            ("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS),
            ("num_beams", self.num_beams, MAX_BEAMS),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not float(value).is_integer()
                or not 1 <= value <= top
            ):
                raise InputError(f"{name} must be a whole number from 1 to {top}; got {value!r}.")
        if self.do_sample and not 0 < self.temperature <= 10:
            raise InputError(f"temperature must be in (0, 10]; got {self.temperature!r}.")

    def generate_kwargs(self) -> dict:
        kwargs = {
            "max_new_tokens": int(self.max_new_tokens),
            "num_beams": int(self.num_beams),
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs["temperature"] = float(self.temperature)
        return kwargs


def context_length(model: FlamingoForConditionalGeneration) -> int | None:
    """The number of positions the language model was built (and trained) for, if its config says."""
    config = model.config.text_config
    for name in ("max_position_embeddings", "max_seq_len", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(
    name_or_path: str, precision: str = "fp32", device_map: str | None = None
) -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """Load a converted folder or hub id (an original OpenFlamingo release is converted once, as `from_pretrained`
    does); without a device map the model goes to the GPU when there is one."""
    model = FlamingoForConditionalGeneration.from_pretrained(
        name_or_path, dtype=SHORT_DTYPES[precision], device_map=device_map
    )
    if device_map is None and torch.cuda.is_available():
        model.to("cuda")
    processor = FlamingoProcessor.from_pretrained(name_or_path)
    return model.eval(), processor


class _StopOnEvent(StoppingCriteria):
    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class FlamingoEngine:
    """Checks requests and generates for them.

    Args:
        model: the model, in eval mode, on one device or dispatched with a device map.
        processor: its processor.
        max_images: most images in one prompt.
        max_image_pixels: most pixels an uploaded image may declare (checked before it is decoded).
    """

    def __init__(
        self,
        model: FlamingoForConditionalGeneration,
        processor: FlamingoProcessor,
        max_images: int = DEFAULT_MAX_IMAGES,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.model = model.eval()
        # The model hands the image conditioning to its cross-attention layers through layer attributes for the
        # length of one forward call (`FlamingoForConditionalGeneration.conditioned_on`): forward calls of concurrent
        # generations must not overlap. Their steps take turns instead (inputs and caches stay per generation).
        forward, lock = model.forward, threading.Lock()

        @functools.wraps(forward)
        def one_forward_at_a_time(*args, **kwargs):
            with lock:
                return forward(*args, **kwargs)

        model.forward = one_forward_at_a_time
        self.processor = processor
        self.max_images = max_images
        self.max_image_pixels = max_image_pixels
        self.context_length = context_length(model)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first one under a device map)."""
        return self.model.get_input_embeddings().weight.device

    def open_images(self, paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
        """Open uploaded files with the project's bounded opener; one `InputError` naming the file otherwise."""
        images = []
        for number, path in enumerate(paths, 1):
            name = os.path.basename(os.fspath(path))
            try:
                image = open_image(path, self.max_image_pixels)
            except ImageTooLargeError as error:
                raise InputError(f"Image {number} ({name}) is too large: {error}. Upload a smaller image.") from None
            except Exception as error:  # PIL raises several types for files that are not images
                raise InputError(
                    f"Image {number} ({name}) is not an image the app can read ({type(error).__name__}); upload a "
                    "PNG, JPEG, WebP or GIF file."
                ) from None
            images.append(image.convert("RGB"))
        return images

    def prepare(self, prompt: str, image_paths: Sequence[str | os.PathLike], settings: GenerationSettings) -> dict:
        """Check a request and build the model's inputs.

        Returns:
            `input_ids` and `attention_mask` (1, L) and float32 `pixel_values` (1, T_img, 1, 3, H, W), on the
            model's input device (the model casts the pixels to its vision tower's dtype).

        Raises:
            InputError: see docs/app.md for the list of checks.
        """
        settings.check()
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("The prompt is empty: write a prompt, with one <image> where each image goes.")
        slots = prompt.count(IMAGE)
        if slots == 0:
            raise InputError(f"The prompt has no {IMAGE}: put one {IMAGE} where each image goes.")
        if len(image_paths) > self.max_images:
            raise InputError(
                f"{len(image_paths)} images were given; this app takes at most {self.max_images} per prompt "
                "(--max_images). Remove some demonstrations."
            )
        if slots > len(image_paths):
            raise InputError(
                f"The prompt has {slots} {IMAGE} slots but {len(image_paths)} images were given: add an image for "
                f"every {IMAGE}, or remove the {IMAGE} that has none."
            )
        if slots < len(image_paths):
            raise InputError(
                f"{len(image_paths)} images were given but the prompt has only {slots} {IMAGE} slots: the model would "
                f"never see the extra images. Add one {IMAGE} per image, or remove the images."
            )
        images = self.open_images(image_paths)
        batch = self.processor(images=[images], text=[prompt], return_tensors="pt")
        length = batch["input_ids"].shape[1]
        if self.context_length is not None and length + settings.max_new_tokens > self.context_length:
            raise InputError(
                f"The prompt is {length} tokens; with {settings.max_new_tokens} new tokens it exceeds the model's "
                f"context of {self.context_length} tokens. Shorten the prompt, remove demonstrations or lower max "
                "new tokens."
            )
        return dict(batch.to(self.device))

    def _decode(self, output_ids: torch.LongTensor, prompt_length: int) -> str:
        return self.processor.batch_decode(output_ids, skip_special_tokens=True, prompt_length=prompt_length)[0]

    def generate(self, prompt: str, image_paths: Sequence[str | os.PathLike], settings: GenerationSettings) -> str:
        """The whole answer (new tokens only, special tokens removed)."""
        inputs = self.prepare(prompt, image_paths, settings)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **settings.generate_kwargs())
        return self._decode(output, inputs["input_ids"].shape[1])

    def stream(
        self,
        prompt: str,
        image_paths: Sequence[str | os.PathLike],
        settings: GenerationSettings,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield the answer's decoded pieces as they are generated (checks run before the first piece).

        Beam search keeps several candidates until the end, so with `num_beams > 1` the answer comes as one piece.
        Setting `stop` (e.g. from another thread: the page's stop button), or closing the iterator, stops generation
        at the next token.
        """
        inputs = self.prepare(prompt, image_paths, settings)
        if settings.num_beams > 1:
            with torch.inference_mode():
                output = self.model.generate(**inputs, **settings.generate_kwargs())
            yield self._decode(output, inputs["input_ids"].shape[1])
            return
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()  # the iterator was closed or ended: the caller's `stop` stays the caller's
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        **settings.generate_kwargs(),
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList(
                            [_StopOnEvent(*(event for event in (closed, stop) if event is not None))]
                        ),
                    )
            except BaseException as error:  # reported to the caller below, after the streamer is closed
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=work, name="flamingo-generate", daemon=True)
        worker.start()
        finished = False
        try:
            yield from streamer
            finished = True
        finally:
            stopped_early = not finished or (stop is not None and stop.is_set())
            closed.set()
            worker.join()
            if stopped_early:
                logger.info("generation stopped early (stop button, content filter, or the client left)")
        if failure:
            raise failure[0]
