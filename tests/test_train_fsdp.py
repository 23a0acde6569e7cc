"""The training loop under Accelerate's FSDP2 on CPU processes (gloo). Full sharding, two processes: the same weights
as one process with the same global batch, frozen weights untouched, resume from a sharded checkpoint equal to a
straight run, exports that load, and a non-finite loss on one rank skipped by both. Hybrid sharding (2 replicas x 2
shards, four processes): the same weights as one process.

One `accelerate launch` with the shipped `training/configs/fsdp_full.yaml` runs every full-sharding run, one with
`fsdp_hybrid.yaml` the hybrid run (see tests/train_fsdp_worker.py, also for the test-only shim that lets Accelerate
1.15 take its FSDP path on the CPU); the 1-process references run here, without FSDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.training import freeze_for_flamingo_training
from modeling_flamingo.training.export import original_checkpoint_state_dict

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import train_fsdp_worker  # noqa: E402

from dist_helpers import free_port  # noqa: E402
from train_helpers import make_batch, tiny_model  # noqa: E402


def _reports(out: Path) -> dict[str, list[dict]]:
    """run name -> what each of its processes reported (tests/train_fsdp_worker.py `train`)."""
    reports: dict[str, list[dict]] = {}
    for path in sorted((out / "reports").glob("*.json")):
        reports.setdefault(path.name.split(".rank")[0], []).append(json.loads(path.read_text()))
    return reports


def _launch(root: Path, config: str, plan: str, launch_args: list[str]) -> tuple[Path, Path, dict[str, list[dict]]]:
    """Run `plan` under `accelerate launch` with a shipped config and its 1-process references here: (FSDP runs
    folder, 1-process runs folder, the FSDP processes' reports)."""
    # As users launch it; ACCELERATE_USE_CPU puts the processes on the CPU (gloo).
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "training" / "configs" / config), *launch_args,
        "--main_process_port", str(free_port()),
        str(HERE / "train_fsdp_worker.py"), str(root / "fsdp"), plan,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    train_fsdp_worker.main([str(root / "single"), "single" if plan == "full" else f"single_{plan}"])
    return root / "fsdp", root / "single", _reports(root / "fsdp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, dict[str, list[dict]]]:
    # The config's 8 processes become 2.
    return _launch(tmp_path_factory.mktemp("fsdp"), "fsdp_full.yaml", "full", ["--num_processes", "2"])


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def test_every_fsdp_run_took_accelerates_fsdp2_path_on_both_processes(runs):
    fsdp, _, results = runs
    assert sorted(results) == sorted(train_fsdp_worker.PLANS["full"])
    for name, reports in results.items():
        assert sorted(r["rank"] for r in reports) == [0, 1], name
        for report in reports:
            assert report["world"] == 2 and report["fsdp2"], report
            assert report["distributed_type"] == "DistributedType.FSDP", report
            assert report["global_step"] == train_fsdp_worker.STEPS, report
            assert report["placements"] == ["Shard(dim=0)"], report  # the resampler is sharded over both processes
    # The checkpoints are sharded (torch.distributed.checkpoint: one file per process for the model and the optimiser),
    # with every process's RNG state.
    middle = fsdp / "mosaic_gpt" / "checkpoint_2"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (middle / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], folder
    assert (middle / "random_states_0.pkl").is_file() and (middle / "random_states_1.pkl").is_file()
    state = json.loads((middle / "trainer_state.json").read_text())
    assert state == {
        "epoch": 0,
        "batches_done": 2,
        "global_step": 2,
        "skipped_steps": 0,
        "last_step_epoch": 0,
        "consecutive_skipped_steps": 0,
    }
    assert sorted(p.name for p in (fsdp / "mosaic_gpt").iterdir()) == [
        "checkpoint.pt", "checkpoint_2", "checkpoint_4", "model", "training_run.json",
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["mosaic_gpt", "gpt_neox"])  # tied output head, untied output head
def test_fsdp2_full_sharding_equals_one_process_with_the_same_global_batch(runs, family):
    fsdp, single, _ = runs
    expected = _checkpoint(single / family)
    _assert_same(_checkpoint(fsdp / family), expected, atol=1e-5)
    # and training did move the weights (the comparison is not between two untouched models)
    initial, _ = tiny_model(family=family)
    freeze_for_flamingo_training(initial)
    initial_state = original_checkpoint_state_dict(initial)
    assert initial_state.keys() == expected.keys()
    moved = [name for name, value in expected.items() if not torch.equal(value, initial_state[name])]
    assert any("gated_cross_attn" in name for name in moved) and any("perceiver" in name for name in moved)


@pytest.mark.parametrize("family", ["mosaic_gpt", "gpt_neox"])
def test_fsdp2_leaves_frozen_weights_and_old_token_rows_untouched(runs, family):
    fsdp, _, _ = runs
    trained = FlamingoForConditionalGeneration.from_pretrained(fsdp / family / "model")
    initial, _ = tiny_model(family=family)
    freeze_for_flamingo_training(initial)
    before, after = initial.state_dict(), trained.state_dict()
    embedding = {n for n, p in initial.named_parameters() if p is initial.get_input_embeddings().weight}
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad} - embedding
    frozen = set(before) - trainable - embedding
    assert frozen and trainable and len(embedding) == 1
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    assert all(not torch.equal(after[name], before[name]) for name in trainable if "perceiver" in name)
    (name,) = embedding
    new_rows = [initial.config.media_token_id, initial.config.eoc_token_id]
    changed = (after[name] != before[name]).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(new_rows)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_fsdp2_trains_newer_families_with_tied_heads_as_one_process(runs, family):
    fsdp, single, _ = runs
    _assert_same(_checkpoint(fsdp / family), _checkpoint(single / family), atol=1e-5)
    trained = FlamingoForConditionalGeneration.from_pretrained(fsdp / family / "model")
    assert trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
    initial, _ = tiny_model(family=family)
    before, after = initial.state_dict(), trained.state_dict()
    weight = initial.get_input_embeddings().weight
    embedding = {name for name, value in before.items() if value.data_ptr() == weight.data_ptr()}
    assert len(embedding) == 2  # the input embedding and the head tied to it
    trained_modules = {name for name in before if name.startswith("perceiver.") or ".gated_cross_attn_layer." in name}
    moved = {name for name in before if not torch.equal(after[name], before[name])}
    assert moved - trained_modules == embedding
    assert any(name.startswith("perceiver.") for name in moved) and any("gated_cross" in name for name in moved)
    new_rows = sorted([initial.config.media_token_id, initial.config.eoc_token_id])
    for name in embedding:
        assert (after[name] != before[name]).any(dim=1).nonzero().flatten().tolist() == new_rows


