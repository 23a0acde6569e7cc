"""`openflamingo-eval`'s arguments: typed dataclasses parsed by `FlamingoArgumentParser` (the CLIs' convention,
`modeling_flamingo.arguments`), and their checks.

The flags are the original `evaluate.py`'s, with its names, plus ours (docs/evaluation.md). The per-task flags come
from the task registry: `--eval_<name>` and each task's path flags (`TaskArguments`, built from `TASKS`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from modeling_flamingo.arguments import arg
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.sampling import effective_num_shots
from modeling_flamingo.evaluation.tasks import TASKS, LoadedTask
from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
from modeling_flamingo.weight_dtypes import SHORT_DTYPES


@dataclass(frozen=True)
class RunArguments:
    """The model, the outputs and how the run computes (none of these but `--precision` and
    `--zero_shot_classification_images` changes a prediction)."""

    model: str = arg(help="A converted model folder or an original OpenFlamingo hub id.")
    precision: str = arg("fp32", choices=tuple(SHORT_DTYPES), help="Weights dtype.")
    device_map: str | None = arg(None, help='e.g. "auto" to spread a large model over the available devices.')
    results_file: str | None = arg(None, help="JSON results; a Markdown table and predictions/ go beside it.")
    resume: bool = arg(False, help="Continue an interrupted run from its predictions files.")
    data_dir: str | None = arg(None, help="A folder (or hub dataset id) in the openflamingo/eval_benchmark layout.")
    latents_cache_mb: int = arg(2048, help="Memory (MB) for cached image latents; 0 disables it.")
    class_batch_size: int = arg(
        64,
        help="Rows (items x class names) per forward pass when ranking class names; each row holds a copy of its "
        "prompt's cache, so lower it for large models and long prompts.",
    )
    zero_shot_classification_images: str = arg(
        "original",
        choices=("original", "query"),
        help="0-shot classification: pass the two demonstration images like the original (its query then attends "
        "to the first of them), or only the query image.",
    )
    max_image_pixels: int = arg(
        DEFAULT_MAX_IMAGE_PIXELS,
        help="Largest width x height of an evaluation image, read from its header before decoding; a larger image "
        "stops the run with an error naming it (items are never skipped).",
    )


@dataclass(frozen=True)
class TrialArguments:
    """Trials, demonstrations and test items, as the original."""

    shots: list[int] = arg([0, 4, 8, 16, 32], help="Demonstrations per prompt.")
    num_trials: int = arg(1, help="Trials per shot count, one per --trial_seeds seed.")
    trial_seeds: list[int] = arg([42], help="Seed of each trial (demonstrations, test subset).")
    num_samples: int = arg(-1, help="Test items per trial (-1: the whole test split).")
    query_set_size: int = arg(2048, help="Train items the demonstrations are drawn from.")
    batch_size: int = arg(8, help="Test items per batch.")
    no_caching_for_classification: bool = arg(False, help="Encode every class name with its prompt.")
    classification_prompt_ensembling: bool = arg(False, help="Average over demonstration orders.")
    rices: bool = arg(False, help="Choose demonstrations by CLIP image similarity (RICES).")
    rices_vision_encoder_path: str = arg("openai/clip-vit-large-patch14", help="CLIP model of RICES.")
    rices_vision_encoder_pretrained: str = arg("openai", help="Accepted for compatibility; see docs.")
    cached_demonstration_features: str | None = arg(None, help="Folder of RICES features (<task>.pkl).")


def _task_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """`--eval_<name>` of every task, then every task's path flags (a flag two tasks share, once)."""
    switches = [(spec.flag, bool, arg(False)) for spec in TASKS.values()]
    path_flags = dict.fromkeys(flag for spec in TASKS.values() for flag in spec.path_flags)
    return switches + [(flag, str | None, arg(None)) for flag in path_flags]


