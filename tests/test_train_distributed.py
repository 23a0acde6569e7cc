"""Two CPU processes with DDP (gloo, through Accelerate) train to the same weights as one process that accumulates the
same global batch, a step with a non-finite loss on one process skipped by both; the checkpoints and exports a DDP run
writes are those of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dist_helpers import free_port
from train_helpers import fresh_accelerate_state

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import train_dist_worker  # noqa: E402


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # `accelerate launch` as users run it: `--multi_gpu` with ACCELERATE_USE_CPU gives DDP over gloo on the CPU
    # (`--cpu` would start a single process).
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(HERE / "train_dist_worker.py"), str(tmp_path / "ddp"),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Step 3's loss is non-finite on rank 1 only: both processes skip it (else DDP would hang or diverge).
    for rank in (0, 1):
        assert f"rank {rank}/2 DistributedType.MULTI_CPU done at step 4, skipped 1" in result.stdout
    assert "step 3: non-finite loss or gradient, step skipped on every process" in result.stdout

    with fresh_accelerate_state():
        train_dist_worker.main([str(tmp_path / "single")])

    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=0, msg=name)
    # Both runs wrote the same checkpoints (one set: rank 0 writes, every rank saves its RNG state).
    for run in ("ddp", "single"):
        names = sorted(p.name for p in (tmp_path / run).iterdir())
        assert names == ["checkpoint.pt", "checkpoint_2", "checkpoint_4", "model", "training_run.json"], names
    assert (tmp_path / "ddp" / "checkpoint_2" / "random_states_1.pkl").is_file()


def test_embedding_mask_on_fsdp2_row_shards(tmp_path):
    out = tmp_path / "mask.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(HERE / "fsdp2_mask_worker.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["local_rows_rank0"] == 6  # the rows really are split across the two processes
    assert [i for i, v in enumerate(data["before"]) if v] == [1, 3, 7, 9]
    assert [i for i, v in enumerate(data["after"]) if v] == [3, 7]
    assert data["after"][3] == data["before"][3] and data["after"][7] == data["before"][7]
