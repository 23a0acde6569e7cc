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
import re
import warnings
from typing import IO

import PIL.Image

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class ImageTooLargeError(ValueError):
    """The image declares more pixels than allowed; raised from its header, before it is decoded.

    `width` and `height` are None where only PIL's own limit saw the size (it reports the pixel count only)."""

    def __init__(self, pixels: int, max_pixels: int, width: int | None = None, height: int | None = None):
        size = f"{width}x{height} = {pixels:,}" if width is not None else f"{pixels:,}"
        super().__init__(
            f"the image declares {size} pixels, more than the limit of {max_pixels:,} (--max_image_pixels); "
            "it was not decoded"
        )
        self.pixels, self.max_pixels, self.width, self.height = pixels, max_pixels, width, height


def check_max_image_pixels(value: int | None) -> int | None:
    """Validate a pixel bound given by a user: a positive integer (or None for no bound)."""
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"max_image_pixels must be a positive integer; got {value!r}")
    return value


def _open_lazily(source: bytes | str | os.PathLike | IO[bytes], max_pixels: int | None) -> PIL.Image.Image:
    """`PIL.Image.open` (which reads only the header) and the size check; the pixels are not decoded yet."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # PIL warns from its process-wide limit on, and refuses from twice it (179 MP by default): our bound, checked
        # below, is what decides; PIL's refusal is reported the same way.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(source)
        except PIL.Image.DecompressionBombError as error:
            found = re.search(r"\((\d+) pixels\)", str(error))
            pixels = int(found.group(1)) if found else 2 * (PIL.Image.MAX_IMAGE_PIXELS or 0) + 1
            limit = 2 * PIL.Image.MAX_IMAGE_PIXELS
            raise ImageTooLargeError(pixels, limit if max_pixels is None else min(max_pixels, limit)) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(width * height, max_pixels, width, height)
    return image


def read_image_size(
    source: bytes | str | os.PathLike | IO[bytes], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding a pixel; the same checks as `open_image` (a format
    PIL identifies, at most `max_pixels` pixels) and the same exceptions."""
    with _open_lazily(source, max_pixels) as image:
        return image.size


def open_image(
    source: bytes | str | os.PathLike | IO[bytes], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Open and decode an image whose declared size is at most `max_pixels` (None: no bound of ours).

    Args:
        source: encoded bytes, a path, or a binary file object.
        max_pixels: largest `width * height` accepted, checked from the header before decoding. PIL's own refusal
            (from twice `PIL.Image.MAX_IMAGE_PIXELS`, 179 MP by default) still applies above it, also raised as
            `ImageTooLargeError`: raise that process-wide setting to decode larger images.
    Returns:
        The decoded image (mode as stored; the caller converts it). Its file is closed.
    Raises:
        ImageTooLargeError: the header declares more pixels than `max_pixels`.
        Any exception of PIL for a file that is not an image or does not decode (`UnidentifiedImageError`,
        `OSError`, `SyntaxError`, `ValueError`, ...): callers that skip bad samples catch
        `Exception`.
    """
    image = _open_lazily(source, max_pixels)
    try:
        image.load()  # a single-frame image's file is closed by load()
    except BaseException:
        image.close()
        raise
    return image
