"""Processor for OpenFlamingo: interleaved `<image>` text prompts and their images."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import PIL.Image
from transformers import AutoProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput, is_valid_image
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import TensorType

from modeling_flamingo.configuration.configuration_flamingo import FlamingoConfig
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor, image_problem

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def _is_single_image(item: Any) -> bool:
    """A PIL image, a 2-D/3-D array or tensor, or a path/URL string (one image, not a batch)."""
    if isinstance(item, (str, os.PathLike, PIL.Image.Image)):
        return True
    return is_valid_image(item) and getattr(item, "ndim", 0) in (2, 3)


def _as_id_rows(sequences: Any) -> tuple[list[list[int]], bool]:
    """Token ids as a list of rows, and whether the input was a single (1-D) sequence."""
    if hasattr(sequences, "tolist"):  # torch.Tensor, np.ndarray
        sequences = sequences.tolist()
    if isinstance(sequences, int):
        return [[sequences]], True
    sequences = list(sequences)
    if len(sequences) == 0 or not isinstance(sequences[0], (list, tuple)):
        return [[int(token) for token in sequences]], True
    return [[int(token) for token in row] for row in sequences], False


def add_flamingo_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add `<|endofchunk|>`, `<image>` and (if the tokenizer has no pad token) `<PAD>` as
    `open_flamingo.create_model_and_transforms` does, unless they are already there (a saved processor reloads with
    them). Returns the tokenizer."""
    added = tokenizer.get_added_vocab()
    if EOC_TOKEN not in added or MEDIA_TOKEN not in added:
        # The original call, verbatim: it also replaces the tokenizer's list of additional special tokens.
        tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