def test_fsdp2_resume_from_a_sharded_checkpoint_equals_a_straight_run(runs):
    fsdp, _, results = runs
    # The resumed run started from scrambled trainable weights: all of them came from checkpoint_2.
    assert [r["global_step"] for r in results["mosaic_gpt_resumed"]] == [4, 4]
    _assert_same(_checkpoint(fsdp / "mosaic_gpt_resumed"), _checkpoint(fsdp / "mosaic_gpt"), atol=0)


def test_fsdp2_export_loads_and_gives_the_logits_of_one_process(runs):
    fsdp, single, _ = runs
    _, tokenizer = tiny_model()
    batch = make_batch(tokenizer, ["<image>A dog runs after a red ball.<|endofchunk|>"], 1, False, seed=7)
    logits = {}
    for name, root in (("fsdp", fsdp), ("single", single)):
        assert (root / "mosaic_gpt" / "checkpoint.pt").is_file()
        model = FlamingoForConditionalGeneration.from_pretrained(root / "mosaic_gpt" / "model").eval()
        with torch.no_grad():
            logits[name] = model(
                pixel_values=batch["pixel_values"],
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
            ).logits
    assert torch.isfinite(logits["fsdp"]).all()
    torch.testing.assert_close(logits["fsdp"], logits["single"], atol=1e-5, rtol=0)


def test_fsdp2_non_finite_loss_on_one_rank_is_skipped_by_both(runs):
    fsdp, single, results = runs
    # Only rank 1's batch of step 2 overflows; both processes skip that step, and then train on.
    assert [r["skipped_steps"] for r in results["mosaic_gpt_nan"]] == [1, 1]
    nan_run = _checkpoint(fsdp / "mosaic_gpt_nan")
    assert all(torch.isfinite(v).all() for v in nan_run.values())
    # One process skipping the same global step gives the same weights: nothing of the skipped step leaked into the
    # next (neither rank 0's clean micro-batches nor rank 1's first one).
    _assert_same(nan_run, _checkpoint(single / "mosaic_gpt_nan"), atol=1e-5)
    clean = _checkpoint(fsdp / "mosaic_gpt")
    assert any(not torch.allclose(nan_run[k], clean[k], atol=1e-4) for k in clean)


def test_fsdp2_hybrid_sharding_equals_one_process_with_the_same_global_batch(tmp_path):
    # fsdp_hybrid.yaml on one machine: 2 replicas x 2 shards (FSDP needs dp_shard >= 2 and hybrid dp_replicate >= 2,
    # so four processes).
    fsdp, single, reports = _launch(
        tmp_path,
        "fsdp_hybrid.yaml",
        "hybrid",
        ["--num_machines", "1", "--num_processes", "4", "--machine_rank", "0"]
        + ["--parallelism_config_dp_replicate_size", "2", "--parallelism_config_dp_shard_size", "2"],
    )
    assert sorted(r["rank"] for r in reports["mosaic_gpt_4"]) == [0, 1, 2, 3]
    for report in reports["mosaic_gpt_4"]:
        assert report["fsdp2"] and report["global_step"] == train_fsdp_worker.STEPS, report
        assert report["placements"] == ["Replicate()", "Shard(dim=0)"], report  # a 2-D (replicate, shard) mesh
    _assert_same(_checkpoint(fsdp / "mosaic_gpt_4"), _checkpoint(single / "mosaic_gpt_4"), atol=1e-5)
