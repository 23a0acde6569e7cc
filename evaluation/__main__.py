"""`python -m modeling_flamingo.evaluation` / `openflamingo-eval`: the original `evaluate.py`'s flags on our model.

Every flag of the original keeps its name and meaning and is also accepted with `-` for `_`; only the model flags
differ (`--model PATH_OR_ID`, `--precision`, `--device_map`). A bad command line prints one `error: ...` line and
exits 2; bad input prints one `error: ...` line and exits 1 without writing a results file; Ctrl-C exits 130, saying
what is saved and the command that continues the run.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence

from modeling_flamingo.arguments import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, FlamingoArgumentParser
from modeling_flamingo.evaluation.arguments import EvalArguments
from modeling_flamingo.evaluation.data_dir import DATA_DIR_LAYOUT
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.metrics import MissingDependencyError


def build_parser() -> FlamingoArgumentParser:
    """The parser of `EvalArguments`: `parse(argv)` gives `(EvalArguments,)`, `parse_args(argv)` a namespace."""
    return FlamingoArgumentParser(
        EvalArguments,
        prog="openflamingo-eval",
        description=__doc__.split("\n\n")[0],
        epilog="--data_dir layout: " + ", ".join(sorted(set(DATA_DIR_LAYOUT.values()))),
    )


def parse_arguments(argv: Sequence[str] | None = None) -> EvalArguments:
    """The arguments of a command line (default `sys.argv[1:]`); a bad one exits 2 with one `error:` line."""
    (args,) = build_parser().parse(argv)
    if args.rices_vision_encoder_path == "ViT-L-14":  # the original's open_clip name for the same weights
        args = dataclasses.replace(args, rices_vision_encoder_path="openai/clip-vit-large-patch14")
    return args


def resume_command(argv: list[str]) -> str:
    """The command line that continues a run started with `argv`: the same arguments plus `--resume`."""
    if os.path.basename(sys.argv[0]) == "__main__.py":  # python -m modeling_flamingo.evaluation
        program = [sys.executable, "-m", "modeling_flamingo.evaluation"]
    else:
        program = ["openflamingo-eval"]
    resume = [] if "--resume" in argv else ["--resume"]
    return shlex.join(program + list(argv) + resume)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit status: 0, 1 on bad input or an unwritable output (one `error:` line),
    130 when interrupted (Ctrl-C), after saying what is saved and how to continue. A bad command line exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    from modeling_flamingo.evaluation.runner import RunProgress, run_evaluation

    progress = RunProgress()
    try:
        run_evaluation(args, progress=progress)  # applies --data_dir first
    except (EvalInputError, MissingDependencyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if progress.trial is None:
            print("Interrupted before any trial started: this run saved no prediction.", file=sys.stderr)
        else:
            print(
                f"Interrupted: {progress.trial}: {progress.saved()} of {progress.total} items saved in {progress.path} "
                "(earlier trials are complete). Continue with:\n" + resume_command(argv),
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
