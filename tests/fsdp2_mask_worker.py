"""Worker of tests/test_train_distributed.py: the embedding-row gradient mask on FSDP2's row-sharded `DTensor`
gradients (torch `fully_shard`, two CPU processes over gloo; Accelerate enables FSDP on GPUs only).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_mask_worker.py OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from modeling_flamingo.training import EmbeddingGradientMask

KEPT = [3, 7]  # row 3 lives on rank 0 (rows 0-5), row 7 on rank 1 (rows 6-10)


def main(out: str) -> int:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(11, 4)
    fully_shard(embedding, mesh=mesh)
    embedding(torch.tensor([[1, 3, 7, 9, 9]])).sum().backward()
    grad = embedding.weight.grad
    assert isinstance(grad, DTensor), type(grad)
    before = grad.full_tensor().abs().sum(1).tolist()
    EmbeddingGradientMask(KEPT).apply(embedding.weight)
    after = embedding.weight.grad.full_tensor().abs().sum(1).tolist()
    if dist.get_rank() == 0:
        local = grad.to_local().shape[0]
        with open(out, "w") as f:
            json.dump({"before": before, "after": after, "local_rows_rank0": local}, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
