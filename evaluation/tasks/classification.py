"""Classification: every class name is ranked by its log-likelihood after the prompt (length-normalized, as the
original); ImageNet top-1 accuracy, Hateful Memes ROC AUC of the "yes" probability."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from modeling_flamingo.evaluation import datasets as ds
from modeling_flamingo.evaluation import metrics
from modeling_flamingo.evaluation.classnames import HATEFUL_MEMES_CLASSNAMES, IMAGENET_CLASSNAMES
from modeling_flamingo.evaluation.datasets import EvalItem
from modeling_flamingo.evaluation.tasks.base import LoadedTask, Metric, Prompt, TaskSpec
from modeling_flamingo.processing.processing_flamingo import MEDIA_TOKEN

if TYPE_CHECKING:
    from modeling_flamingo.evaluation.arguments import EvalArguments
    from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel


def top1_accuracy(predictions: Mapping[Any, Any], references: Mapping[Any, Any]) -> tuple[float, dict[Any, float]]:
    """Top-1 accuracy (a fraction) of `{id: {"label": ...}}` against `{id: [class name]}`."""
    per_item = {k: float(predictions[k]["label"] == references[k][0]) for k in predictions}
    return sum(per_item.values()) / len(per_item), per_item


def roc_auc_of(
    positive_class: str, predictions: Mapping[Any, Any], references: Mapping[Any, Any]
) -> tuple[float, dict[Any, float]]:
    """ROC AUC of `{id: {"<positive_class>_probability": ...}}` against `{id: [class name]}`; per item, the
    probability."""
    ids = list(predictions)
    labels = [int(references[k][0] == positive_class) for k in ids]
    probabilities = [predictions[k][f"{positive_class}_probability"] for k in ids]
    return metrics.roc_auc(labels, probabilities), dict(zip(ids, probabilities, strict=True))


@dataclass(kw_only=True)
class ClassificationTask(TaskSpec):
    """A classification benchmark.

    Attributes:
        class_names: the label set (every name is scored for every item).
        positive_class: a class whose probability each record keeps as `<positive_class>_probability` (for a ROC AUC).
    """

    kind: ClassVar[str] = "classification"
    prompt_ensembling: ClassVar[bool] = True
    zero_shot_demo_images: ClassVar[bool] = True

    class_names: Sequence[str]
    positive_class: str | None = None
    demo_join: str = ""
    metric: Metric = top1_accuracy
    percent: bool = True

    def demo_answer(self, item: EvalItem) -> str:
        return item.class_name

    def predict(
        self,
        eval_model: FlamingoEvalModel,
        prompts: Sequence[Sequence[Prompt]],
        args: EvalArguments,
        context: str,
    ) -> list[dict[str, Any]]:
        logprobs = []
        for permutation in range(len(prompts[0])):
            logprobs.append(
                eval_model.rank_classifications(
                    [p[permutation][0] for p in prompts],
                    [p[permutation][1] for p in prompts],
                    self.class_names,
                    use_cache=not args.no_caching_for_classification,
                    normalize_length=True,
                    context=context,
                )
            )
        logprobs = torch.stack(logprobs, dim=-1).mean(-1)  # (B, C): the ensemble averages log-likelihoods
        probabilities = torch.softmax(logprobs, dim=-1)
        k = min(5, len(self.class_names))
        outcomes = []
        for b in range(len(prompts)):
            top = torch.topk(logprobs[b], k=k)
            outcome = {
                "prediction": self.class_names[int(top.indices[0])],
                "top_classes": [
                    [self.class_names[int(i)], float(v)] for v, i in zip(top.values, top.indices, strict=True)
                ],
            }
            if self.positive_class is not None:
                positive = list(self.class_names).index(self.positive_class)
                outcome[f"{self.positive_class}_probability"] = float(probabilities[b, positive])
            outcomes.append(outcome)
        return outcomes

    def scored_prediction(self, record: Mapping[str, Any]) -> dict[str, Any]:
        prediction = {"label": record["prediction"]}
        if self.positive_class is not None:
            key = f"{self.positive_class}_probability"
            prediction[key] = record[key]
        return prediction


# ---------------------------------------------------------------------------------------------------------------
# ImageNet: torchvision ImageFolder layout under --imagenet_root (train/ and val/, one folder per class).


@dataclass(kw_only=True)
class ImageFolderTask(ClassificationTask):
    """Classification over `<root>/train` and `<root>/val` in the ImageFolder layout (class folders sorted by name;
    folder i is `class_names[i]`), the root given by the task's one path flag."""

    def load(self, args: EvalArguments) -> LoadedTask:
        (flag,) = self.path_flags
        root = ds.require_path(getattr(args, flag), flag)
        train = ds.read_image_folder(os.path.join(root, "train"), self.class_names, flag)
        test = ds.read_image_folder(os.path.join(root, "val"), self.class_names, flag)
        return self.loaded(train, test, {item.id: [item.class_name] for item in test}, args)


def imagenet_prompt(item: EvalItem) -> str:
    return f"{MEDIA_TOKEN}Output:"


IMAGENET = ImageFolderTask(
    name="imagenet",
    title="ImageNet (Top-1 Accuracy)",
    data_layout={"imagenet_root": "imagenet"},
    prompt=imagenet_prompt,
    class_names=IMAGENET_CLASSNAMES,
)


# ---------------------------------------------------------------------------------------------------------------
# Hateful Memes: JSONL annotations per split, one image folder.


@dataclass(kw_only=True)
class HatefulMemesTask(ClassificationTask):
    """Hateful Memes: the flags of the image folder and of the train and test JSONL files, in this order."""

    def load(self, args: EvalArguments) -> LoadedTask:
        image_flag, train_flag, test_flag = self.path_flags
        image_dir = getattr(args, image_flag)
        train, test = (
            ds.read_hateful_memes(image_dir, getattr(args, flag), (image_flag, flag))
            for flag in (train_flag, test_flag)
        )
        return self.loaded(train, test, {item.id: [item.class_name] for item in test}, args)


def hateful_memes_prompt(item: EvalItem) -> str:
    return f"{MEDIA_TOKEN}is an image with: '{item.ocr}' written on it. Is it hateful? Answer:"


HATEFUL_MEMES = HatefulMemesTask(
    name="hateful_memes",
    title="Hateful Memes (ROC AUC)",
    data_layout={
        "hateful_memes_image_dir_path": "hatefulmemes/img",
        "hateful_memes_train_annotations_json_path": "hatefulmemes/train.json",
        "hateful_memes_test_annotations_json_path": "hatefulmemes/dev.json",
    },
    prompt=hateful_memes_prompt,
    class_names=HATEFUL_MEMES_CLASSNAMES,
    positive_class="yes",
    metric=functools.partial(roc_auc_of, "yes"),
)
