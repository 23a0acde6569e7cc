"""The evaluation's run arguments: their checks against the ranges and the selected tasks' split sizes."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.sampling import effective_num_shots
from modeling_flamingo.evaluation.tasks import LoadedTask


def check_run_arguments(args: argparse.Namespace) -> None:
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
    )
    optional = (  # flags a programmatic Namespace may leave out
        ("class_batch_size", 1, "must be 1 or more"),
        ("latents_cache_mb", 0, "must be 0 (no cache) or more"),
        ("max_image_pixels", 1, "must be 1 or more"),
    )
    for ok, message in limits:
        if not ok:
            raise EvalInputError(message)
    for flag, minimum, rule in optional:
        value = getattr(args, flag, minimum)
        if value < minimum:
            raise EvalInputError(f"--{flag} {value}: {rule}.")


def check_split_sizes(args: argparse.Namespace, loaded: Mapping[str, LoadedTask]) -> None:
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
