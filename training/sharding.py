"""The rows of a possibly FSDP2-sharded tensor that this process holds."""

from __future__ import annotations

import torch


def dtensor_class() -> type | tuple:
    """`torch.distributed.tensor.DTensor`, or `()` (matching nothing in `isinstance`) on a torch without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return ()
    return DTensor


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rows of `tensor` this process holds, as a plain tensor that writes through to them, and the global index
    of the first one: (the local shard, its row offset) for a row-sharded FSDP2 `DTensor`, (`tensor`, 0) otherwise."""
    if not isinstance(tensor, dtensor_class()):
        return tensor, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), offset[0]


__all__ = ["dtensor_class", "local_rows"]
