"""`openflamingo-eval`'s arguments: typed (`EvalArguments`, frozen), `--data_dir` filling a new value and what it
accepts as a hub dataset id, the hidden compatibility flags, and the command-line error convention."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from modeling_flamingo.evaluation.__main__ import build_parser, main, parse_arguments
from modeling_flamingo.evaluation.arguments import EvalArguments
from modeling_flamingo.evaluation.data_dir import apply_data_dir
from modeling_flamingo.evaluation.tasks import TASKS


@pytest.mark.parametrize("value", ["owner/two words", "owner/name:main", "owner/"])
def test_data_dir_neither_folder_nor_repo_id(tmp_path, capsys, value):
    """The converter's rule for a hub id (`modeling_flamingo.convert.sources.looks_like_repo_id`) decides: anything
    else that is not a folder is refused by name, before any download or model load."""
    argv = ["--model", str(tmp_path / "no-model"), "--eval_vizwiz", "--data_dir", value]
    assert main(argv + ["--results_file", str(tmp_path / "r.json")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == [f"error: --data_dir: {value} is neither a folder nor a hub dataset id."]
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Typed arguments


def test_data_dir_gives_new_arguments(tmp_path):
    """`apply_data_dir` returns the filled arguments; the parsed ones are frozen and stay as parsed."""
    args = parse_arguments(["--model", "m", "--data_dir", str(tmp_path), "--eval_vizwiz"])
    filled = apply_data_dir(args)
    for flag, path in TASKS["vizwiz"].data_layout.items():
        assert getattr(args, flag) is None
        assert getattr(filled, flag) == str(tmp_path / path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.shots = [0]


def test_namespace_of_build_parser_gives_the_same_arguments():
    """`run_evaluation` also takes `build_parser().parse_args(...)`'s namespace: converted to the same arguments, and a
    namespace without a flag takes its default."""
    argv = ["--model", "m", "--eval-coco", "--shots", "0", "2", "--num_samples", "5", "--coco_karpathy_json_path", "k"]
    args = parse_arguments(argv)
    assert EvalArguments.from_namespace(build_parser().parse_args(argv)) == args
    assert EvalArguments.from_namespace(argparse.Namespace(model="m")) == parse_arguments(["--model", "m"])
    assert isinstance(args, EvalArguments) and args.shots == [0, 2] and args.eval_coco and not args.eval_vqav2


def test_compatibility_flags_accepted_and_hidden(monkeypatch, capsys):
    """The original's distributed flags parse (both spellings) and stay out of `--help`."""
    args = parse_arguments(["--model", "m", "--dist-url", "tcp://h:1", "--dist_backend", "nccl", "--horovod"])
    assert (args.dist_url, args.dist_backend, args.horovod, args.no_set_device_rank) == (
        "tcp://h:1",
        "nccl",
        True,
        False,
    )
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        parse_arguments(["--help"])
    help_text = capsys.readouterr().out
    assert "--eval_hateful_memes" in help_text
    assert not any(
        flag in help_text for flag in ("dist-url", "dist_url", "horovod", "set-device-rank", "dist_backend")
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--nope"], "error: unrecognized arguments: --nope"),
        (["--model", "m", "--batch_size", "x"], "error: argument --batch_size/--batch-size: invalid int value: 'x'"),
        (["--eval_coco"], "error: the following arguments are required: --model"),
    ],
)
def test_bad_command_line_is_one_error_line(capsys, argv, message):
    """The CLIs' convention: one `error:` line, exit status 2 (argparse's usage block is left to --help)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message]
