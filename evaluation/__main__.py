"""`python -m modeling_flamingo.evaluation` / `openflamingo-eval`: the original `evaluate.py`'s flags on our model.

Every flag of the original keeps its name and meaning and is also accepted with `-` for `_`; only the model flags
differ (`--model PATH_OR_ID`, `--precision`, `--device_map`). Bad input prints one `error: ...` line and exits 1
without writing a results file; Ctrl-C exits 130, saying what is saved and the command that continues the run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from modeling_flamingo.evaluation.data_dir import DATA_DIR_LAYOUT
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.metrics import MissingDependencyError
from modeling_flamingo.evaluation.tasks import TASKS
from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default after its help, except for switches and flags without one (False, None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:  # not `in`: a default of 0 is shown
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def add(self, name: str, **kwargs) -> None:
        """Add `--name`, also spelled with dashes for underscores (and the reverse)."""
        spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"])
        self.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="openflamingo-eval", description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add("model", required=True, help="A converted model folder or an original OpenFlamingo hub id.")
    p.add("precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="Weights dtype.")
    p.add("device_map", default=None, help='e.g. "auto" to spread a large model over the available devices.')
    p.add("results_file", default=None, help="JSON results; a Markdown table and predictions/ go beside it.")
    p.add("resume", action="store_true", help="Continue an interrupted run from its predictions files.")
    p.add("data_dir", default=None, help="A folder (or hub dataset id) in the openflamingo/eval_benchmark layout.")
    p.add("latents_cache_mb", type=int, default=2048, help="Memory (MB) for cached image latents; 0 disables it.")
    p.add(
        "class_batch_size",
        type=int,
        default=64,
        help="Rows (items x class names) per forward pass when ranking class names; each row holds a copy of its "
        "prompt's cache, so lower it for large models and long prompts.",
    )
    p.add(
        "zero_shot_classification_images",
        choices=("original", "query"),
        default="original",
        help="0-shot classification: pass the two demonstration images like the original (its query then attends "
        "to the first of them), or only the query image.",
    )
    p.add(
        "max_image_pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="Largest width x height of an evaluation image, read from its header before decoding; a larger image "
        "stops the run with an error naming it (items are never skipped).",
    )

    # Trials, as the original.
    p.add("shots", nargs="+", type=int, default=[0, 4, 8, 16, 32], help="Demonstrations per prompt.")
    p.add("num_trials", type=int, default=1, help="Trials per shot count, one per --trial_seeds seed.")
    p.add("trial_seeds", nargs="+", type=int, default=[42], help="Seed of each trial (demonstrations, test subset).")
    p.add("num_samples", type=int, default=-1, help="Test items per trial (-1: the whole test split).")
    p.add("query_set_size", type=int, default=2048, help="Train items the demonstrations are drawn from.")
    p.add("batch_size", type=int, default=8, help="Test items per batch.")
    p.add("no_caching_for_classification", action="store_true", help="Encode every class name with its prompt.")
    p.add("classification_prompt_ensembling", action="store_true", help="Average over demonstration orders.")
    p.add("rices", action="store_true", help="Choose demonstrations by CLIP image similarity (RICES).")
    p.add("rices_vision_encoder_path", default="openai/clip-vit-large-patch14", help="CLIP model of RICES.")
    p.add("rices_vision_encoder_pretrained", default="openai", help="Accepted for compatibility; see docs.")
    p.add("cached_demonstration_features", default=None, help="Folder of RICES features (<task>.pkl).")

    for spec in TASKS.values():
        p.add(spec.flag, action="store_true")
    for spec in TASKS.values():
        for flag in spec.path_flags:
            if f"--{flag}" not in p._option_string_actions:
                p.add(flag, default=None)
    p.add("vqav2_final_test_questions_json_path", default=None, help="Accepted for compatibility (unused).")
    # The original's distributed flags: accepted so existing command lines run; `accelerate launch` does this job.
    p.add("dist-url", default="env://", help=argparse.SUPPRESS)
    p.add("dist-backend", default=None, help=argparse.SUPPRESS)
    p.add("horovod", action="store_true", help=argparse.SUPPRESS)
    p.add("no-set-device-rank", action="store_true", help=argparse.SUPPRESS)
    p.epilog = "--data_dir layout: " + ", ".join(sorted({v for v in DATA_DIR_LAYOUT.values()}))
    return p


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
    130 when interrupted (Ctrl-C), after saying what is saved and how to continue."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.rices_vision_encoder_path == "ViT-L-14":  # the original's open_clip name for the same weights
        args.rices_vision_encoder_path = "openai/clip-vit-large-patch14"
    from modeling_flamingo.evaluation.runner import RunProgress, run_evaluation

    progress = RunProgress()
    try:
        run_evaluation(args, progress=progress)  # applies --data_dir first
    except (EvalInputError, MissingDependencyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if progress.trial is None:
            print("Interrupted before any trial started: this run saved no prediction.", file=sys.stderr)
        else:
            print(
                f"Interrupted: {progress.trial}: {progress.saved()} of {progress.total} items saved in {progress.path} "
                "(earlier trials are complete). Continue with:\n" + resume_command(argv),
                file=sys.stderr,
            )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
