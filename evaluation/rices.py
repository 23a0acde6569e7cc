"""RICES: Retrieval-based In-Context Example Selection, as in OpenFlamingo's evaluation (`open_flamingo/eval/rices.py`).

Demonstrations are the training examples whose CLIP image embedding is most similar (cosine) to the query image. The
original embeds images with open_clip (`ViT-L-14`, OpenAI weights, for the published numbers); here the same weights
run as transformers' `CLIPVisionModelWithProjection` (the hub's `openai/clip-vit-large-patch14`), and images go
through `FlamingoImageProcessor`, which reproduces open_clip's evaluation transform exactly, so the embeddings equal
open_clip's `encode_image` (normalised) up to float rounding.

Features of a training split can be cached in a file: a `torch.save`d float tensor of shape (N, D), the format of the
original's `scripts/cache_rices_features.py` (`<dataset>.pkl`), so files written by either can be read by the other.

Command line (precompute the features of a list of images, in the order the harness indexes them):

    python -m modeling_flamingo.evaluation.rices --images train_images.txt --output coco.pkl
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch

from modeling_flamingo.processing.image_loading import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    check_max_image_pixels,
    open_image,
)

__all__ = ["RICES", "ClipImageEncoder", "open_clip_to_hf_clip_vision"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def open_clip_to_hf_clip_vision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip image tower (`VisionTransformer`, or a whole `CLIP` with `visual.` keys) to the weights
    of transformers' `CLIPVisionModelWithProjection`.

    The transformer reuses the converter's mapping (`vision_model.*`, the fused attention input split into q/k/v);
    open_clip's projection `proj` (hidden, D), applied as `x @ proj`, becomes `visual_projection.weight` = `proj.T`.
    A whole `CLIP`'s text tower and logit scale are left out.
    """
    from modeling_flamingo.convert.mapping import open_clip_vision_state_dict

    if any(key.startswith("visual.") for key in state_dict):
        state_dict = {key[len("visual.") :]: value for key, value in state_dict.items() if key.startswith("visual.")}
    if "proj" not in state_dict:
        raise ValueError("the open_clip vision state dict has no `proj` (projection to the embedding space)")
    vision = {key: value for key, value in state_dict.items() if key != "proj"}
    out = open_clip_vision_state_dict(vision, prefix="vision_model.")
    out["visual_projection.weight"] = state_dict["proj"].t().contiguous()
    return out


class ClipImageEncoder:
    """L2-normalised CLIP image embeddings, as open_clip's `encode_image(x)` divided by its norm in the original.

    Args:
        model_name_or_path: a hub id or folder of a transformers CLIP checkpoint (`CLIPModel` or
            `CLIPVisionModelWithProjection`; default `openai/clip-vit-large-patch14`, the published RICES encoder), or
            an already built `CLIPModel` / `CLIPVisionModelWithProjection`.
        image_processor: defaults to `FlamingoImageProcessor` sized for the model's `image_size` (open_clip's
            evaluation transform with the OpenAI mean/std).
        device, dtype: where and in which precision the model runs (default: CPU, float32, as the original's
            features were computed in float32). Embeddings are returned as float32 on the CPU.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | torch.nn.Module = DEFAULT_CLIP,
        *,
        image_processor=None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor

        if isinstance(model_name_or_path, torch.nn.Module):
            model = model_name_or_path
            if not isinstance(model, (CLIPModel, CLIPVisionModelWithProjection)):
                raise ValueError(
                    f"ClipImageEncoder needs a CLIPModel or CLIPVisionModelWithProjection, got {type(model).__name__}"
                )
        else:
            # A CLIPModel checkpoint loads into the vision half: same `vision_model.*` / `visual_projection` names.
            model = CLIPVisionModelWithProjection.from_pretrained(model_name_or_path)
        vision_config = model.config.vision_config if isinstance(model, CLIPModel) else model.config
        if image_processor is None:
            size = vision_config.image_size
            image_processor = FlamingoImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self.model = model.eval()
        if device is not None or dtype is not None:
            self.model.to(device=device, dtype=dtype)
        self.image_processor = image_processor
        self.embedding_dim: int = model.config.projection_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Embed `images` -> (B, D) float32 on the CPU, each row of unit L2 norm."""
        from transformers import CLIPModel

        images = list(images)
        if not images:
            return torch.empty(0, self.embedding_dim)
        parameter = next(self.model.parameters())
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        if isinstance(self.model, CLIPModel):
            embeds = self.model.get_image_features(pixel_values=pixel_values)
            embeds = getattr(embeds, "pooler_output", embeds)  # a tensor, or an output object in some versions
        else:
            embeds = self.model(pixel_values=pixel_values).image_embeds
        embeds = embeds.float()
        return (embeds / embeds.norm(dim=-1, keepdim=True)).cpu()


def _load_features(path: Path) -> torch.Tensor:
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused (not plain tensors) or not a torch file
        raise ValueError(f"RICES features file {path} could not be read as a tensor file: {exc}") from exc
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"RICES features file {path} holds a {type(features).__name__}, not a tensor")
    return features


