"""Few-shot evaluation of OpenFlamingo models with the original protocol (captioning, VQA, classification).

`modeling_flamingo.evaluation` is the top-level `evaluation/` folder of the repository.

Python entry points (what the CLI calls; a benchmark can call them too):

    from modeling_flamingo.evaluation import FlamingoEvalModel, build_parser, run_evaluation

    args = build_parser().parse_args(["--model", path, "--eval_coco", ...])
    results = run_evaluation(args, FlamingoEvalModel.from_pretrained(path))
"""

__all__ = ["TASKS", "EvalInputError", "FlamingoEvalModel", "build_parser", "run_evaluation"]


def __getattr__(name: str):
    # Lazy: `python -m modeling_flamingo.evaluation --help` and the metrics need no model code imported.
    if name == "FlamingoEvalModel":
        from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel

        return FlamingoEvalModel
    if name == "run_evaluation":
        from modeling_flamingo.evaluation.runner import run_evaluation

        return run_evaluation
    if name == "build_parser":
        from modeling_flamingo.evaluation.__main__ import build_parser

        return build_parser
    if name == "TASKS":
        from modeling_flamingo.evaluation.tasks import TASKS

        return TASKS
    if name == "EvalInputError":
        from modeling_flamingo.evaluation.datasets import EvalInputError

        return EvalInputError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
