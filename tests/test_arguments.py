"""The CLIs' shared argument convention (`modeling_flamingo.arguments`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from modeling_flamingo.arguments import FlamingoArgumentParser, arg


@dataclasses.dataclass
class _Args:
    model: str = arg(help="the model")
    precision: Literal["fp32", "bf16"] = arg("fp32", help="weights dtype")
    shots: list[int] = arg([0, 4], help="demonstrations")
    resume: bool = arg(False, help="continue")
    max_steps: int | None = arg(None, help="stop after")


def _parser() -> FlamingoArgumentParser:
    return FlamingoArgumentParser(_Args, prog="prog")


def test_flags_with_either_spelling_into_the_dataclass():
    (args,) = _parser().parse(["--model", "m", "--shots", "1", "2", "--resume", "--max-steps", "3"])
    assert args == _Args(model="m", precision="fp32", shots=[1, 2], resume=True, max_steps=3)
    (args,) = _parser().parse(["--model", "m", "--max_steps", "5"])
    assert args.max_steps == 5 and args.shots == [0, 4] and args.resume is False


def test_list_default_is_not_shared_between_parses():
    (first,) = _parser().parse(["--model", "m"])
    first.shots.append(8)
    (second,) = _parser().parse(["--model", "m"])
    assert second.shots == [0, 4]


def test_switch_takes_no_value(capsys):
    with pytest.raises(SystemExit) as exited:
        _parser().parse(["--model", "m", "--resume", "false"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: false\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "m", "--bogus"], "error: unrecognized arguments: --bogus\n"),
        (["--model", "m", "--precision", "x"], "error: argument --precision: invalid choice: 'x' (choose from "),
        ([], "error: the following arguments are required: --model\n"),
    ],
)
def test_bad_command_line_is_one_error_line_with_status_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        _parser().parse(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_help_shows_defaults_except_for_switches_and_none(capsys):
    with pytest.raises(SystemExit):
        _parser().parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "weights dtype (default: fp32)" in out and "demonstrations (default: [0, 4])" in out
    assert "continue (default" not in out and "stop after (default" not in out


def _at_least_two(text: str) -> int:
    if int(text) < 2:
        raise ValueError(text)
    return int(text)


@dataclasses.dataclass
class _Explicit:
    tags: list[str] = arg([], help="zero or more", nargs="*")
    pairs: int = arg(2, help="two or more", type=_at_least_two)


def test_argparse_keywords_given_to_arg_win_over_those_the_type_implies(capsys):
    parser = FlamingoArgumentParser(_Explicit, prog="prog")
    assert parser.parse(["--tags"]) == (_Explicit(tags=[], pairs=2),)  # nargs="*", not the list type's "+"
    assert parser.parse(["--tags", "a", "b", "--pairs", "3"]) == (_Explicit(tags=["a", "b"], pairs=3),)
    with pytest.raises(SystemExit) as exited:
        parser.parse(["--pairs", "1"])  # the field's own type, not int
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: argument --pairs: invalid _at_least_two value: '1'\n"