TaskArguments = dataclasses.make_dataclass("TaskArguments", _task_fields(), frozen=True)
TaskArguments.__doc__ = "Which tasks run (`--eval_<name>`) and their dataset paths: one field per flag of `TASKS`."
TaskArguments.__module__ = __name__  # make_dataclass would name `types` (pickling, reprs)


@dataclass(frozen=True)
class CompatibilityArguments:
    """Flags of the original that are accepted so that existing command lines run, and ignored."""

    vqav2_final_test_questions_json_path: str | None = arg(None, help="Accepted for compatibility (unused).")
    # The original's distributed flags: `accelerate launch` does their job. Hidden from --help.
    dist_url: str = arg("env://", help=argparse.SUPPRESS)
    dist_backend: str | None = arg(None, help=argparse.SUPPRESS)
    horovod: bool = arg(False, help=argparse.SUPPRESS)
    no_set_device_rank: bool = arg(False, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class EvalArguments(CompatibilityArguments, TaskArguments, TrialArguments, RunArguments):
    """Every argument of an evaluation run, in `--help`'s order: `RunArguments`, `TrialArguments`, `TaskArguments`,
    `CompatibilityArguments`."""

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> EvalArguments:
        """The arguments of a namespace (e.g. `build_parser().parse_args(...)`); a flag it lacks takes its default."""
        names = [field.name for field in dataclasses.fields(cls)]
        return cls(**{name: getattr(namespace, name) for name in names if hasattr(namespace, name)})


def check_run_arguments(args: EvalArguments) -> None:
    """Refuse a numeric flag out of its range (raises `EvalInputError`), before any file is read or model loaded."""
    bad_shots = [shots for shots in args.shots if shots < 0]
    limits = (
        (not bad_shots, f"--shots {bad_shots[0] if bad_shots else 0}: a number of demonstrations is 0 or more."),
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: must be 1 or more."),
        (
            args.num_samples == -1 or args.num_samples >= 1,
            f"--num_samples {args.num_samples}: give the number of test items per trial (1 or more), or -1 for the "
            "whole test split.",
        ),
        (args.num_trials >= 1, f"--num_trials {args.num_trials}: must be 1 or more."),
        (args.query_set_size >= 1, f"--query_set_size {args.query_set_size}: must be 1 or more."),
        (args.class_batch_size >= 1, f"--class_batch_size {args.class_batch_size}: must be 1 or more."),
        (args.latents_cache_mb >= 0, f"--latents_cache_mb {args.latents_cache_mb}: must be 0 (no cache) or more."),
        (args.max_image_pixels >= 1, f"--max_image_pixels {args.max_image_pixels}: must be 1 or more."),
    )
    for ok, message in limits:
        if not ok:
            raise EvalInputError(message)


def check_split_sizes(args: EvalArguments, loaded: Mapping[str, LoadedTask]) -> None:
    """Refuse `--num_samples`, `--query_set_size` or `--shots` larger than a selected task's split can give, naming
    the task and the split size (raises `EvalInputError`); called once the splits are read, before the model loads."""
    most_shots = max(effective_num_shots(shots) for shots in args.shots)
    for name, task in loaded.items():
        num_test, num_train = len(task.test), len(task.train)
        if args.num_samples > num_test:
            raise EvalInputError(
                f"--num_samples {args.num_samples} is larger than the {name} test split ({num_test} items)."
            )
        if args.rices:
            if most_shots > num_train:
                raise EvalInputError(
                    f"--shots: {most_shots} demonstrations cannot be retrieved from the {name} train split "
                    f"({num_train} items)."
                )
            continue  # RICES retrieves from the whole train split: no query set is drawn
        if args.query_set_size > num_train:
            raise EvalInputError(
                f"--query_set_size {args.query_set_size} is larger than the {name} train split ({num_train} items)."
            )
        if most_shots > args.query_set_size:
            raise EvalInputError(
                f"--shots: {most_shots} demonstrations cannot be drawn from a query set of {args.query_set_size} "
                f"(--query_set_size) for {name}."
            )
