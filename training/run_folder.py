"""The run folder (`--run_name`) of a training run: which folders a run may write into, its checkpoints, and the
checks of a resume (lineage, flags, model, checkpoint files).

A run marks its folder with `training_run.json` before it writes anything else there (its first checkpoint, or its
TensorBoard files), as conversions write `conversion.json`. A run writes only into a folder that is new (absent or
empty), marked, or a run folder of an earlier version of this trainer (unmarked, holding a complete
`checkpoint_<step>/`); anything else is refused before a model is loaded, so that no file a run did not write is
ever overwritten.

Every checkpoint records in `run_config.json` what resuming from it depends on (`resume_config`): the data and
optimisation flags, the number of processes and a hash of the frozen weights, which come from `--model` rather than
from the checkpoint. A resume with any of them different is refused, naming each difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint_"
RUN_MARKER_NAME = "training_run.json"
TRAINER_ID = "modeling_flamingo.training"
# Where --move_later_checkpoints_aside puts the checkpoints (and exports) of the lineage a resume leaves.
ASIDE_PREFIX = "superseded-"
# What a run writes at the top of its folder besides its checkpoints; moved aside with the later checkpoints.
EXPORT_NAMES = ("model", "checkpoint.pt", "adapter")
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# In every checkpoint: what resuming from it depends on.
RUN_CONFIG_NAME = "run_config.json"

# The flags a checkpoint's data position depends on: which samples, in which batches, on which process.
DATA_FLAGS = (
    "laion_shards",
    "mmc4_shards",
    "batch_size_laion",
    "batch_size_mmc4",
    "train_num_samples_laion",
    "train_num_samples_mmc4",
    "dataset_resampled",
    "workers",
    "gradient_accumulation_steps",
    "seed",
    "mmc4_textsim_threshold",
    "mmc4_max_num_images",
    "mmc4_min_num_images",
    "mmc4_image_order",
    "no_flip",
    "max_image_pixels",  # which images are skipped (a flag of the data loaders; None where not defined)
)
# The flags its optimiser state, schedule and trainable set depend on.
OPTIMISATION_FLAGS = (
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "precision",
    "num_epochs",
    "max_steps",
    "loss_multiplier_laion",
    "loss_multiplier_mmc4",
    "freeze_lm_embeddings",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
)

# The optimisation flags a resume may change with --resume_with_new_optimisation_flags (docs/training.md): they act
# from the resumed step on without changing the trainable set, the optimiser state's shape or the data position.
CHANGEABLE_ON_RESUME = (
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "num_epochs",
    "max_steps",
    "loss_multiplier_laion",
    "loss_multiplier_mmc4",
)


class RunFolderError(ValueError):
    """A run folder that a run must not write into, or a resume that would mix two runs."""


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete `checkpoint_<step>` folders of `run_dir` (with their trainer state), by increasing step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(
        (int(m[1]), p)
        for p in run_dir.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p / TRAINER_STATE_NAME).is_file()
    )


def is_marked(run_dir: Path) -> bool:
    """Whether `run_dir` holds the marker a run writes first."""
    try:
        data = json.loads((run_dir / RUN_MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("writer") == TRAINER_ID


def check_run_folder(run_dir: Path) -> None:
    """Refuse a `--run_name` that is neither new (absent or empty) nor a run folder (marked, or an unmarked folder
    of an earlier version holding a complete checkpoint), naming what it holds."""
    if not os.path.lexists(run_dir):
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"--run_name {run_dir} is a file, not a folder: choose a new folder for the run")
    if is_marked(run_dir) or list_checkpoints(run_dir):
        return
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise RunFolderError(
            f"--run_name {run_dir} holds {shown} and is not a training run folder (no {RUN_MARKER_NAME}): a run "
            "would overwrite them; choose a new or empty folder"
        )


def mark_run_folder(run_dir: Path) -> None:
    """Create `run_dir` if needed and write its marker (once; an unmarked run folder of an earlier version gets it
    at its first resume)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_marked(run_dir):
        return
    marker = {"writer": TRAINER_ID, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_MARKER_NAME}.", suffix=".partial", dir=run_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, run_dir / RUN_MARKER_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def later_checkpoints(run_dir: Path, resume: Path, step: int) -> list[Path]:
    """The checkpoints of `run_dir` that a resume from `resume` (at optimiser step `step`) would mix with: every
    other one at `step` or later. The resumed lineage saves `checkpoint_<step + 1>` onwards, so it would replace some
    of them and leave the others for a later automatic resume to pick."""
    resumed = os.path.realpath(resume)
    return [p for s, p in list_checkpoints(run_dir) if s >= step and os.path.realpath(p) != resumed]


