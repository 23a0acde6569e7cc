"""The one command-line convention of `openflamingo-eval`, `openflamingo-train` and `openflamingo-convert`.

Each CLI declares its arguments as dataclasses (typed, with their help text and defaults in one place) and parses
them with `FlamingoArgumentParser`, transformers' `HfArgumentParser` with these rules:

- every flag is accepted as `--some_flag` and `--some-flag`;
- `--help` shows each flag's default (switches and flags without a default show none);
- a bad command line prints one `error: ...` line on stderr (no usage block: `--help` has it) and exits with
  status 2; each CLI reports failures while running as one `error: ...` line with status 1, and Ctrl-C with 130
  (`openflamingo-convert` keeps status 1 for a bad command line too).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from transformers import HfArgumentParser

# Exit statuses shared by the three CLIs.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def arg(default: Any = dataclasses.MISSING, help: str | None = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is one command-line flag: `default` (a list default is copied per instance), `help`,
    and any further `argparse.add_argument` keyword (`choices`, `metavar`, `aliases`, `nargs`, ...)."""
    metadata = dict(argparse_kwargs)
    if help is not None:
        metadata["help"] = help
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default after its help, except for switches and flags without one (False, None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:  # not `in`: a default of 0 is shown
            return action.help or ""
        return super()._get_help_string(action)


class FlamingoArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with the CLIs' convention (module docstring): `parse(argv)` returns one instance of each
    dataclass, and every error is one `error: ...` line with exit status 2."""

    def __init__(self, dataclass_types: type | Iterable[type], **kwargs: Any):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        # A switch (bool, default False) is a plain `store_true` flag, as in the original CLIs: `--resume`, never
        # `--resume false` (HfArgumentParser would take an optional value).
        if field.type is bool and field.default is False:
            kwargs = dict(field.metadata)
            aliases = kwargs.pop("aliases", [])
            names = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}", *aliases])
            parser.add_argument(*names, action="store_true", dest=field.name, **kwargs)
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
        # `nargs` and `type` given to `arg` win over those HfArgumentParser derives from the field's type (a list
        # field would take `nargs="+"`, an int field `type=int`).
        action = parser._option_string_actions[f"--{field.name}"]
        for key in ("nargs", "type"):
            if key in field.metadata:
                setattr(action, key, field.metadata[key])

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message}\n")

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse `argv` (default `sys.argv[1:]`) into the dataclasses; an unknown flag is an error like any other."""
        outputs = self.parse_args_into_dataclasses(
            args=list(sys.argv[1:] if argv is None else argv), return_remaining_strings=True
        )
        *dataclass_values, remaining = outputs
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(dataclass_values)