class FlamingoProcessor(ProcessorMixin):
    r"""
    Builds OpenFlamingo inputs: tokenizes interleaved prompts such as
    `"<image>Two cats.<|endofchunk|><image>An image of"` and preprocesses their images with [`FlamingoImageProcessor`]
    (open_clip's evaluation transform).

    On construction the tokenizer gets the Flamingo tokens exactly as the original `create_model_and_transforms`
    adds them: `add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})`, then `<PAD>` as pad
    token if it has none, so the ids equal the original's. A tokenizer that already holds `<|endofchunk|>` and
    `<image>` as added tokens (e.g. one saved by this processor) is left as it is. The tokenizer's `padding_side` is
    set to `"left"`, what generation needs (the original evaluation code pads on the left); pass
    `padding_side="right"` to `__call__` for training batches.

    Args:
        image_processor ([`FlamingoImageProcessor`], *optional*):
            Defaults to `FlamingoImageProcessor()` (224 px, OpenAI CLIP mean and std).
        tokenizer ([`PreTrainedTokenizerBase`]):
            The language model's tokenizer (any transformers tokenizer; the released models use fast ones).
        chat_template (`str`, *optional*):
            A Jinja chat template, saved and loaded with the processor.
    """

    # transformers 5.23 infers the sub-processors from the `__init__` signature (and loads them with
    # `AutoImageProcessor` / `AutoTokenizer`); `attributes` is kept for readers and older code that inspects it.
    attributes = ["image_processor", "tokenizer"]

    media_token = MEDIA_TOKEN
    eoc_token = EOC_TOKEN

    def __init__(
        self,
        image_processor: FlamingoImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("FlamingoProcessor needs a `tokenizer`.")
        if image_processor is None:
            image_processor = FlamingoImageProcessor()
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        add_flamingo_tokens(self.tokenizer)
        self.tokenizer.padding_side = "left"

    @property
    def media_token_id(self) -> int:
        """Id of `<image>`."""
        return self.tokenizer.convert_tokens_to_ids(self.media_token)

    @property
    def eoc_token_id(self) -> int:
        """Id of `<|endofchunk|>`, where generation stops by default."""
        return self.tokenizer.convert_tokens_to_ids(self.eoc_token)

    # transformers' generic multimodal helpers look for `image_token` / `image_token_id`.
    @property
    def image_token(self) -> str:
        return self.media_token

    @property
    def image_token_id(self) -> int:
        return self.media_token_id

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _images_per_sample(self, images: ImageInput | None, texts: list[str] | None) -> list[list[Any]]:
        """Resolve `images` into one list of images per sample (see `__call__` for the rules)."""
        batch_size = len(texts) if texts is not None else None
        if images is None:
            return [[] for _ in range(batch_size or 0)]
        if _is_single_image(images):
            if batch_size not in (None, 1):
                raise ValueError(
                    f"A single image was given for {batch_size} texts: pass one list of images per text, e.g. "
                    "`images=[[img_a], [img_b]]`."
                )
            return [[images]]
        if is_valid_image(images):  # a 4-D (or larger) array or tensor
            raise ValueError(
                f"Got an image array of shape {tuple(images.shape)}: pass images as a list per sample, "
                "e.g. `images=[[img_a, img_b], [img_c]]`."
            )
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"Unsupported `images` of type {type(images).__name__}.")
        if len(images) == 0:
            return [[] for _ in range(batch_size if batch_size is not None else 1)]

        nested = [isinstance(item, (list, tuple)) for item in images]
        if all(nested):
            if batch_size is not None and len(images) != batch_size:
                raise ValueError(
                    f"Got {len(images)} lists of images for {batch_size} texts: give exactly one list per text "
                    "(an empty list for a text without images)."
                )
            per_sample = [list(sample) for sample in images]
        elif not any(nested):
            if batch_size in (None, 1):
                per_sample = [list(images)]  # a flat list belongs to the single sample
            elif len(images) == batch_size and all(text.count(self.media_token) == 1 for text in texts):
                per_sample = [[image] for image in images]  # one image per one-`<image>` text: unambiguous
            else:
                raise ValueError(
                    f"A flat list of {len(images)} images is ambiguous for {batch_size} texts: pass one list of "
                    "images per text, e.g. `images=[[img_a, img_b], [img_c]]`. (A flat list is accepted for several "
                    "texts only when every text has exactly one `<image>` and there is one image per text.)"
                )
        else:
            raise ValueError("`images` mixes lists and single images: pass one list of images per text.")

        for index, sample in enumerate(per_sample):
            for image_index, image in enumerate(sample):
                problem = image_problem(image) if image is None or _is_single_image(image) else None
                if problem:
                    raise ValueError(f"Sample {index}, image {image_index} (0-based) {problem}.")
                if not _is_single_image(image):
                    raise TypeError(
                        f"Sample {index}: expected PIL images, 2-D/3-D arrays or tensors, or paths, got "
                        f"{type(image).__name__}."
                    )
        return per_sample

    def __call__(
        self,
        images: ImageInput | list[ImageInput] | list[list[ImageInput]] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str | TensorType | None = None,
        padding: bool | str = "longest",
        padding_side: str | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenize prompts and preprocess their images.

        Each `<image>` in a text refers to the next image of that sample, in order; every sample must have exactly as
        many images as `<image>` tokens (an image without a token would be silently ignored by the model, a token
        without an image has nothing to attend to), otherwise a `ValueError` names the sample.

        How `images` is read (B = number of texts):
            - `None` (or `[]`): no images; no text may contain `<image>`.
            - a nested list `[[img_a, img_b], [img_c], []]`: one list per text (an empty list for a text without
              images); the number of lists must equal B.
            - a single image (PIL image, 2-D/3-D array or tensor, or a path): the images of a single text (B = 1).
            - a flat list `[img_a, img_b]`: all the images of a single text when B = 1; for B > 1 it is accepted
              only when there are B images and every text has exactly one `<image>` (one image per text), and
              refused as ambiguous otherwise.
            - with `text=None`, only `pixel_values` are returned: a nested list gives one sample per inner list, a
              single image or a flat list one sample.

        Truncation: `truncation`/`max_length` are passed to the tokenizer (which cuts on its `truncation_side`,
        the right by default), but a cut that would remove an `<image>` token raises a `ValueError` instead of
        silently dropping that image's place in the text; cuts that only remove ordinary tokens are allowed.

        Args:
            images: see above. PIL images give exact parity with open_clip; arrays and tensors are converted to PIL
                images first (see [`FlamingoImageProcessor`]).
            text (`str` or `list[str]`): the prompts, with `<image>` where each image goes.
            return_tensors (`str` or [`~utils.TensorType`], *optional*): `"pt"`, `"np"` or `None` (lists of ids,
                and a float32 numpy array for `pixel_values`).
            padding, padding_side, truncation, max_length: tokenizer arguments; padding defaults to `"longest"`
                on the tokenizer's side (left, set by this processor, unless `padding_side` says otherwise).
            **kwargs: image processor arguments (`size`, `crop_size`, `do_normalize`...) go to the image processor;
                the others (e.g. `add_special_tokens`, `pad_to_multiple_of`) to the tokenizer.

        Returns:
            [`BatchFeature`] with
            - `input_ids`, `attention_mask`: (B, L);
            - `pixel_values`: float32 of shape (B, T_img, 1, 3, H, W), T_img the largest number of images of a
              sample, the images of samples with fewer being zeros (the model never attends to them); absent when
              no sample has an image.
        """
        if text is None and images is None:
            raise ValueError("FlamingoProcessor needs `text`, `images` or both.")
        texts: list[str] | None = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(sample, str) for sample in texts):
                raise ValueError("`text` must be a string or a non-empty list of strings.")

        image_kwargs = {
            key: kwargs.pop(key) for key in list(kwargs) if key in FlamingoImageProcessor.valid_kwargs.__annotations__
        }
        if kwargs.get("return_overflowing_tokens"):
            raise ValueError(
                "`return_overflowing_tokens` is not supported: the rows would no longer match the images."
            )

        if images is not None:
            images = self.image_processor.fetch_images(images)  # opens paths, keeps the nesting
        per_sample = self._images_per_sample(images, texts)

        data: dict[str, Any] = {}
        if texts is not None:
            for index, (sample_text, sample_images) in enumerate(zip(texts, per_sample, strict=True)):
                num_tokens = sample_text.count(self.media_token)
                if num_tokens > len(sample_images):
                    raise ValueError(
                        f"Sample {index}: the text has {num_tokens} `{self.media_token}` tokens but "
                        f"{len(sample_images)} images were given."
                    )
                if num_tokens < len(sample_images):
                    raise ValueError(
                        f"Sample {index}: {len(sample_images)} images were given but the text has only {num_tokens} "
                        f"`{self.media_token}` tokens; the model would ignore the images no token refers to. Add "
                        f"one `{self.media_token}` per image where it belongs in the text."
                    )

            kwargs.setdefault("return_token_type_ids", False)  # the model takes none
            encoding = self.tokenizer(
                texts,
                padding=padding,
                padding_side=padding_side,
                truncation=truncation,
                max_length=max_length,
                **kwargs,
            )
            for index, (sample_text, ids) in enumerate(zip(texts, encoding["input_ids"], strict=True)):
                expected = sample_text.count(self.media_token)
                found = list(ids).count(self.media_token_id)
                if found != expected:
                    raise ValueError(
                        f"Sample {index}: its text has {expected} `{self.media_token}` tokens but {found} remain after "
                        f"tokenization (truncation={truncation!r}, max_length={max_length}); truncation must not cut "
                        "an image token: raise `max_length` or shorten the text."
                    )
            data.update(encoding)

        num_media = max((len(sample) for sample in per_sample), default=0)
        if num_media > 0:
            flat_images = [image for sample in per_sample for image in sample]
            processed = self.image_processor(flat_images, return_tensors=None, **image_kwargs)["pixel_values"]
            shapes = {tuple(np.shape(array)) for array in processed}
            if len(shapes) != 1:
                raise ValueError(
                    f"The processed images have different shapes {sorted(shapes)}; enable the centre crop."
                )
            pixel_values = np.zeros((len(per_sample), num_media, 1, *shapes.pop()), dtype=np.float32)
            position = 0
            for index, sample in enumerate(per_sample):
                for media_index in range(len(sample)):
                    pixel_values[index, media_index, 0] = processed[position]
                    position += 1
            data["pixel_values"] = pixel_values

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _strip_prompt(self, rows: list[list[int]], prompt_length: int | None) -> list[list[int]]:
        if prompt_length is None:
            return rows
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) or prompt_length < 0:
            raise ValueError(f"`prompt_length` must be a non-negative int, got {prompt_length!r}.")
        for index, row in enumerate(rows):
            if len(row) < prompt_length:
                raise ValueError(f"Sequence {index} has {len(row)} tokens, fewer than prompt_length={prompt_length}.")
        return [row[prompt_length:] for row in rows]

    def batch_decode(
        self, sequences: Any, skip_special_tokens: bool = False, prompt_length: int | None = None, **kwargs
    ) -> list[str]:
        """
        Decode a batch of token ids, (B, L) or a list of lists.

        Args:
            sequences: token ids, e.g. the output of `model.generate` (prompt followed by the new tokens).
            skip_special_tokens (`bool`, defaults to `False`): drop special tokens (`<image>`, `<|endofchunk|>`,
                `<PAD>`, eos...) from the text.
            prompt_length (`int`, *optional*): number of leading tokens to drop from every row before decoding. Pass
                `inputs["input_ids"].shape[1]` to decode only what `generate` added: every row of its output starts
                with the whole padded prompt, so one length serves the whole batch.
            **kwargs: passed to the tokenizer's `batch_decode`.
        """
        rows, _ = _as_id_rows(sequences)
        rows = self._strip_prompt(rows, prompt_length)
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(
        self, token_ids: Any, skip_special_tokens: bool = False, prompt_length: int | None = None, **kwargs
    ) -> str | list[str]:
        """Like [`~FlamingoProcessor.batch_decode`]; a single sequence (L,) gives a string, a batch a list."""
        rows, single = _as_id_rows(token_ids)
        texts = self.batch_decode(rows, skip_special_tokens=skip_special_tokens, prompt_length=prompt_length, **kwargs)
        return texts[0] if single else texts

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, prompt_length: int | None = None, **kwargs
    ) -> list[str]:
        """
        Decode the output of `generate`, (B, L) or (L,), into one string per sequence.

        Args:
            generated_outputs: token ids.
            skip_special_tokens (`bool`, defaults to `True`): drop special tokens from the text.
            prompt_length (`int`, *optional*): leading prompt tokens to drop (see `batch_decode`).
            **kwargs: passed to the tokenizer's `batch_decode`.
        """
        rows, _ = _as_id_rows(generated_outputs)
        return self.batch_decode(rows, skip_special_tokens=skip_special_tokens, prompt_length=prompt_length, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained`, which also accepts the original OpenFlamingo hub repos (e.g.
        `openflamingo/OpenFlamingo-3B-vitl-mpt1b`): like the model, they are converted once into a local cache folder
        (`modeling_flamingo.convert_on_load`) and loaded from there."""
        from modeling_flamingo.convert_on_load import resolve_pretrained_path

        pretrained_model_name_or_path = resolve_pretrained_path(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """`ProcessorMixin.save_pretrained`, writing a folder that also loads without this package.

        `processor_config.json` gets `auto_map` entries for `AutoProcessor` and (in its image processor settings)
        `AutoImageProcessor`, and the folder the package's modules as remote code
        (`modeling_flamingo.hub_code.write_remote_code`), so `AutoProcessor.from_pretrained(folder,
        trust_remote_code=True)` works with transformers alone. The tokenizer stays a plain transformers tokenizer.
        As transformers does for remote-code classes, the entries are also set on `self` and `self.image_processor`
        (a reloaded image processor keeps its `auto_map`).
        """
        from modeling_flamingo.hub_code import IMAGE_PROCESSOR_AUTO_MAP, PROCESSOR_AUTO_MAP, write_remote_code

        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **PROCESSOR_AUTO_MAP}
        image_processor = self.image_processor
        image_processor.auto_map = {**(getattr(image_processor, "auto_map", None) or {}), **IMAGE_PROCESSOR_AUTO_MAP}
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_remote_code(save_directory)
        return files

    def _upload_modified_files(self, working_dir: str | os.PathLike, *args, **kwargs):
        # `push_to_hub` and `save_pretrained(push_to_hub=True)` upload from inside transformers' `save_pretrained`,
        # before the override above adds the remote code: add it just before the upload.
        from modeling_flamingo.hub_code import write_remote_code

        write_remote_code(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)


# Lets `AutoProcessor.from_pretrained(folder)` resolve the saved `processor_class`.
AutoProcessor.register(FlamingoConfig, FlamingoProcessor, exist_ok=True)

__all__ = ["FlamingoProcessor"]
