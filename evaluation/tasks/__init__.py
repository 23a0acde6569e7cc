"""The one registry of evaluation tasks, `TASKS`, in the original's order of evaluation.

Each task is one definition (an instance of its family: `CaptioningTask`, `VQATask`, `ClassificationTask`) holding
all its facts: title, data layout under `--data_dir`, loading, prompts, post-processing and metric. The runner, the
command line (`--eval_<name>` and the path flags), `--data_dir` and the results table are generic over it: a new task
is one definition plus one line below (docs/evaluation.md shows one).
"""

from __future__ import annotations

from modeling_flamingo.evaluation.tasks.base import GenerationTask, LoadedTask, TaskSpec
from modeling_flamingo.evaluation.tasks.captioning import COCO, FLICKR30, CaptioningTask
from modeling_flamingo.evaluation.tasks.classification import HATEFUL_MEMES, IMAGENET, ClassificationTask
from modeling_flamingo.evaluation.tasks.vqa import OK_VQA, TEXTVQA, VIZWIZ, VQAV2, VQATask

TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        FLICKR30,
        COCO,
        OK_VQA,
        VQAV2,
        VIZWIZ,
        TEXTVQA,
        IMAGENET,
        HATEFUL_MEMES,
    )
}
"""In the original's order of evaluation (Flickr30K, COCO, OK-VQA, VQAv2, VizWiz, TextVQA, ImageNet, Hateful Memes)."""

__all__ = [
    "TASKS",
    "CaptioningTask",
    "ClassificationTask",
    "GenerationTask",
    "LoadedTask",
    "TaskSpec",
    "VQATask",
]
