"""Writing safetensors shards one tensor (or one slice of a tensor) at a time.

`safetensors.torch.save_file` needs every tensor of a shard in memory at once (and copies each to bytes); here the
header is computed from the planned shapes, then each tensor is produced, cast and written in slices of at most
`CHUNK_BYTES`, so memory holds one slice at a time whatever the shard size.
"""

from __future__ import annotations

import gc
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.serialization._base import parse_size_to_int, split_state_dict_into_shards_factory

from .sources import ConversionError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CHUNK_BYTES = 64 * 1024 * 1024

_ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape and dtype, and how to produce rows of it.

    Attributes:
        key: name in the output state dict.
        shape: output shape.
        dtype: output dtype.
        read: `read(start, stop)` returns rows `start:stop` (dim 0) of the tensor before the cast; for 0-d tensors it
            is called with `(None, None)`.
        source: what the tensor is read from (a `WeightFile`, or None for computed tensors); the writer opens
            each source once and closes it when moving to the next, so tensors must be grouped by source.
        origin: where the tensor comes from, for messages (e.g. "perceiver.latents (checkpoint)"); default `key`.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int | None, int | None], torch.Tensor]
    source: object | None = None
    origin: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_shard_size(size: str | int) -> int:
    """`"5GB"` -> 5_000_000_000 (decimal units, as transformers and huggingface_hub count).

    Every invalid size (negative, zero, malformed) gets the same message."""
    try:
        if isinstance(size, bool):
            raise TypeError(size)
        if isinstance(size, int):
            value = size
        else:
            text = size.strip()
            value = int(text) if text.isdigit() else parse_size_to_int(text)
    except (ValueError, TypeError, AttributeError):
        value = 0
    if value <= 0:
        raise ConversionError(
            f"invalid --max-shard-size {size!r}: use a positive size such as 5GB, 500MB or a number of bytes"
        )
    return value


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_size: int) -> dict[str, list[PlannedTensor]]:
    """Split tensors into `model-XXXXX-of-YYYYY.safetensors` files (or one `model.safetensors`) in order.

    Uses huggingface_hub's splitter, the one `PreTrainedModel.save_pretrained` uses: shards fill in order and a
    tensor larger than the limit gets a shard of its own.
    """
    by_key = {t.key: t for t in tensors}
    split = split_state_dict_into_shards_factory(
        by_key,
        get_storage_size=lambda t: t.nbytes,
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    return {name: [by_key[k] for k in keys] for name, keys in split.filename_to_tensors.items()}


def _rows_per_chunk(t: PlannedTensor) -> int:
    row_bytes = max(1, math.prod(t.shape[1:]) * max(t.dtype.itemsize, 4))
    return max(1, CHUNK_BYTES // row_bytes)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    # A uint8 view of the (contiguous) data: no copy, and it works for bfloat16, which numpy lacks.
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class SourceTracker:
    """Keeps at most one source open: opening the next closes the previous one (and frees its mapped pages)."""

    def __init__(self) -> None:
        self.current = None

    def use(self, source) -> None:
        if source is self.current:
            return
        self.close()
        if source is not None and hasattr(source, "open"):
            source.open()
        self.current = source

    def close(self) -> None:
        if self.current is not None and hasattr(self.current, "close"):
            self.current.close()
            gc.collect()  # the memory maps go with their last tensor; make sure no cycle keeps one alive
        self.current = None


class NonFiniteWeightsError(ConversionError):
    """Weights about to be written hold NaN or infinite values."""


def check_finite(what: str, values: torch.Tensor, remedy: str) -> None:
    """Raise `NonFiniteWeightsError` naming `what` and its NaN and inf counts when the floating-point `values` hold
    any: the one check every writer of weights runs before writing (the converter on each slice it streams, the
    training exports on each tensor), so no NaN or inf is ever saved without being asked for.

    Args:
        what: the tensor's name, for the message.
        values: the tensor (or a slice of it), of any shape, on any device; non-floating tensors always pass.
        remedy: what the user can do, appended to the message in parentheses.
    """
    if not values.is_floating_point() or bool(torch.isfinite(values).all()):
        return
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    found = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    raise NonFiniteWeightsError(f"{what} holds non-finite values ({found}): corrupt or diverged weights? ({remedy})")


def check_values(t: PlannedTensor, part: torch.Tensor, allow_non_finite: bool = False) -> torch.Tensor:
    """`part` (rows of `t` as stored) cast to `t.dtype`, or a ConversionError naming the tensor when the cast would
    change what it holds: a stored dtype that does not fit (integer, bool or complex values for a floating weight,
    anything but the same or a wider integer type for an integer buffer), NaN or inf values (unless
    `allow_non_finite`), or finite values beyond the range of the output dtype (they would become inf)."""
    what = t.origin or t.key
    stored = part.dtype
    if t.dtype.is_floating_point:
        if not stored.is_floating_point:
            raise ConversionError(
                f"{what} is stored as {stored} but {t.key} is a floating-point weight: refusing to cast it"
            )
    elif stored != t.dtype and (
        stored.is_floating_point or stored.is_complex or torch.promote_types(stored, t.dtype) != t.dtype
    ):
        raise ConversionError(f"{what} is stored as {stored} but {t.key} is {t.dtype}: refusing to cast it")
    if not t.dtype.is_floating_point:
        return part.to(t.dtype)
    if not allow_non_finite:
        check_finite(what, part, "pass --allow-non-finite, or allow_non_finite=True, to write them anyway")
    out = part.to(t.dtype)
    if stored != t.dtype:
        overflow = torch.isfinite(part) & ~torch.isfinite(out)
        if bool(overflow.any()):
            largest = part[overflow].abs().max().item()
            raise ConversionError(
                f"{what} holds values beyond the range of {t.dtype} (|x| up to {largest:.4g}), which would become "
                "inf: convert with a wider --dtype (bfloat16 or float32)"
            )
    return out


def write_shard(
    path: Path,
    tensors: Sequence[PlannedTensor],
    tracker: SourceTracker,
    progress=None,
    allow_non_finite: bool = False,
) -> None:
    """Write one safetensors file: header from the planned shapes, then the data tensor by tensor, slice by slice.

    The header lists tensors in name order (JSON keys sorted, no spaces) with `{"format": "pt"}` metadata; data
    follows the order of `tensors`. The same plan always gives the same bytes. Every slice goes through
    `check_values` on its way (no NaN/inf unless `allow_non_finite`, no lossy cast), so a bad tensor stops the write
    with an error naming it.
    """
    header: dict[str, dict] = {}
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_NAMES:
            raise ConversionError(f"cannot store {t.key} with dtype {t.dtype} in safetensors")
        header[t.key] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data on 8 bytes

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            tracker.use(t.source)
            written = 0
            if len(t.shape) == 0:
                chunks = [(None, None)]
            else:
                step = _rows_per_chunk(t)
                chunks = [(i, min(i + step, t.shape[0])) for i in range(0, t.shape[0], step)] or [(0, 0)]
            for start, stop in chunks:
                part = t.read(start, stop)
                expected = t.shape if start is None else (stop - start, *t.shape[1:])
                if tuple(part.shape) != tuple(expected):
                    raise ConversionError(
                        f"{t.key}: read shape {tuple(part.shape)}, expected {tuple(expected)} (file changed on disk?)"
                    )
                part = check_values(t, part, allow_non_finite)
                f.write(_as_bytes(part))
                written += part.numel() * t.dtype.itemsize
                if progress is not None:
                    progress.update(part.numel() * t.dtype.itemsize)
                del part
            if written != t.nbytes:
                raise ConversionError(f"{t.key}: wrote {written} bytes, expected {t.nbytes}")


def write_index(path: Path, shards: dict[str, list[PlannedTensor]], total_parameters: int) -> None:
    """`model.safetensors.index.json` as transformers writes it (sorted keys, indent 2, trailing newline)."""
    weight_map = {t.key: name for name, tensors in shards.items() for t in tensors}
    total_size = sum(t.nbytes for tensors in shards.values() for t in tensors)
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
