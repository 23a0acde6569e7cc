"""`processing.image_loading`: the one bounded image opener used by training data, evaluation and the app."""

from __future__ import annotations

import io

import PIL.Image
import pytest
from train_data_helpers import png_declaring

from modeling_flamingo.processing.image_loading import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    check_max_image_pixels,
    open_image,
    read_image_size,
)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("source", ["bytes", "path", "file"])
def test_open_image_decodes_within_the_bound_from_any_source(tmp_path, source):
    data = _png(30, 20)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    given = {"bytes": data, "path": path, "file": io.BytesIO(data)}[source]
    image = open_image(given, max_pixels=600)  # the bound is inclusive: 30 x 20 = 600
    assert image.size == (30, 20) and image.getpixel((0, 0)) == (10, 20, 30)
    assert read_image_size(data, max_pixels=600) == (30, 20)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = png_declaring(30000, 30000)  # ~110 KB, 900 MP once decoded
    assert len(bomb) < 1_000_000
    global_limit = PIL.Image.MAX_IMAGE_PIXELS
    for read in (open_image, read_image_size):
        # PIL itself refuses from 179 MP whatever the bound: reported as ours, with the size PIL saw.
        with pytest.raises(ImageTooLargeError, match=r"declares 900,000,000 pixels.*50,000,000 \(--max_image_pixels"):
            read(bomb, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        with pytest.raises(
            ImageTooLargeError, match=r"declares 12000x12000 = 144,000,000 pixels, more than the limit"
        ):
            read(png_declaring(12000, 12000), max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    assert PIL.Image.MAX_IMAGE_PIXELS == global_limit  # never changed, not even for the call
    with pytest.raises(ImageTooLargeError):
        open_image(_png(30, 20), max_pixels=599)


def test_not_an_image_raises_pil_error_and_bad_bounds_are_refused():
    with pytest.raises(PIL.UnidentifiedImageError):
        open_image(b"not an image at all")
    for bad in (0, -5, 1.5, "10"):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
            check_max_image_pixels(bad)
    assert check_max_image_pixels(None) is None and check_max_image_pixels(7) == 7
