"""Image processor for OpenFlamingo: open_clip's evaluation transform, reproduced with PIL."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import PIL.Image
from transformers import AutoImageProcessor
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
    is_valid_image,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
from transformers.utils import TensorType

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig, vision_image_size

# Vision towers preprocessed as their own image processors do (square resize, their filter, mean and std) rather than
# with open_clip's transform.
_TOWER_IMAGE_PROCESSORS = {
    "siglip_vision_model": SiglipImageProcessorPil,
    "siglip2_vision_model": Siglip2ImageProcessorPil,
}


def image_problem(image: ImageInput | None) -> str | None:
    """Why `image` cannot be preprocessed, as the end of a sentence naming it, or None when it can be.

    Catches `None`, images without pixels (a 0x0 PIL image, an array with a zero-length axis) and floating-point
    arrays or tensors holding NaN or infinite values (they would become arbitrary bytes when converted to 8 bits).
    """
    if image is None:
        return "is None"
    if isinstance(image, PIL.Image.Image):
        width, height = image.size
        return f"has no pixels (size {width}x{height})" if width == 0 or height == 0 else None
    if hasattr(image, "is_floating_point"):  # torch.Tensor, without importing torch
        if image.numel() == 0:
            return f"has no pixels (shape {tuple(image.shape)})"
        if image.is_floating_point() and not bool(image.isfinite().all()):
            return "contains NaN or infinite values"
    elif isinstance(image, np.ndarray):
        if image.size == 0:
            return f"has no pixels (shape {tuple(image.shape)})"
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            return "contains NaN or infinite values"
    return None


def _to_pil(image: ImageInput, input_data_format: str | ChannelDimension | None = None) -> PIL.Image.Image:
    """Convert a numpy array or torch tensor to a PIL image; PIL images are returned unchanged (same object).

    Arrays may be (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}. `uint8` values are used as they are, `bool`
    becomes 0/255, other integer types must lie in [0, 255] and floating types in [0, 1] (scaled by 255 and rounded).
    """
    if isinstance(image, PIL.Image.Image):
        return image
    if hasattr(image, "detach"):  # torch.Tensor, without importing torch
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Unsupported image type {type(image).__name__}: expected a PIL image, numpy array or tensor.")
    if image.ndim == 3:
        if input_data_format is None:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        if ChannelDimension(input_data_format) == ChannelDimension.FIRST:
            image = np.moveaxis(image, 0, -1)
        if image.shape[-1] == 1:
            image = image[..., 0]
    elif image.ndim != 2:
        raise ValueError(f"An image array must have 2 or 3 dimensions, got shape {tuple(image.shape)}.")

    if image.dtype == np.uint8:
        pass
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.integer):
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ValueError("Integer image arrays must hold values in [0, 255]; convert them to a PIL image first.")
        image = image.astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("A floating-point image array contains NaN or infinite values.")
        if image.size and (image.min() < 0.0 or image.max() > 1.0):
            raise ValueError(
                "Floating-point image arrays must hold values in [0, 1]; convert them to a PIL image first."
            )
        image = np.round(image.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"Unsupported image array dtype {image.dtype}.")
    return PIL.Image.fromarray(np.ascontiguousarray(image))


class FlamingoImageProcessor(CLIPImageProcessorPil):
    r"""
    Image processor reproducing open_clip's evaluation transform (`open_clip.image_transform(224, is_train=False)`,
    open_clip 2.20, the one OpenFlamingo was trained and evaluated with) exactly on PIL images:

    1. resize with PIL, in the image's own mode, so the shortest side becomes `size["shortest_edge"]` and the long
       side `int(shortest_edge * long / short)` (truncated, as torchvision computes it); bicubic, except that PIL
       itself resizes "P" (palette) and "1" images with nearest neighbour; "RGBA"/"LA" are resized with PIL's
       premultiplied alpha;
    2. centre crop to `crop_size` with offsets `int(round((h - crop_h) / 2))` (round half to even, where
       `CLIPImageProcessor` floors); a crop larger than the image pads with zeros, as torchvision does;
    3. convert to RGB with `PIL.Image.convert("RGB")`: alpha is dropped without compositing, "L" is replicated,
       "CMYK", "I;16", "I", "F"... use PIL's own conversions;
    4. scale to [0, 1] and normalise with the OpenAI CLIP mean and std, in float32.

    The order matters: converting to RGB before resizing (what `CLIPImageProcessor` does) changes palette images
    (bicubic instead of nearest neighbour) and alpha images (no premultiplication).

    Inputs: PIL images are the exact-parity path. Numpy arrays and torch tensors ((H, W), (H, W, C) or (C, H, W),
    C in {1, 3, 4}) are first converted to a PIL image (see `_to_pil`: uint8 as is, floats in [0, 1] scaled by 255
    and rounded) and then follow the same path, so they match open_clip applied to that PIL image. Strings naming a
    local file are opened with `PIL.Image.open` without any conversion, as OpenFlamingo's evaluation code does;
    URLs are fetched by transformers' `load_image` (which applies the EXIF orientation and converts to RGB).

    The output `pixel_values` are float32 of shape (num_images, 3, crop_height, crop_width).

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"shortest_edge": 224}`):
            `{"shortest_edge": n}` (aspect-preserving, the open_clip transform) or `{"height": h, "width": w}`. An
            int means `{"shortest_edge": n}`. For a model whose `vision_config.image_size` is `n`, use
            `FlamingoImageProcessor(size=n, crop_size=n)` (see `from_flamingo_config`).
        crop_size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Centre crop size; an int means a square.
        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`):
            PIL filter of the resize.
        image_mean, image_std (`list[float]`, *optional*, default to the OpenAI CLIP values):
            Normalisation constants.
        **kwargs: the other `ImagesKwargs` of transformers image processors (`do_resize`, `do_center_crop`,
            `do_rescale`, `rescale_factor`, `do_normalize`, `do_convert_rgb`...).
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    @classmethod
    def from_flamingo_config(cls, config: FlamingoConfig, **kwargs) -> FlamingoImageProcessor:
        """The preprocessing of the model's vision tower, sized for its images (`vision_image_size`).

        CLIP: open_clip's transform (shortest side, then square centre crop; OpenAI CLIP mean and std), what
        OpenFlamingo was trained with. SigLIP and SigLIP2: what their own image processors do to a square image,
        resize to the square (no crop, the aspect ratio is not kept) with their resampling filter, mean and std
        (`SiglipImageProcessorPil` / `Siglip2ImageProcessorPil`: 0.5 and 0.5). The saved `preprocessor_config.json`
        records these settings, so `FlamingoProcessor.from_pretrained` gives the tower's preprocessing back.
        """
        image_size = vision_image_size(config.vision_config)
        square = {"height": image_size, "width": image_size}
        model_type = config.vision_config.model_type
        if model_type in _TOWER_IMAGE_PROCESSORS:
            tower = _TOWER_IMAGE_PROCESSORS[model_type]
            settings = {"size": square, "do_center_crop": False, "resample": tower.resample}
            settings |= {"image_mean": list(tower.image_mean), "image_std": list(tower.image_std)}
            return cls(**{**settings, "crop_size": square, **kwargs})
        return cls(size={"shortest_edge": image_size}, crop_size=square, **kwargs)

    def fetch_images(self, image_url_or_urls: str | list | ImageInput):
        """Open local image files as they are (no EXIF transpose, no RGB conversion), keeping any list nesting."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(x) for x in image_url_or_urls]
        if image_url_or_urls is None:
            return None  # left for the caller to name (which sample, which image)
        if isinstance(image_url_or_urls, (str, os.PathLike)) and os.path.isfile(image_url_or_urls):
            image = PIL.Image.open(image_url_or_urls)
            image.load()
            return image
        return super().fetch_images(image_url_or_urls)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        """Flatten a single image or a (nested) list of images into a flat list, accepting 2-D arrays too."""
        images = self.fetch_images(images)
        flat = []

        def _collect(item):
            if isinstance(item, (list, tuple)):
                for sub in item:
                    _collect(sub)
            elif item is None:
                flat.append(item)  # refused below, with its position
            elif is_valid_image(item):
                if not isinstance(item, PIL.Image.Image) and item.ndim == 4:
                    flat.extend(list(item))  # a stacked batch of images
                else:
                    flat.append(item)
            else:
                raise TypeError(f"Unsupported image type {type(item).__name__}.")

        _collect(images)
        for index, image in enumerate(flat):
            problem = image_problem(image)
            if problem:
                raise ValueError(f"Image {index} (0-based) {problem}.")
        return flat

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> PIL.Image.Image:
        """Bring one input to a PIL image in its own mode: the RGB conversion must wait until after the crop."""
        return _to_pil(image, input_data_format=input_data_format)

    @staticmethod
    def _resize_pil(image: PIL.Image.Image, size: SizeDict, resample: PILImageResampling | int) -> PIL.Image.Image:
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"An image has no pixels (size {width}x{height}).")
        if size.shortest_edge is not None and size.longest_edge is None:
            # torchvision `Resize(int)`: the long side is truncated, not rounded.
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
            new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        elif size.height is not None and size.width is not None:
            new_height, new_width = size.height, size.width
        else:
            raise ValueError(
                f"FlamingoImageProcessor supports `size` as {{'shortest_edge': n}} or {{'height': h, 'width': w}}, "
                f"got {dict(size)}."
            )
        if (new_width, new_height) == (width, height):
            return image  # torchvision returns the image untouched in this case
        return image.resize((new_width, new_height), PILImageResampling(resample))

    @staticmethod
    def _center_crop_pil(image: PIL.Image.Image, crop_size: SizeDict) -> PIL.Image.Image:
        if crop_size.height is None or crop_size.width is None:
            raise ValueError(f"`crop_size` must have 'height' and 'width', got {dict(crop_size)}.")
        width, height = image.size
        crop_height, crop_width = crop_size.height, crop_size.width
        # torchvision `CenterCrop`: a dimension smaller than the crop is zero-padded by floor(diff / 2) before and the
        # rest after; a larger one is cropped at int(round(diff / 2)) (Python rounds half to even). PIL's `crop` fills
        # the area outside the image with zeros, which is the same padding.
        top = -((crop_height - height) // 2) if crop_height > height else int(round((height - crop_height) / 2.0))
        left = -((crop_width - width) // 2) if crop_width > width else int(round((width - crop_width) / 2.0))
        return image.crop((left, top, left + crop_width, top + crop_height))

    def _preprocess(
        self,
        images: list[PIL.Image.Image],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Iterable[float] | None,
        image_std: float | Iterable[float] | None,
        do_pad: bool | None = None,
        pad_size: SizeDict | None = None,
        return_tensors: str | TensorType | None = None,
        do_convert_rgb: bool | None = None,
        data_format: str | ChannelDimension | None = ChannelDimension.FIRST,
        **kwargs,
    ) -> BatchFeature:
        """Resize and crop in the image's own mode, then convert to RGB, scale and normalise (float32)."""
        resample = self.resample if resample is None else resample
        processed = []
        for image in images:
            if do_resize:
                image = self._resize_pil(image, size, resample)
            if do_center_crop:
                image = self._center_crop_pil(image, crop_size)
            if do_convert_rgb:
                image = image.convert("RGB")
            array = np.asarray(image)
            array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
            array = array.astype(np.float32)
            if do_rescale:
                # x / 255 as torchvision's ToTensor computes it (1 / (1 / 255) == 255.0 exactly in float64).
                array = array / np.float32(1.0 / rescale_factor)
            if do_normalize:
                num_channels = array.shape[0]
                mean = np.broadcast_to(np.asarray(image_mean, dtype=np.float32), (num_channels,))[:, None, None]
                std = np.broadcast_to(np.asarray(image_std, dtype=np.float32), (num_channels,))[:, None, None]
                array = (array - mean) / std
            processed.append(array)

        if do_pad:
            processed = self.pad(processed, pad_size=pad_size)
        if data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST:
            processed = [np.moveaxis(array, 0, -1) for array in processed]
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


# `FlamingoProcessor.from_pretrained` loads its image processor through `AutoImageProcessor`, which resolves the
# saved `image_processor_type` only for registered classes. Both backends map to this (PIL-only) class so that the
# default torchvision preference does not log a fallback warning.
AutoImageProcessor.register(
    FlamingoConfig,
    image_processor_classes={"pil": FlamingoImageProcessor, "torchvision": FlamingoImageProcessor},
    exist_ok=True,
)

__all__ = ["FlamingoImageProcessor", "image_problem"]
