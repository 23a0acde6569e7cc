"""Visual question answering: a questions file and an annotations file per split (the official VQAv2/OK-VQA files,
the `*_vqa_format.json` of TextVQA and VizWiz), paired by position; VQA accuracy."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from modeling_flamingo.evaluation import datasets as ds
from modeling_flamingo.evaluation import metrics
from modeling_flamingo.evaluation.datasets import EvalInputError, EvalItem
from modeling_flamingo.evaluation.tasks.base import GenerationTask, LoadedTask, Metric
from modeling_flamingo.processing.processing_flamingo import MEDIA_TOKEN

if TYPE_CHECKING:
    from modeling_flamingo.evaluation.arguments import EvalArguments


class ImageNames(NamedTuple):
    """How a question's `image_id` names its image file."""

    id_types: tuple[type, ...]  # what an `image_id` may be
    path: Callable[[str, str, Any], str]  # (task name, image folder, image id) -> image file


def _coco_file(task: str, image_dir: str, image_id: Any) -> str:
    # COCO file names carry the split folder's name: COCO_val2014_000000000042.jpg
    split = image_dir.strip("/").split("/")[-1]
    if split not in ("train2014", "val2014", "test2015"):
        raise EvalInputError(
            f"{task}: the image folder must be the COCO train2014, val2014 or test2015 folder (its name is part of "
            f"every file name); got {image_dir}."
        )
    return os.path.join(image_dir, f"COCO_{split}_{int(image_id):012d}.jpg")


COCO_FILE_NAMES = ImageNames((int,), _coco_file)
"""VQAv2, OK-VQA: the number of a COCO file name."""
FILE_NAME_IDS = ImageNames((str,), lambda task, image_dir, image_id: os.path.join(image_dir, image_id))
"""VizWiz: the id is the file name."""
JPG_IDS = ImageNames((int, str), lambda task, image_dir, image_id: os.path.join(image_dir, f"{image_id}.jpg"))
"""TextVQA: the file is `<id>.jpg`."""


def vqa_prompt(item: EvalItem) -> str:
    return f"{MEDIA_TOKEN}Question:{item.question} Short answer:"


def vqa_scores(predictions: Mapping[Any, str], references: Mapping[Any, Any]) -> tuple[float, dict[Any, float]]:
    """VQA accuracy (0-100) of the task and of each item."""
    per_item = {k: 100.0 * metrics.vqa_item_accuracy(predictions[k], references[k]) for k in predictions}
    return metrics.vqa_accuracy(predictions, references), per_item


@dataclass(kw_only=True)
class VQATask(GenerationTask):
    """A VQA benchmark. Its path flags are the original's: `<name>_<split>_questions_json_path` and
    `<name>_<split>_annotations_json_path` for the splits `train` and `test`, and `<name>_<split>_image_dir_path`,
    or one `<name>_image_dir_path` for both splits.

    Attributes:
        image_names: how an `image_id` names its file.
    """

    kind: ClassVar[str] = "vqa"

    image_names: ImageNames
    prompt: Callable[[EvalItem], str] = vqa_prompt
    metric: Metric = vqa_scores
    postprocess: Callable[[str], str] = metrics.postprocess_vqa_generation
    max_new_tokens: int = 5

    def split_flags(self, split: str) -> tuple[str, str, str]:
        """The (image folder, questions, annotations) flags of `split`."""
        image_dir = f"{self.name}_{split}_image_dir_path"
        if image_dir not in self.data_layout:
            image_dir = f"{self.name}_image_dir_path"
        return image_dir, f"{self.name}_{split}_questions_json_path", f"{self.name}_{split}_annotations_json_path"

    def demo_answer(self, item: EvalItem) -> str:
        return item.answers[0]

    def image_path(self, image_dir: str, image_id: Any) -> str:
        return self.image_names.path(self.name, image_dir, image_id)

    def load(self, args: EvalArguments) -> LoadedTask:
        train, test = (
            ds.read_vqa(
                *(getattr(args, flag) for flag in flags),
                flags=flags,
                image_path=self.image_path,
                image_id_types=self.image_names.id_types,
            )
            for flags in (self.split_flags("train"), self.split_flags("test"))
        )
        return self.loaded(train, test, {item.id: item.answers for item in test}, args)


OK_VQA = VQATask(
    name="ok_vqa",
    title="OK-VQA (Accuracy)",
    data_layout={
        "ok_vqa_train_image_dir_path": "okvqa/train2014",
        "ok_vqa_train_questions_json_path": "okvqa/OpenEnded_mscoco_train2014_questions.json",
        "ok_vqa_train_annotations_json_path": "okvqa/mscoco_train2014_annotations.json",
        "ok_vqa_test_image_dir_path": "okvqa/val2014",
        "ok_vqa_test_questions_json_path": "okvqa/OpenEnded_mscoco_val2014_questions.json",
        "ok_vqa_test_annotations_json_path": "okvqa/mscoco_val2014_annotations.json",
    },
    image_names=COCO_FILE_NAMES,
    postprocess=metrics.postprocess_ok_vqa_generation,
    preflight=metrics.check_okvqa_stemmer,  # its data is checked in seconds, not after an hour of generation
)

VQAV2 = VQATask(
    name="vqav2",
    title="VQAv2 (Accuracy)",
    data_layout={
        "vqav2_train_image_dir_path": "vqav2/train2014",
        "vqav2_train_questions_json_path": "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
        "vqav2_train_annotations_json_path": "vqav2/v2_mscoco_train2014_annotations.json",
        "vqav2_test_image_dir_path": "vqav2/val2014",
        "vqav2_test_questions_json_path": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
        "vqav2_test_annotations_json_path": "vqav2/v2_mscoco_val2014_annotations.json",
    },
    image_names=COCO_FILE_NAMES,
)

VIZWIZ = VQATask(
    name="vizwiz",
    title="VizWiz (Accuracy)",
    data_layout={
        "vizwiz_train_image_dir_path": "vizwiz/train",
        "vizwiz_train_questions_json_path": "vizwiz/train_questions_vqa_format.json",
        "vizwiz_train_annotations_json_path": "vizwiz/train_annotations_vqa_format.json",
        "vizwiz_test_image_dir_path": "vizwiz/val",
        "vizwiz_test_questions_json_path": "vizwiz/val_questions_vqa_format.json",
        "vizwiz_test_annotations_json_path": "vizwiz/val_annotations_vqa_format.json",
    },
    image_names=FILE_NAME_IDS,
)

TEXTVQA = VQATask(
    name="textvqa",
    title="TextVQA (Accuracy)",
    data_layout={
        "textvqa_image_dir_path": "textvqa/train_images",
        "textvqa_train_questions_json_path": "textvqa/train_questions_vqa_format.json",
        "textvqa_train_annotations_json_path": "textvqa/train_annotations_vqa_format.json",
        "textvqa_test_questions_json_path": "textvqa/val_questions_vqa_format.json",
        "textvqa_test_annotations_json_path": "textvqa/val_annotations_vqa_format.json",
    },
    image_names=JPG_IDS,
    max_new_tokens=10,
)