def check_lineage(run_dir: Path, resume: Path, step: int, move_aside: bool) -> list[Path]:
    """Refuse a resume from `resume` while `run_dir` holds later checkpoints, unless `move_aside`; returns those to
    move aside (`move_aside_later`)."""
    later = later_checkpoints(run_dir, resume, step)
    if later and not move_aside:
        listed = ", ".join(p.name for p in later)
        raise RunFolderError(
            f"cannot resume from {resume} (step {step}): run folder {run_dir} holds later checkpoints ({listed}) "
            "that this run would mix with; resume from the latest one, or pass --move_later_checkpoints_aside to "
            f"move them and the exports into a {ASIDE_PREFIX}<date> subfolder"
        )
    return later


def move_aside_later(run_dir: Path, later: list[Path]) -> Path:
    """Move the `later` checkpoints and the run folder's exports (written by that later lineage) into a new
    `superseded-<UTC date and time>/` subfolder of `run_dir`; nothing is deleted. Returns the subfolder."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = run_dir / f"{ASIDE_PREFIX}{stamp}"
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = run_dir / f"{ASIDE_PREFIX}{stamp}-{n}"
    aside.mkdir()
    for path in [*later, *(run_dir / name for name in EXPORT_NAMES)]:
        if os.path.lexists(path):
            os.replace(path, aside / path.name)
    return aside


def weights_sha256(model: torch.nn.Module, skip: Iterable[str] = ()) -> str:
    """A sha256 of `model`'s parameters: every name, dtype and shape, and the values of those not in `skip`.

    The tensors are hashed in threads (hashlib releases the GIL on large buffers), about one second per few GB of
    weights on a many-core machine; call it before the model is sharded (FSDP, DeepSpeed), on every process.
    """
    skip = set(skip)
    params = list(model.named_parameters())

    def digest(item: tuple[str, torch.Tensor]) -> str:
        name, tensor = item
        if name in skip:
            return ""
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        return hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, params))
    total = hashlib.sha256()
    for (name, tensor), value in zip(params, digests, strict=True):
        total.update(f"{name} {tensor.dtype} {tuple(tensor.shape)} {value}\n".encode())
    return total.hexdigest()


def resume_config(args: Any, num_processes: int | None = None, frozen_weights: str | None = None) -> dict[str, Any]:
    """What resuming a checkpoint depends on, as saved in its `run_config.json`: `{"flags": {name: value}}` (the data
    and optimisation flags, plus `num_processes` when given) and `{"model": {"frozen_weights_sha256", "source"}}`
    when `frozen_weights` (`weights_sha256` of the parameters a checkpoint does not store) is given."""
    flags = {name: getattr(args, name, None) for name in DATA_FLAGS + OPTIMISATION_FLAGS}
    if num_processes is not None:
        flags["num_processes"] = num_processes
    config: dict[str, Any] = {"flags": json.loads(json.dumps(flags))}  # lists, not tuples: as read back
    if frozen_weights is not None:
        source = getattr(args, "model", None) or f"--init_from {getattr(args, 'lm_path', None)}"
        config["model"] = {"frozen_weights_sha256": frozen_weights, "source": source}
    return config


def read_resume_config(checkpoint: Path) -> dict[str, Any] | None:
    """The `run_config.json` of `checkpoint`, or None for a checkpoint of an earlier version (none written)."""
    path = checkpoint / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path} is unreadable ({exc}): resume from another checkpoint") from None
    if not (isinstance(data, dict) and isinstance(data.get("flags"), dict)):
        raise RunFolderError(f"{path} is not a run configuration of this trainer: resume from another checkpoint")
    return data


def check_resume_config(
    checkpoint: Path, saved: dict[str, Any], current: dict[str, Any], allowed: Iterable[str] = ()
) -> list[str]:
    """Refuse a resume whose flags or model differ from those `saved` in `checkpoint`, naming each difference with
    its old and new values; the flags in `allowed` may differ. Only what both record is compared (flags added later
    are not in older checkpoints). Returns the `allowed` flags that differ."""
    allowed = set(allowed)
    changed = [
        name for name in allowed if name in saved["flags"] and saved["flags"][name] != current["flags"].get(name)
    ]
    differences = [
        f"--{name} {json.dumps(old)} -> {json.dumps(current['flags'][name])}"
        if name != "num_processes"
        else f"{old} processes -> {current['flags'][name]}"
        for name, old in saved["flags"].items()
        if name in current["flags"] and current["flags"][name] != old and name not in allowed
    ]
    old_model, new_model = saved.get("model"), current.get("model")
    if isinstance(old_model, dict) and new_model is not None:
        if old_model.get("frozen_weights_sha256") != new_model["frozen_weights_sha256"]:
            differences.append(
                f"another model (frozen weights differ; trained from {old_model.get('source')}, now "
                f"{new_model['source']})"
            )
    if differences:
        changeable = any(d.startswith(f"--{name} ") for d in differences for name in CHANGEABLE_ON_RESUME)
        hint = " (--resume_with_new_optimisation_flags lets the optimisation flags change)" if changeable else ""
        raise RunFolderError(
            f"cannot resume from {checkpoint}: {'; '.join(differences)}. Resume with the flags and model it was "
            f"trained with ({checkpoint / RUN_CONFIG_NAME}){hint}"
        )
    return sorted(changed)


def check_checkpoint_files(checkpoint: Path, process_index: int) -> None:
    """Read every pickle of `checkpoint` that `Accelerator.load_state` loads on this process (optimizer, scheduler,
    grad scaler, this process's random states), as it does (`torch.load(weights_only=True)` with Accelerate's
    allowed globals: no pickle runs code) but memory-mapped, so that a truncated, corrupt or foreign file is named
    in one line before anything is loaded. Accelerate itself would fail without naming the file, or, for the random
    states, silently resume with other random numbers."""
    from accelerate.utils import load

    random_states = checkpoint / f"random_states_{process_index}.pkl"
    if not random_states.is_file():
        raise RunFolderError(
            f"{checkpoint} holds no {random_states.name}: it was saved by fewer processes; resume with as many "
            "processes as the run that saved it"
        )
    files = [random_states, *checkpoint.glob("optimizer*.bin"), *checkpoint.glob("scheduler*.bin")]
    files += [checkpoint / "scaler.pt"] if (checkpoint / "scaler.pt").is_file() else []
    for path in files:
        try:
            load(path, map_location="cpu", mmap=True)
        except Exception as exc:
            message = " ".join(str(exc).split())
            if "Weights only load failed" in message or "Unsupported global" in message:
                reason = "it holds Python objects other than a training state; refusing to unpickle them"
            else:
                reason = f"it is truncated or corrupt ({message[:120]})"
            raise RunFolderError(
                f"cannot resume from {checkpoint}: {path.name}: {reason}; resume from another checkpoint"
            ) from None


def check_deepspeed_files(checkpoint: Path) -> None:
    """DeepSpeed unpickles its own checkpoint files with `weights_only=False`: refuse any whose pickles import a
    global other than those `torch.load(weights_only=True)` allows and DeepSpeed's own classes (read from the
    opcodes, nothing executed), so that a foreign file cannot run code on resume."""
    from torch import _weights_only_unpickler as wou

    from modeling_flamingo.convert.sources import pickle_globals

    allowed = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    for path in sorted(checkpoint.rglob("*.pt")):
        foreign = [n for n in pickle_globals(path) if n not in allowed and not n.startswith("deepspeed.")]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise RunFolderError(
                f"cannot resume from {checkpoint}: {path.relative_to(checkpoint)}: it imports "
                f"{', '.join(foreign[:3])}{more}, which DeepSpeed would unpickle without weights_only; refusing to "
                "load it: resume from another checkpoint"
            )


def disk_write_failure(exc: BaseException) -> str | None:
    """What went wrong, in a few words, when `exc` is a failed write (a full disk, a quota, an I/O error), else None.
    torch and safetensors report a failed write as their own errors, not as OSError."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    message = " ".join(str(exc).split())
    if any(marker in message for marker in ("file write failed", "No space left", "os error 28", "IoError")):
        return message[:160]
    return None


__all__ = [
    "CHANGEABLE_ON_RESUME",
    "CHECKPOINT_PREFIX",
    "DATA_FLAGS",
    "OPTIMISATION_FLAGS",
    "RUN_CONFIG_NAME",
    "RUN_MARKER_NAME",
    "TRAINER_STATE_NAME",
    "RunFolderError",
    "check_checkpoint_files",
    "check_deepspeed_files",
    "check_lineage",
    "check_resume_config",
    "check_run_folder",
    "disk_write_failure",
    "list_checkpoints",
    "mark_run_folder",
    "move_aside_later",
    "read_resume_config",
    "resume_config",
    "weights_sha256",
]
