"""Few-shot evaluation of OpenFlamingo models with the original protocol (captioning, VQA, classification).

`modeling_flamingo.evaluation` is the top-level `evaluation/` folder of the repository.

Python entry points (what the CLI calls; a benchmark can call them too):

    from modeling_flamingo.evaluation import FlamingoEvalModel, parse_arguments, run_evaluation

    args = parse_arguments(["--model", path, "--eval_coco", ...])  # an EvalArguments (frozen dataclass)
    results = run_evaluation(args, FlamingoEvalModel.from_pretrained(path))

`build_parser()` is the CLI's parser (`FlamingoArgumentParser`); a namespace from its `parse_args` is accepted too.
"""

__all__ = [
    "TASKS",
    "EvalArguments",
    "EvalInputError",
    "FlamingoEvalModel",
    "build_parser",
    "parse_arguments",
    "run_evaluation",
]


def __getattr__(name: str):
    # Lazy: `python -m modeling_flamingo.evaluation --help` and the metrics need no model code imported.
    if name == "FlamingoEvalModel":
        from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel

        return FlamingoEvalModel
    if name == "run_evaluation":
        from modeling_flamingo.evaluation.runner import run_evaluation

        return run_evaluation
    if name in ("build_parser", "parse_arguments"):
        from modeling_flamingo.evaluation import __main__

        return getattr(__main__, name)
    if name == "EvalArguments":
        from modeling_flamingo.evaluation.arguments import EvalArguments

        return EvalArguments
    if name == "TASKS":
        from modeling_flamingo.evaluation.tasks import TASKS

        return TASKS
    if name == "EvalInputError":
        from modeling_flamingo.evaluation.datasets import EvalInputError

        return EvalInputError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
