"""Run folders a researcher can trust: `--delete_previous_checkpoint` deletes only this run's own previous
checkpoint, a resume never mixes lineages, flags or models, folders not written by a training run are never written
into, and a full disk, a corrupt checkpoint file or a data position past the data end the run with one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from modeling_flamingo.training import FlamingoTrainer, build_lr_scheduler, find_latest_checkpoint
from modeling_flamingo.training.cli import main
from modeling_flamingo.training.run_folder import RUN_MARKER_NAME, RunFolderError, check_deepspeed_files

from train_helpers import (
    ListLoader,
    batches,
    fresh_accelerate_state,
    loader_factory,
    scramble_trainable,
    tiny_model,
    train_args,
)


def make_trainer(model, data, **overrides) -> FlamingoTrainer:
    """A trainer with the flags of tests/test_train_loop.py (`overrides` on top), in a fresh Accelerate state."""
    args = train_args(
        learning_rate=1e-2, warmup_steps=1, lr_scheduler="linear", logging_steps=0, loss_multiplier_laion=0.2
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return FlamingoTrainer(args, model, None, loader_factory(*data))


def run(model, data, **overrides) -> FlamingoTrainer:
    with fresh_accelerate_state():
        trainer = make_trainer(model, data, **overrides)
        trainer.train()
    return trainer


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Crash(Exception):
    """Stands for a run killed right after one of its checkpoints was saved."""


def crash_after_first_save(monkeypatch) -> None:
    save = FlamingoTrainer.save_checkpoint

    def save_then_crash(self):
        path = save(self)
        raise Crash(path.name)

    monkeypatch.setattr(FlamingoTrainer, "save_checkpoint", save_then_crash)


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    model, tokenizer = tiny_model()
    data = batches(tokenizer, 4)
    run_dir = tmp_path_factory.mktemp("four") / "run"
    run(model, data, run_name=str(run_dir), checkpointing_steps=1)
    return run_dir, data


@pytest.fixture
def four_checkpoints(four_step_run, tmp_path):
    """A copy of a finished 4-step run with a checkpoint after every step, and the batches it trained on."""
    run_dir, data = four_step_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", data


def test_delete_previous_checkpoint_deletes_only_the_checkpoint_this_run_resumed_from(four_checkpoints, monkeypatch):
    run_dir, data = four_checkpoints
    assert [n for n in names(run_dir) if n.startswith("checkpoint_")] == [f"checkpoint_{i}" for i in range(1, 5)]
    model, _ = tiny_model()
    scramble_trainable(model)
    crash_after_first_save(monkeypatch)
    with pytest.raises(Crash, match="checkpoint_2"):
        run(model, data, run_name=str(run_dir), resume_from_checkpoint=str(run_dir / "checkpoint_1"),
            checkpointing_steps=1, delete_previous_checkpoint=True, move_later_checkpoints_aside=True)  # fmt: skip
    # The resumed lineage saved checkpoint_2 and deleted checkpoint_1, the one it came from; the old lineage's
    # checkpoints (checkpoint_4 the highest step) are not this run's to delete: they were moved aside whole.
    (aside,) = [p for p in run_dir.iterdir() if p.name.startswith("superseded-")]
    assert [n for n in names(run_dir) if n.startswith("checkpoint_")] == ["checkpoint_2"]
    assert names(aside) == ["checkpoint.pt", "checkpoint_2", "checkpoint_3", "checkpoint_4", "model"]


def test_resume_from_an_older_checkpoint_is_refused_naming_the_later_ones(four_checkpoints):
    run_dir, data = four_checkpoints
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    model, _ = tiny_model()
    with pytest.raises(RunFolderError, match=r"holds later checkpoints \(checkpoint_3, checkpoint_4\)"):
        run(model, data, run_name=str(run_dir), resume_from_checkpoint=str(run_dir / "checkpoint_2"))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written, nothing moved


def test_moved_aside_checkpoints_are_kept_whole_and_the_next_automatic_resume_takes_the_new_lineage(
    four_checkpoints,
):
    run_dir, data = four_checkpoints
    later = {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for name in ("checkpoint_3", "checkpoint_4", "model", "checkpoint.pt")
        for p in [run_dir / name, *(run_dir / name).rglob("*")]
        if p.is_file()
    }
    model, _ = tiny_model()
    resumed = run(model, data, run_name=str(run_dir), resume_from_checkpoint=str(run_dir / "checkpoint_2"),
                  move_later_checkpoints_aside=True)  # fmt: skip
    assert resumed.state.global_step == 4
    (aside,) = [p for p in run_dir.iterdir() if p.name.startswith("superseded-")]
    assert {name: (aside / name).read_bytes() for name in later} == later
    # The new lineage's checkpoint_4 is the one an automatic resume now finds (and it is complete).
    assert find_latest_checkpoint(run_dir) == run_dir / "checkpoint_4"
    assert json.loads((run_dir / "checkpoint_4" / "trainer_state.json").read_text())["global_step"] == 4


def test_a_folder_not_written_by_a_run_is_refused_before_the_model_is_loaded(tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"someone else's weights")
    # --model does not exist: the run folder must be refused before any model is looked at.
    status = main(["--model", str(tmp_path / "no_model"), "--laion_shards", "x.tar", "--run_name", str(folder)])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --run_name {folder} holds checkpoint.pt and is not a training run folder (no training_run.json): "
        "a run would overwrite them; choose a new or empty folder"
    ]
    assert names(folder) == ["checkpoint.pt"] and (folder / "checkpoint.pt").read_bytes() == b"someone else's weights"


def test_a_run_marks_its_folder_and_an_unmarked_run_folder_of_an_earlier_version_still_resumes(
    four_checkpoints, capsys
):
    run_dir, data = four_checkpoints
    marker = json.loads((run_dir / RUN_MARKER_NAME).read_text())
    assert marker["writer"] == "modeling_flamingo.training"
    # As an earlier version left it: checkpoints (without run_config.json), exports, no marker.
    (run_dir / RUN_MARKER_NAME).unlink()
    for config in run_dir.glob("checkpoint_*/run_config.json"):
        config.unlink()
    model, _ = tiny_model()
    resumed = run(model, data, run_name=str(run_dir))  # the latest checkpoint: a finished run
    assert resumed.state.global_step == 4
    assert json.loads((run_dir / RUN_MARKER_NAME).read_text())["writer"] == "modeling_flamingo.training"
    assert "records no run configuration (an earlier version wrote it)" in capsys.readouterr().out


def test_resume_with_other_data_or_optimisation_flags_is_refused_naming_each(four_checkpoints, capsys):
    run_dir, data = four_checkpoints
    saved = json.loads((run_dir / "checkpoint_4" / "run_config.json").read_text())
    assert saved["flags"]["batch_size_laion"] == 128 and saved["flags"]["num_processes"] == 1  # train_args defaults
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    model, _ = tiny_model()
    with pytest.raises(RunFolderError) as refused:
        run(model, data, run_name=str(run_dir), batch_size_laion=64, learning_rate=1e-3, lr_scheduler="cosine")
    message = str(refused.value)
    assert message.startswith(f"cannot resume from {run_dir / 'checkpoint_4'}: ")
    for difference in [
        "--batch_size_laion 128 -> 64",
        "--learning_rate 0.01 -> 0.001",
        '--lr_scheduler "linear" -> "cosine"',
    ]:
        assert difference in message
    # The command line says so in one line before it loads the model (which does not exist here).
    status = main(["--model", str(run_dir / "no_model"), "--laion_shards", "unused", "--run_name", str(run_dir),
                   "--batch_size_laion", "64", "--learning_rate", "1e-2", "--lr_scheduler", "linear",
                   "--warmup_steps", "1", "--loss_multiplier_laion", "0.2"])  # fmt: skip
    assert status == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot resume from {run_dir / 'checkpoint_4'}: --batch_size_laion 128 -> 64.")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_resume_with_another_model_is_refused(four_checkpoints):
    run_dir, data = four_checkpoints
    other, _ = tiny_model(seed=1)  # the same architecture, other frozen weights
    with pytest.raises(RunFolderError, match=r"checkpoint_4: another model \(frozen weights differ"):
        run(other, data, run_name=str(run_dir))
    # The same model with other trainable weights resumes: those come from the checkpoint.
    same, _ = tiny_model()
    scramble_trainable(same)
    assert run(same, data, run_name=str(run_dir)).state.global_step == 4


def fail_writes(monkeypatch, name: str, after: int) -> None:
    """`torch.save` into a file whose name contains `name` writes a few bytes, then fails as a full disk does, from
    the `after + 1`-th such file on."""
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and name in Path(f).name:
            seen.append(f)
            if len(seen) > after:
                Path(f).write_bytes(b"\x50\x4b\x03")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("failing", ["optimizer.bin", ".checkpoint.pt."])  # in save_state, in the exports
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_removes_the_partial_one(
    tmp_path, monkeypatch, failing
):
    model, tokenizer = tiny_model()
    data = batches(tokenizer, 2)
    run_dir = tmp_path / "run"
    fail_writes(monkeypatch, failing, after=1)  # the first save (step 1) succeeds, the second one fails
    with pytest.raises(OSError) as error:
        run(model, data, run_name=str(run_dir), checkpointing_steps=1)
    message = str(error.value)
    assert message.startswith(f"could not save {run_dir / 'checkpoint_2'}: No space left on device (")
    assert message.endswith(
        f"; {run_dir / 'checkpoint_1'} is intact: free space under {run_dir} and rerun the same command to resume"
    )
    assert "\n" not in message
    assert names(run_dir) == ["checkpoint.pt", "checkpoint_1", "model", "training_run.json"]
    assert find_latest_checkpoint(run_dir) == run_dir / "checkpoint_1"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)  # the step-1 export, whole


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _RunsCode:
    """A pickle that would create a folder if unpickled without weights_only."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (str(self.folder),)


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        ("optimizer.bin", "it is truncated or corrupt"),
        ("random_states_0.pkl", "it is truncated or corrupt"),  # Accelerate alone would skip it silently
        ("scheduler.bin", "it holds Python objects other than a training state; refusing to unpickle them"),
        ("model.safetensors", "it is truncated or corrupt"),
    ],
)
def test_a_corrupt_checkpoint_file_is_named_and_never_unpickled(four_checkpoints, tmp_path, file, reason):
    run_dir, data = four_checkpoints
    checkpoint = run_dir / "checkpoint_4"
    if reason.startswith("it holds"):
        torch.save({"step": _RunsCode(tmp_path / "code_ran")}, checkpoint / file)
    else:
        _truncate(checkpoint / file)
    model, _ = tiny_model()
    with pytest.raises(ValueError) as error:
        run(model, data, run_name=str(run_dir))
    message = str(error.value)
    assert message.startswith(f"cannot resume from {checkpoint}: {file}: {reason}")
    assert message.endswith("resume from another checkpoint") and "\n" not in message
    assert not (tmp_path / "code_ran").exists()


