"""DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate on two CPU processes (DeepSpeed's CPU accelerator, gloo), launched
with the shipped configs: the weights after four steps (one skipped for a non-finite loss on one process) equal those
of one process accumulating the same global batch,
only the `<image>` and `<|endofchunk|>` embedding rows move, and resuming from DeepSpeed's sharded checkpoint gives
the uninterrupted run's weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_flamingo.training import CONFIGS_DIR

from dist_helpers import free_port
from train_helpers import fresh_accelerate_state, tiny_model

pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install deepspeed); see docs/training.md")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import train_dist_worker  # noqa: E402


def _launch(config: str, run_dir: Path, *extra: str) -> str:
    # DeepSpeed's CPU accelerator; it JIT-builds its shared-memory communication op once (torch_extensions cache).
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS_DIR / config),
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(HERE / "train_dist_worker.py"), str(run_dir), *extra,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (
            f"rank {rank}/2 DistributedType.DEEPSPEED done at step {train_dist_worker.STEPS}, skipped" in result.stdout
        )
    return result.stdout


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("single") / "run"
    with fresh_accelerate_state():
        train_dist_worker.main([str(run)])
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_two_cpu_processes_equal_one_process_and_resume(config, single_process, tmp_path):
    stdout = _launch(config, tmp_path / "ds")
    # The non-finite loss of rank 1 at step 3 skips that step on both processes (no backward anywhere).
    assert f"DEEPSPEED done at step {train_dist_worker.STEPS}, skipped 1" in stdout
    assert f"step {train_dist_worker.NAN_STEP}: non-finite loss or gradient, step skipped on every process" in stdout
    assert "lr=0.01" in stdout  # the schedule moves (warmup of one step) under DeepSpeed too
    trained = torch.load(tmp_path / "ds" / "checkpoint.pt", weights_only=True)
    assert trained.keys() == single_process.keys()
    for name, value in single_process.items():
        torch.testing.assert_close(trained[name], value, atol=1e-5, rtol=0, msg=name)

    # Of the input embeddings only the rows of the two Flamingo tokens moved.
    model, _ = tiny_model()
    (key,) = [k for k in trained if k.endswith("wte.weight")]
    before = model.get_input_embeddings().weight.detach()
    moved = (trained[key] != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted([model.config.media_token_id, model.config.eoc_token_id])

    # DeepSpeed's own (sharded) checkpoint after step 2 resumes to the same final weights, though the resumed run
    # starts from other trainable weights.
    middle = tmp_path / "ds" / "checkpoint_2"
    assert (middle / "trainer_state.json").is_file() and (middle / "latest").is_file()
    stdout = _launch(config, tmp_path / "resumed", str(middle))
    assert "Resumed at epoch 0, batch 2, step 2." in stdout
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for name, value in trained.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=0, msg=name)
