"""Captioning: a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`) for the images and their splits,
and a COCO-style captions file as the metric's ground truth (the original scores against it, not the Karpathy
sentences); CIDEr."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from modeling_flamingo.evaluation import datasets as ds
from modeling_flamingo.evaluation import metrics
from modeling_flamingo.evaluation.datasets import EvalInputError, EvalItem
from modeling_flamingo.evaluation.tasks.base import GenerationTask, LoadedTask, Metric
from modeling_flamingo.processing.processing_flamingo import MEDIA_TOKEN

if TYPE_CHECKING:
    from modeling_flamingo.evaluation.arguments import EvalArguments


def caption_prompt(item: EvalItem) -> str:
    return f"{MEDIA_TOKEN}Output:"


@dataclass(kw_only=True)
class CaptioningTask(GenerationTask):
    """A captioning benchmark.

    Attributes:
        image_dir_flags: the image folder flag, or COCO's train and val folder flags (an entry's `filepath` says
            which holds it).
        karpathy_flag: the Karpathy split file's flag.
        references_flag: the COCO-style captions file's flag.
        karpathy_format: "coco" (items keyed by `cocoid`) or "flickr" (keyed by the file name stem, a string).
    """

    kind: ClassVar[str] = "captioning"

    image_dir_flags: tuple[str, ...]
    karpathy_flag: str
    references_flag: str
    karpathy_format: Literal["coco", "flickr"]
    prompt: Callable[[EvalItem], str] = caption_prompt
    metric: Metric = metrics.cider_scores  # one tokenizer run for the score and the per-item scores
    postprocess: Callable[[str], str] = metrics.postprocess_captioning_generation
    max_new_tokens: int = 20

    def demo_answer(self, item: EvalItem) -> str:
        return item.caption.strip()

    def load(self, args: EvalArguments) -> LoadedTask:
        image_dirs = [ds.require_path(getattr(args, flag), flag) for flag in self.image_dir_flags]
        karpathy = getattr(args, self.karpathy_flag)
        train, test = (
            ds.read_karpathy_captions(karpathy, split, self.karpathy_format, *image_dirs, flag=self.karpathy_flag)
            for split in ("train", "test")
        )
        references_path = getattr(args, self.references_flag)
        references = ds.read_coco_style_references(references_path, self.references_flag)
        # Items are keyed as the original keys them: COCO by the integer `cocoid`, Flickr30K by the file name stem, a
        # string ("1000092795", as in the released dataset_flickr30k_coco_style.json). A COCO-style file may spell the
        # same id as a number or as a string: match them by their decimal text.
        by_text: dict[str, list[str]] = {}
        for image_id, captions in references.items():
            by_text.setdefault(str(image_id), []).extend(captions)
        missing = [item.id for item in test if str(item.id) not in by_text]
        if missing:
            raise EvalInputError(
                f"--{self.references_flag}: {references_path} has no captions for test image {missing[0]!r} of "
                f"{karpathy}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f"; its image ids look like {next(iter(references), None)!r}: are both files of the same dataset?"
            )  # fmt: skip
        return self.loaded(train, test, {item.id: by_text[str(item.id)] for item in test}, args)


FLICKR30 = CaptioningTask(
    name="flickr30",
    title="Flickr-30K (CIDEr)",
    data_layout={
        "flickr_image_dir_path": "flickr30k/flickr30k-images",
        "flickr_karpathy_json_path": "flickr30k/dataset_flickr30k.json",
        "flickr_annotations_json_path": "flickr30k/dataset_flickr30k_coco_style.json",
    },
    image_dir_flags=("flickr_image_dir_path",),
    karpathy_flag="flickr_karpathy_json_path",
    references_flag="flickr_annotations_json_path",
    karpathy_format="flickr",
)

COCO = CaptioningTask(
    name="coco",
    title="COCO (CIDEr)",
    data_layout={
        "coco_train_image_dir_path": "mscoco_karpathy/train2014",
        "coco_val_image_dir_path": "mscoco_karpathy/val2014",
        "coco_karpathy_json_path": "mscoco_karpathy/dataset_coco.json",
        "coco_annotations_json_path": "mscoco_karpathy/annotations/captions_val2014.json",
    },
    image_dir_flags=("coco_train_image_dir_path", "coco_val_image_dir_path"),
    karpathy_flag="coco_karpathy_json_path",
    references_flag="coco_annotations_json_path",
    karpathy_format="coco",
)