def test_a_deepspeed_checkpoint_file_importing_foreign_code_is_refused_unread(tmp_path):
    # DeepSpeed's own loader unpickles with weights_only=False; its real checkpoints pass this check
    # (tests/test_train_deepspeed.py resumes from them).
    checkpoint = tmp_path / "checkpoint_2"
    (checkpoint / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt")
    check_deepspeed_files(checkpoint)
    torch.save(
        {"w": _RunsCode(tmp_path / "code_ran")}, checkpoint / "pytorch_model" / "zero_pp_rank_0_optim_states.pt"
    )
    with pytest.raises(RunFolderError) as error:
        check_deepspeed_files(checkpoint)
    assert str(error.value) == (
        f"cannot resume from {checkpoint}: pytorch_model/zero_pp_rank_0_optim_states.pt: it imports "
        f"{os.mkdir.__module__}.mkdir, which DeepSpeed would unpickle without weights_only; refusing to load it: "
        "resume from another checkpoint"
    )
    assert not (tmp_path / "code_ran").exists()


def test_a_data_position_past_the_epoch_is_refused_naming_the_trainer_state(four_checkpoints):
    run_dir, data = four_checkpoints
    for step in (1, 2, 3):
        shutil.rmtree(run_dir / f"checkpoint_{step}")
    state_file = run_dir / "checkpoint_4" / "trainer_state.json"
    state_file.write_text(json.dumps({"epoch": 0, "batches_done": 9, "global_step": 2, "skipped_steps": 0}))
    model, _ = tiny_model()
    with pytest.raises(ValueError) as error:
        run(model, data, run_name=str(run_dir))
    assert str(error.value) == (
        f"{state_file} says 9 batches of epoch 0 were consumed, but an epoch has 4: resume with the data flags of the "
        "run that saved it"
    )

    # Loaders that promise 4 batches but end after 2, while the 3 consumed ones are skipped.
    state_file.write_text(json.dumps({"epoch": 0, "batches_done": 3, "global_step": 3, "skipped_steps": 0}))

    def short(epoch: int) -> dict[str, ListLoader]:
        loaders = {"laion": ListLoader(data[0][:2]), "mmc4": ListLoader(data[1][:2])}
        for loader in loaders.values():
            loader.num_batches = 4
        return loaders

    with fresh_accelerate_state():
        trainer = make_trainer(tiny_model()[0], data, run_name=str(run_dir))
        trainer.loader_factory, trainer._loaders = short, None  # the loaders of the next epochs
        with pytest.raises(ValueError, match="^A data loader of epoch 0 ended before the 3 batches the resumed "):
            trainer.train()


def test_resume_with_new_optimisation_flags_takes_the_new_schedule_from_the_resumed_step(four_checkpoints, tmp_path):
    run_dir, data = four_checkpoints  # lr 1e-2, linear over 4 steps, warmup 1, weight decay 0.1
    new = {"learning_rate": 5e-3, "max_steps": 6, "weight_decay": 0.5, "loss_multiplier_mmc4": 0.5}
    # The lr a run with the new flags from the start has at step 2 (the schedule's own code, stepped twice).
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=new["learning_rate"])
    schedule = build_lr_scheduler(reference, "linear", 1, new["max_steps"])
    for _ in range(2):
        reference.step()
        schedule.step()
    expected_lr = reference.param_groups[0]["lr"]
    with fresh_accelerate_state():
        trainer = make_trainer(tiny_model()[0], data, run_name=str(tmp_path / "new"),
                               resume_from_checkpoint=str(run_dir / "checkpoint_2"),
                               resume_with_new_optimisation_flags=True, **new)  # fmt: skip
        groups = trainer.optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([expected_lr] * len(groups))
        assert groups[0]["weight_decay"] == 0.5 and all(g["weight_decay"] == 0 for g in groups[1:])
        assert trainer.multipliers["mmc4"] == 0.5
        trainer.train()
    assert trainer.state.global_step == 6 and groups[0]["lr"] == 0  # linear decay to 0 at the new last step
    saved = json.loads((tmp_path / "new" / "checkpoint_6" / "run_config.json").read_text())["flags"]
    assert {name: saved[name] for name in new} == new  # the next resume compares with the new values
    # Data flags still may not change.
    with pytest.raises(RunFolderError, match=r"--batch_size_laion 128 -> 64\."):
        run(tiny_model()[0], data, run_name=str(tmp_path / "other"),
            resume_from_checkpoint=str(run_dir / "checkpoint_2"), resume_with_new_optimisation_flags=True,
            batch_size_laion=64, **new)  # fmt: skip