def _save_atomically(features: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(features, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class RICES:
    """Retrieval of in-context examples by CLIP image similarity.

    Args:
        features: (N, D) L2-normalised embeddings of the N training examples (row i = training example i).
    """

    def __init__(self, features: torch.Tensor):
        if not isinstance(features, torch.Tensor):
            raise ValueError(
                f"RICES features must be a tensor of shape (num_examples, dim), got {type(features).__name__}"
            )
        if features.ndim != 2 or not features.is_floating_point():
            raise ValueError(
                "RICES features must be a floating-point tensor of shape (num_examples, dim), got "
                f"shape {tuple(features.shape)} {features.dtype}"
            )
        if features.shape[0] == 0:
            raise ValueError("RICES features are empty: there is no training example to retrieve")
        if not torch.isfinite(features).all():
            raise ValueError("RICES features contain NaN or infinite values")
        self.features = features.detach().to(device="cpu", dtype=torch.float32)
        self.encoder: ClipImageEncoder | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @classmethod
    def from_images(
        cls,
        images: Sequence[PIL.Image.Image],
        encoder: ClipImageEncoder,
        *,
        batch_size: int = 32,
        cache_file: str | os.PathLike | None = None,
        desc: str = "Precomputing features for RICES",
    ) -> RICES:
        """Embed a training split (or read its cached embeddings) and keep `encoder` for the queries.

        Args:
            images: the training images, in the order of the training split (`len` and indexing; loaded lazily,
                `batch_size` at a time).
            encoder: the image encoder; also used by `find` on query images.
            cache_file: if it exists, the features are read from it (our files or the original's
                `cache_rices_features.py` output; `torch.load(weights_only=True)`) and must have one row per image;
                otherwise they are computed and saved there (written to a temporary file, then renamed).
            desc: label of the progress bar.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        path = Path(cache_file) if cache_file is not None else None
        if path is not None and path.exists():
            features = _load_features(path)
            if features.ndim != 2 or features.shape[0] != len(images):
                raise ValueError(
                    f"RICES features file {path} has shape {tuple(features.shape)}, but there are {len(images)} "
                    "training images: it was computed for another split (delete it to recompute)"
                )
            if features.shape[1] != encoder.embedding_dim:
                raise ValueError(
                    f"RICES features file {path} has {features.shape[1]}-dimensional features, but the encoder "
                    f"gives {encoder.embedding_dim}: it was computed with another model"
                )
        else:
            from tqdm.auto import tqdm

            chunks = []
            for start in tqdm(range(0, len(images), batch_size), desc=desc):
                batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
                chunks.append(encoder(batch))
            features = torch.cat(chunks) if chunks else torch.empty(0, encoder.embedding_dim)
        rices = cls(features)  # validates before anything is written
        if path is not None and not path.exists():
            _save_atomically(rices.features, path)
        rices.encoder = encoder
        return rices

    def find(
        self,
        query_images: Sequence[PIL.Image.Image] | torch.Tensor,
        num_examples: int,
        encoder: ClipImageEncoder | None = None,
    ) -> list[list[int]]:
        """Indices of the `num_examples` training examples most similar to each query, the MOST SIMILAR LAST.

        Args:
            query_images: B query images, or their (B, D) normalised embeddings.
            num_examples: k, at most the number of training examples.
            encoder: embeds the query images (default: the encoder given to `from_images`).

        Returns:
            B lists of k training indices. Ordering and ties are the original's: `argsort(descending=True)` of the
            cosine similarities on the CPU, first k, reversed.
        """
        if not 0 <= num_examples <= len(self):
            raise ValueError(f"num_examples must be between 0 and {len(self)} (training examples), got {num_examples}")
        if isinstance(query_images, torch.Tensor):
            queries = query_images.detach().to(device="cpu", dtype=torch.float32)
            if queries.ndim == 1:
                queries = queries.unsqueeze(0)
        else:
            encoder = encoder or self.encoder
            if encoder is None:
                raise ValueError("RICES.find needs an encoder for query images (or pass their embeddings)")
            queries = encoder(query_images)
        if queries.ndim != 2 or queries.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"query embeddings have shape {tuple(queries.shape)}, the features (N, {self.features.shape[1]})"
            )
        similarity = queries @ self.features.T  # (B, N)
        indices = similarity.argsort(dim=-1, descending=True)[:, :num_examples]
        return [row[::-1] for row in indices.tolist()]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_flamingo.evaluation.rices",
        description="Precompute the CLIP image features of a training split for RICES (a torch.save'd (N, D) "
        "tensor, readable by the original OpenFlamingo evaluation as well).",
    )
    parser.add_argument("--images", required=True, help="text file with one image path per line, in split order")
    parser.add_argument("--output", required=True, help="features file to write (must not exist)")
    parser.add_argument("--model", default=DEFAULT_CLIP, help=f"CLIP checkpoint (default {DEFAULT_CLIP})")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cuda if available, else cpu)")
    parser.add_argument(
        "--max-image-pixels",
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"largest width x height of an image, checked before decoding (default {DEFAULT_MAX_IMAGE_PIXELS})",
    )
    return parser.parse_args(argv)


class _LazyImages(Sequence):
    """Images opened from paths when indexed, without conversion (as the original's datasets open them), each
    refused before decoding if it declares more than `max_pixels` pixels."""

    def __init__(self, paths: list[str], max_pixels: int):
        self.paths, self.max_pixels = paths, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return open_image(self.paths[index], self.max_pixels)
        except ImageTooLargeError as err:
            raise ValueError(f"{self.paths[index]}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        output = Path(args.output)
        if output.exists():
            raise ValueError(f"{output} already exists; remove it or choose another --output")
        lines = Path(args.images).read_text().splitlines()
        paths = [line.strip() for line in lines if line.strip()]
        if not paths:
            raise ValueError(f"{args.images} lists no image")
        check_max_image_pixels(args.max_image_pixels)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = ClipImageEncoder(args.model, device=device)
        images = _LazyImages(paths, args.max_image_pixels)
        rices = RICES.from_images(images, encoder, batch_size=args.batch_size, cache_file=output)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {output}: features of shape {tuple(rices.features.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
