"""What every evaluation task is: `TaskSpec`, the one definition the runner is generic over, and its loaded splits.

A task owns all of its facts: its title in the results table, the layout of its files under `--data_dir` (which
also names its path flags), how its splits are read, its prompts, how a prediction is made and post-processed, and
its metric. The families (`captioning`, `vqa`, `classification`) implement the parts they share; a task is one
instance of a family with its own fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from modeling_flamingo.evaluation.datasets import EvalItem
from modeling_flamingo.processing.processing_flamingo import EOC_TOKEN

if TYPE_CHECKING:
    from modeling_flamingo.evaluation.arguments import EvalArguments
    from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel

# A prompt with its demonstrations: (text, the items whose images it holds).
Prompt = tuple[str, list[EvalItem]]
# (task score, per-item scores) from `{id: prediction}` and `{id: references}`.
Metric = Callable[[Mapping[Any, Any], Mapping[Any, Any]], tuple[float, dict[Any, float]]]


@dataclass
class LoadedTask:
    train: list[EvalItem]
    test: list[EvalItem]
    references: dict[Any, list[str]]  # metric ground truth per test id


@dataclass(kw_only=True)
class TaskSpec:
    """One benchmark. Prompts are the original's (`eval/models/open_flamingo.py`): a demonstration is `prompt(item)`
    followed by its answer and `<|endofchunk|>`, the query leaves the answer empty and has no `<|endofchunk|>`.

    Attributes:
        name: key in the results file (the original's: coco, flickr30, vqav2, ok_vqa, vizwiz, textvqa, imagenet,
            hateful_memes); also the file name of cached RICES features (`<name>.pkl`). Its flag is `--eval_<name>`.
        title: its row title in the Markdown table (the model cards' wording).
        data_layout: `{path flag: path under --data_dir}`, the task's dataset flags in the order it reads them.
        prompt: the text of an item before its answer.
        demo_join: appended after every demonstration.
        metric: (task score, per-item scores) in the original's units: CIDEr x100, VQA accuracy 0-100, ImageNet top-1
            accuracy and Hateful Memes ROC AUC as fractions.
        percent: the stored score is a fraction, shown in percent in the Markdown table.
        preflight: checks what the metric needs (raises), called before the model loads.
    """

    kind: ClassVar[str]  # the family: "captioning", "vqa" or "classification"
    # Whether `--classification_prompt_ensembling` and `--zero_shot_classification_images` apply to the task.
    prompt_ensembling: ClassVar[bool] = False
    zero_shot_demo_images: ClassVar[bool] = False

    name: str
    title: str
    data_layout: Mapping[str, str]
    prompt: Callable[[EvalItem], str]
    demo_join: str
    metric: Metric
    percent: bool = False
    preflight: Callable[[], None] | None = None

    @property
    def flag(self) -> str:
        """The `--eval_*` flag that selects the task."""
        return f"eval_{self.name}"

    @property
    def path_flags(self) -> tuple[str, ...]:
        """The dataset flags it reads."""
        return tuple(self.data_layout)

    # --- data

    def load(self, args: EvalArguments) -> LoadedTask:
        """Read the splits from the paths in the parsed arguments (raises `EvalInputError` on bad input)."""
        raise NotImplementedError

    def loaded(
        self,
        train: list[EvalItem],
        test: list[EvalItem],
        references: dict[Any, list[str]],
        args: EvalArguments,
    ) -> LoadedTask:
        """The splits, every item told its task and split (for errors) and the image size bound."""
        max_pixels = args.max_image_pixels
        for split, items in (("train", train), ("test", test)):
            for item in items:
                item.source, item.max_pixels = f"{self.name} ({split} split)", max_pixels
        return LoadedTask(train, test, references)

    # --- prompts

    def demo_answer(self, item: EvalItem) -> str:
        """What fills a demonstration's answer slot."""
        raise NotImplementedError

    def demo_prompt(self, item: EvalItem) -> str:
        return f"{self.prompt(item)}{self.demo_answer(item)}{EOC_TOKEN}"

    def query_prompt(self, item: EvalItem) -> str:
        return self.prompt(item)

    # --- predictions and score

    def predict(
        self,
        eval_model: FlamingoEvalModel,
        prompts: Sequence[Sequence[Prompt]],
        args: EvalArguments,
        context: str,
    ) -> list[dict[str, Any]]:
        """One dict per test item of a batch, its `prediction` first, then what else its record keeps.

        Args:
            prompts: per item, its prompt for each ordering of its demonstrations (one without prompt ensembling).
        """
        raise NotImplementedError

    def scored_prediction(self, record: Mapping[str, Any]) -> Any:
        """What `metric` reads of a predictions file record."""
        return record["prediction"]

    def score(self, predictions: Mapping[Any, Any], references: Mapping[Any, Any]) -> tuple[float, dict[Any, float]]:
        """(task score, per-item scores) with the task's `metric`."""
        return self.metric(predictions, references)


@dataclass(kw_only=True)
class GenerationTask(TaskSpec):
    """A task scored on generated text (beam search, 3 beams, as the original).

    Attributes:
        max_new_tokens: generation length.
        postprocess: generated text -> prediction.
    """

    max_new_tokens: int
    postprocess: Callable[[str], str]
    demo_join: str = "\n"

    def predict(
        self,
        eval_model: FlamingoEvalModel,
        prompts: Sequence[Sequence[Prompt]],
        args: EvalArguments,
        context: str,
    ) -> list[dict[str, Any]]:
        outputs = eval_model.generate(
            [p[0][0] for p in prompts], [p[0][1] for p in prompts], max_new_tokens=self.max_new_tokens, num_beams=3,
            length_penalty=0.0, context=context,
        )  # fmt: skip
        return [{"prediction": self.postprocess(output), "generation": output} for output in outputs]
