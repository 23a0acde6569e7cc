"""Images of the training pipelines: bounded decoding, header checks, pixel values, flips."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor

from modeling_flamingo.processing.image_loading import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    open_image,
    read_image_size,
)
from modeling_flamingo.training.data.skips import SkipSample


def decode_rgb_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode image bytes into an RGB PIL image as the original does (`Image.open`, `load`, `convert("RGB")`), through
    `open_image`: an image declaring more than `max_pixels` pixels is refused from its header, before decoding.

    Raises:
        SkipSample: `image_too_large` (also PIL's own refusal beyond twice `PIL.Image.MAX_IMAGE_PIXELS`, 179 MP by
            default, whatever `max_pixels`), or `undecodable_image`.
    """
    try:
        with open_image(data, max_pixels) as image:
            return image.convert("RGB")
    except ImageTooLargeError as error:
        raise SkipSample("image_too_large", str(error)) from None
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ValueError...)
        raise SkipSample("undecodable_image", repr(error)) from None


def check_resized_size(width: int, height: int, max_pixels: int | None, image_processor: Any) -> None:
    """Refuse (`SkipSample("image_too_large")`) an image that the image processor would resize to more than
    `max_pixels` pixels.

    Resizing the shortest side to 224 blows up images of extreme aspect ratio: a 100-byte PNG of 50000x1 pixels
    would take 224x11,200,000 pixels (10 GB). Checked where the processor says how it resizes: a transformers image
    processor with `size["shortest_edge"]` (`FlamingoImageProcessor`, `CLIPImageProcessor`); another callable's
    resize is its own business."""
    if max_pixels is None or not isinstance(image_processor, BaseImageProcessor) or not image_processor.do_resize:
        return
    size = image_processor.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if not shortest or min(width, height) < 1:
        return
    short, long = sorted((width, height))
    resized = shortest * int(shortest * long / short)  # as the processor (and torchvision) compute the long side
    if resized > max_pixels:
        raise SkipSample(
            "image_too_large",
            f"resizing the {width}x{height} image to a shortest side of {shortest} gives {resized:,} pixels, more "
            f"than the limit of {max_pixels:,} (--max_image_pixels)",
        )


def check_image_header(data: bytes, max_pixels: int | None, image_processor: Any) -> None:
    """Check from its header, without decoding a pixel, that `data` is an image of a format PIL identifies, of at
    most `max_pixels` pixels (the check `open_image` makes before decoding), and not resized by the image processor
    to more (`check_resized_size`). Raises `SkipSample` (`image_too_large`, `undecodable_image`)."""
    try:
        width, height = read_image_size(data, max_pixels)
    except ImageTooLargeError as error:
        raise SkipSample("image_too_large", str(error)) from None
    except Exception as error:
        raise SkipSample("undecodable_image", repr(error)) from None
    check_resized_size(width, height, max_pixels, image_processor)


def pixel_values_of(images: list[PIL.Image.Image], image_processor: Any) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values of RGB images, with a transformers image processor (e.g.
    `FlamingoImageProcessor`, batched) or a callable mapping one PIL image to a (3, H, W) tensor (e.g. open_clip's
    transform)."""
    if isinstance(image_processor, BaseImageProcessor):
        return torch.as_tensor(np.stack(image_processor(images, return_tensors=None)["pixel_values"]))
    return torch.stack([image_processor(image) for image in images])


def maybe_flip(pixel_values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip the whole tensor horizontally with probability 0.5 (one draw, as torchvision's RandomHorizontalFlip
    applied to a stacked tensor)."""
    if generator is not None and torch.rand(1, generator=generator).item() < 0.5:
        return pixel_values.flip(-1)
    return pixel_values
