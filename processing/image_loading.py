"""Opening untrusted image files and bytes with a bound on their size, checked before any pixel is decoded.

A few hundred kilobytes of PNG can declare 30000x30000 pixels: decoding it takes gigabytes of memory and many seconds.
PIL's own guard (`PIL.Image.MAX_IMAGE_PIXELS`) is a process-wide setting that the original training code raises to
1e9 pixels. Here every image is opened lazily (PIL then reads only the header), its declared size is compared with a
per-call bound, and only then is it decoded. The global PIL setting is never changed.

The default bound, `DEFAULT_MAX_IMAGE_PIXELS` (50 megapixels, about 150 MB once decoded to RGB), is far above the
photographs of the training and evaluation sets (COCO, Flickr30K, VQAv2, ImageNet, LAION and MMC4 images are a few
megapixels) and far below the 1e9 pixels the original allows. The training and evaluation command lines expose it as
`--max_image_pixels`.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO

import PIL.Image

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class ImageTooLargeError(ValueError):
    """The image declares more pixels than allowed; raised before it is decoded."""

    def __init__(self, width: int, height: int, max_pixels: int):
        super().__init__(
            f"the image declares {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (--max_image_pixels); it was not decoded"
        )
        self.width, self.height, self.max_pixels = width, height, max_pixels


def check_max_image_pixels(value: int | None) -> int | None:
    """Validate a pixel bound given by a user: a positive integer (or None for no bound)."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"max_image_pixels must be a positive integer; got {value!r}")
    return value


def open_image(
    source: bytes | str | os.PathLike | IO[bytes], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Open and decode an image whose declared size is at most `max_pixels` (None: no bound).

    Args:
        source: encoded bytes, a path, or a binary file object.
        max_pixels: largest `width * height` accepted, checked from the header before decoding.
    Returns:
        The decoded image (mode as stored; the caller converts it). Its file is closed.
    Raises:
        ImageTooLargeError: the header declares more pixels than `max_pixels`.
        Any exception of PIL for a file that is not an image or does not decode (`UnidentifiedImageError`,
        `OSError`, `SyntaxError`, `ValueError`, ...): callers that skip bad samples catch `Exception`.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # PIL warns from its global limit on (and raises from twice it, 179 MP by default, whatever our bound): our
        # own bound, checked below, is what decides.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        image = PIL.Image.open(source)
        try:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(width, height, max_pixels)
            image.load()  # a single-frame image's file is closed by load()
        except BaseException:
            image.close()
            raise
    return image

