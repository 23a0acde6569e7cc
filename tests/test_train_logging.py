"""Tracker logging for real: the scalars the trainer logs reach TensorBoard's event files and an offline W&B run
with the values the trainer computed (losses per dataset, the schedule's learning rate, samples/s and tokens/s,
skipped counts), the W&B run is created as the original's `--report_to_wandb` creates it, and the progress bar and
the printed log line carry the same numbers."""

from __future__ import annotations

import copy
import glob
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_data_helpers import make_laion_shards, make_mmc4_shards
from transformers import get_linear_schedule_with_warmup

from modeling_flamingo.training import FlamingoTrainer
from modeling_flamingo.training.trainer import build_trackers

from train_helpers import (
    batches,
    fresh_accelerate_state,
    loader_factory,
    offline_wandb_env,
    tiny_model,
    tiny_processor,
    train_args,
)

SCALARS = ["loss_laion", "loss_mmc4", "lr", "samples_per_second", "tokens_per_second", "skipped_steps"]


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from the event files directly in `folder` (the hparams run lies in a subfolder)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(run_file: Path) -> dict[str, list]:
    """The run, config and history records of an offline `.wandb` file, read with W&B's own record reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    records: dict[str, list] = {"run": [], "config": [], "history": []}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            records["run"].append(record.run)
        elif kind == "config":
            records["config"].append({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            records["history"].append(row)
    return records


def scheduled_lrs(base_lr: float, warmup: int, total: int, stepped: list[bool]) -> list[float]:
    """The learning rate after each optimiser step, from transformers' linear schedule (the scheduler does not move
    on a skipped step)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    lrs = []
    for moved in stepped:
        if moved:
            optimizer.step()
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_tensorboard_event_files_hold_the_scalars_the_trainer_computed(tmp_path):
    model, tokenizer = tiny_model()
    initial = copy.deepcopy(model)
    laion, mmc4 = batches(tokenizer, 4)
    # Step 2: finite pixel values that overflow in the vision tower, so the MMC4 loss is not finite and the step is
    # skipped. Step 3: the LAION loader reports two undecodable samples.
    mmc4[1] = dict(mmc4[1], pixel_values=torch.full_like(mmc4[1]["pixel_values"], 1e38))
    laion[2] = dict(laion[2], skipped={"decode_error": 2})
    run = tmp_path / "run"
    args = train_args(
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler="linear",
        logging_steps=1,
        run_name=str(run),
        report_to=["tensorboard"],
    )
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, model, None, loader_factory(laion, mmc4))
        computed: list[dict[str, float]] = []
        forward_backward = trainer.forward_backward
        trainer.forward_backward = lambda *a, **k: computed.append(forward_backward(*a, **k)) or computed[-1]
        trainer.train()

    scalars = tensorboard_scalars(run / "tensorboard")
    assert set(SCALARS) <= scalars.keys()
    assert all(sorted(scalars[tag]) == [1, 2, 3, 4] for tag in SCALARS)

    # The losses are the ones the trainer computed at each step (stored as float32 by TensorBoard)...
    assert len(computed) == 4 and math.isnan(computed[1]["mmc4"]) and math.isfinite(computed[1]["laion"])
    for step, losses in enumerate(computed, start=1):
        for name, value in losses.items():
            logged = scalars[f"loss_{name}"][step]
            assert (math.isnan(logged) and math.isnan(value)) or logged == pytest.approx(value, rel=1e-6), (step, name)
    # ... and those of the untrained model at the first step.
    with torch.no_grad():
        first = {
            name: initial(**batch[0], use_cache=False).loss.item()
            for name, batch in [("laion", laion), ("mmc4", mmc4)]
        }
    assert scalars["loss_laion"][1] == pytest.approx(first["laion"], rel=1e-5)
    assert scalars["loss_mmc4"][1] == pytest.approx(first["mmc4"], rel=1e-5)

    # The learning rate after each step: warmup over 2 steps then linear decay to 0 at step 4, paused at step 2.
    expected_lrs = scheduled_lrs(1e-2, 2, 4, stepped=[True, False, True, True])
    assert [scalars["lr"][s] for s in range(1, 5)] == pytest.approx(expected_lrs, rel=1e-6)
    assert expected_lrs == pytest.approx([5e-3, 5e-3, 1e-2, 5e-3])

    # samples/s and tokens/s share one elapsed time: their ratio is the step's tokens per sample (attended tokens).
    for step in range(1, 5):
        pair = (laion[step - 1], mmc4[step - 1])
        tokens = sum(int(batch["attention_mask"].sum()) for batch in pair)
        samples = sum(batch["input_ids"].shape[0] for batch in pair)
        ratio = scalars["tokens_per_second"][step] / scalars["samples_per_second"][step]
        assert ratio == pytest.approx(tokens / samples, rel=1e-5)
        assert scalars["samples_per_second"][step] > 0

    assert [scalars["skipped_steps"][s] for s in range(1, 5)] == [0, 1, 1, 1]
    assert scalars["skipped/laion/decode_error"] == {3: 2.0}
    # The run's flags are stored with it (accelerate writes them as TensorBoard hparams).
    hparams = glob.glob(str(run / "tensorboard" / "*" / "hparams.yml"))
    assert len(hparams) == 1 and "learning_rate: 0.01" in Path(hparams[0]).read_text()


