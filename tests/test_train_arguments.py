"""The training command line as typed dataclasses (`modeling_flamingo.training.arguments`): one group per `--help`
section, the flags' names as fields, the loss multipliers by dataset, and what the data loaders are given."""

from __future__ import annotations

import dataclasses

import pytest

from modeling_flamingo.training.arguments import (
    ARGUMENT_GROUPS,
    DataArguments,
    DataLoaderArguments,
    TrainingArguments,
)
from modeling_flamingo.training.cli import build_parser, parse_args
from modeling_flamingo.training.run_folder import DATA_FLAGS

BASE = ["--model", "some/model", "--laion_shards", "x.tar"]


def _names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_training_arguments_hold_every_group_in_help_order():
    assert _names(TrainingArguments) == [name for group in ARGUMENT_GROUPS for name in _names(group)]
    args = parse_args([*BASE, "--seed", "7", "--batch-size-mmc4", "3", "--no_flip"])
    assert isinstance(args, TrainingArguments)
    groups = build_parser().parse([*BASE, "--seed", "7", "--batch-size-mmc4", "3", "--no_flip"])
    assert [type(g) for g in groups] == list(ARGUMENT_GROUPS)
    assert TrainingArguments.from_groups(*groups) == args


def test_data_loaders_get_the_data_flags_and_the_seed():
    args = parse_args([*BASE, "--seed", "7", "--mmc4_image_order", "text", "--max-image-pixels", "2352"])
    data = args.data_loader_arguments()
    assert type(data) is DataLoaderArguments
    # What a checkpoint's data position depends on (run_folder.DATA_FLAGS): the data flags, the seed and the
    # accumulation (which the trainer, not the loaders, reads).
    assert set(_names(DataLoaderArguments)) == set(DATA_FLAGS) - {"gradient_accumulation_steps"}
    assert set(_names(DataArguments)) == set(DATA_FLAGS) - {"gradient_accumulation_steps", "seed"}
    assert (data.seed, data.mmc4_image_order, data.max_image_pixels, data.laion_shards) == (7, "text", 2352, "x.tar")


def test_loss_multiplier_by_dataset_name():
    args = parse_args([*BASE, "--loss_multiplier_laion", "0.2"])
    assert (args.loss_multiplier("laion"), args.loss_multiplier("mmc4"), args.loss_multiplier("other")) == (0.2, 1, 1)


def test_list_flags_take_zero_or_more_values():
    assert parse_args([*BASE, "--report_to"]).report_to == []
    assert parse_args([*BASE, "--lora-target-modules", "q_proj", "v_proj"]).lora_target_modules == ["q_proj", "v_proj"]


def test_help_lists_the_groups_with_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    headers = [group._argument_group_name + ":" for group in ARGUMENT_GROUPS]
    assert all(header in out.splitlines() for header in headers), out
    assert [out.index(header) for header in headers] == sorted(out.index(header) for header in headers)
    assert "checkpoint.pt (default: openflamingo3B)" in " ".join(out.split())