def test_trackers_follow_the_original_wandb_flags(tmp_path):
    args = train_args(run_name=str(tmp_path / "run"), report_to=["wandb", "tensorboard", "wandb"], wandb_entity="team")
    wandb_tracker, tensorboard_tracker = build_trackers(args)
    # No --wandb_project: W&B picks its default project, as the original's wandb.init(project=None) does.
    assert wandb_tracker.name == "wandb" and wandb_tracker.run_name is None
    assert wandb_tracker.init_kwargs == {"name": str(tmp_path / "run"), "entity": "team"}
    assert tensorboard_tracker.name == "tensorboard" and tensorboard_tracker.logging_dir_param == str(tmp_path / "run")
    args.report_to = ["mlflow"]
    with pytest.raises(ValueError, match="report_to: unknown tracker 'mlflow'"):
        build_trackers(args)


def _wandb_files_outside() -> set[str]:
    """Files W&B would write outside the test's folder if it ignored the environment: its cache, config and
    temporary files, and a `wandb/` folder in the working directory."""
    home = Path.home()
    patterns = [home / ".cache" / "wandb" / "**", home / ".config" / "wandb" / "**", Path.cwd() / "wandb" / "**"]
    patterns.append(Path(tempfile.gettempdir()) / "wandb*")
    return {p for pattern in patterns for p in glob.glob(str(pattern), recursive=True)}


def test_cli_reports_to_wandb_offline_and_tensorboard_with_the_same_numbers(tmp_path):
    model, tokenizer = tiny_model()
    processor = tiny_processor(tokenizer)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    laion = make_laion_shards(tmp_path / "laion", num_shards=2, samples_per_shard=3)
    mmc4 = make_mmc4_shards(tmp_path / "mmc4", num_shards=2, documents_per_shard=3)
    run_name = str(tmp_path / "run")
    env = offline_wandb_env(tmp_path)
    command = [
        sys.executable, "-m", "modeling_flamingo.training", "--model", str(tmp_path / "model"),
        "--laion_shards", laion, "--mmc4_shards", mmc4, "--run_name", run_name, "--offline",
        "--report_to_wandb", "--wandb_project", "flamingo-tests", "--wandb_entity", "my-team", "--report_to", "tensorboard",
        "--batch_size_laion", "2", "--batch_size_mmc4", "2", "--train_num_samples_laion", "4",
        "--train_num_samples_mmc4", "4", "--workers", "0", "--warmup_steps", "1", "--lr_scheduler", "linear",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
    ]  # fmt: skip
    before = _wandb_files_outside()
    # W&B's service puts unix sockets in TMPDIR and falls back to /tmp when their path would be too long for a socket
    # (about 108 bytes), as it is under pytest's tmp_path: a short temporary folder, removed here.
    with tempfile.TemporaryDirectory(prefix="wb") as short_tmp:
        env["TMPDIR"] = short_tmp
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _wandb_files_outside() == before

    # One offline run (--offline means WANDB_MODE=offline, as in the original), created with the original's
    # project, entity and name.
    run_files = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    records = wandb_records(Path(run_files[0]))
    (run,) = records["run"]
    assert (run.project, run.entity, run.display_name) == ("flamingo-tests", "my-team", run_name)
    config = {k: v for update in records["config"] for k, v in update.items()}
    assert config["learning_rate"] == 1e-3 and config["run_name"] == run_name and config["report_to_wandb"] is True

    # The W&B history and the TensorBoard event files hold the same scalars at the same steps.
    history = {row["_step"]: row for row in records["history"]}
    assert sorted(history) == [1, 2]
    scalars = tensorboard_scalars(Path(run_name) / "tensorboard")
    for step, row in history.items():
        assert set(SCALARS) <= row.keys()
        for tag in SCALARS:
            assert scalars[tag][step] == pytest.approx(row[tag], rel=1e-6), (step, tag)
    assert [history[s]["lr"] for s in (1, 2)] == pytest.approx(scheduled_lrs(1e-3, 1, 2, [True, True]))

    # The printed log line and the progress bar carry the same numbers (4 and 3 significant digits).
    for step, row in history.items():
        line = re.search(rf"^step {step}/2 \(epoch \d\) (.*)$", result.stdout, re.MULTILINE)
        assert line, result.stdout[-2000:]
        printed = dict(item.split("=") for item in line[1].split())
        assert printed.keys() == set(SCALARS)
        for tag in SCALARS:
            assert float(printed[tag]) == pytest.approx(row[tag], rel=1e-3, abs=1e-12), (step, tag)
    bars = [b for b in re.split(r"[\r\n]", result.stderr) if b.startswith("training:") and "loss_laion=" in b]
    assert bars, result.stderr[-2000:]
    postfix = dict(item.split("=") for item in bars[-1].rstrip(" ]").split(", ")[-5:])
    last = history[2]
    assert postfix.keys() == {"loss_laion", "loss_mmc4", "lr", "samples/s", "tokens/s"}
    assert float(postfix["loss_laion"]) == pytest.approx(last["loss_laion"], rel=6e-3)
    assert float(postfix["loss_mmc4"]) == pytest.approx(last["loss_mmc4"], rel=6e-3)
    assert float(postfix["tokens/s"]) == pytest.approx(last["tokens_per_second"], rel=6e-3)
