"""`--data_dir`: dataset paths from one folder laid out like the hub dataset `openflamingo/eval_benchmark`.

The hub dataset holds the annotation files (one folder per benchmark); the image folders are not in it (their
archives were removed) and go beside them under the names below. A path flag given explicitly always wins. A hub
dataset id (`owner/name`) is fetched with `huggingface_hub.snapshot_download` (only the selected tasks' files; the
cache and `HF_HUB_OFFLINE` behave as for any hub download).
"""

from __future__ import annotations

import argparse
import os

from modeling_flamingo.evaluation.datasets import EvalInputError

# flag -> path relative to the data dir
DATA_DIR_LAYOUT: dict[str, str] = {
    "coco_train_image_dir_path": "mscoco_karpathy/train2014",
    "coco_val_image_dir_path": "mscoco_karpathy/val2014",
    "coco_karpathy_json_path": "mscoco_karpathy/dataset_coco.json",
    "coco_annotations_json_path": "mscoco_karpathy/annotations/captions_val2014.json",
    "flickr_image_dir_path": "flickr30k/flickr30k-images",
    "flickr_karpathy_json_path": "flickr30k/dataset_flickr30k.json",
    "flickr_annotations_json_path": "flickr30k/dataset_flickr30k_coco_style.json",
    "vqav2_train_image_dir_path": "vqav2/train2014",
    "vqav2_train_questions_json_path": "vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
    "vqav2_train_annotations_json_path": "vqav2/v2_mscoco_train2014_annotations.json",
    "vqav2_test_image_dir_path": "vqav2/val2014",
    "vqav2_test_questions_json_path": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
    "vqav2_test_annotations_json_path": "vqav2/v2_mscoco_val2014_annotations.json",
    "ok_vqa_train_image_dir_path": "okvqa/train2014",
    "ok_vqa_train_questions_json_path": "okvqa/OpenEnded_mscoco_train2014_questions.json",
    "ok_vqa_train_annotations_json_path": "okvqa/mscoco_train2014_annotations.json",
    "ok_vqa_test_image_dir_path": "okvqa/val2014",
    "ok_vqa_test_questions_json_path": "okvqa/OpenEnded_mscoco_val2014_questions.json",
    "ok_vqa_test_annotations_json_path": "okvqa/mscoco_val2014_annotations.json",
    "textvqa_image_dir_path": "textvqa/train_images",
    "textvqa_train_questions_json_path": "textvqa/train_questions_vqa_format.json",
    "textvqa_train_annotations_json_path": "textvqa/train_annotations_vqa_format.json",
    "textvqa_test_questions_json_path": "textvqa/val_questions_vqa_format.json",
    "textvqa_test_annotations_json_path": "textvqa/val_annotations_vqa_format.json",
    "vizwiz_train_image_dir_path": "vizwiz/train",
    "vizwiz_test_image_dir_path": "vizwiz/val",
    "vizwiz_train_questions_json_path": "vizwiz/train_questions_vqa_format.json",
    "vizwiz_train_annotations_json_path": "vizwiz/train_annotations_vqa_format.json",
    "vizwiz_test_questions_json_path": "vizwiz/val_questions_vqa_format.json",
    "vizwiz_test_annotations_json_path": "vizwiz/val_annotations_vqa_format.json",
    "hateful_memes_image_dir_path": "hatefulmemes/img",
    "hateful_memes_train_annotations_json_path": "hatefulmemes/train.json",
    "hateful_memes_test_annotations_json_path": "hatefulmemes/dev.json",
    "imagenet_root": "imagenet",
}


def _looks_like_repo_id(value: str) -> bool:
    return not os.path.exists(value) and value.count("/") == 1 and not value.startswith((".", "/", "~"))


def resolve_data_dir(data_dir: str, folders: list[str]) -> str:
    """A local folder as is; a hub dataset id downloaded (the files of `folders` only) into the hub cache."""
    if os.path.isdir(data_dir):
        return data_dir
    if not _looks_like_repo_id(data_dir):
        raise EvalInputError(f"--data_dir: {data_dir} is neither a folder nor a hub dataset id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(data_dir, repo_type="dataset", allow_patterns=[f"{folder}/*" for folder in folders])
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise EvalInputError(f"--data_dir: cannot fetch the hub dataset {data_dir}: {err}") from err


def apply_data_dir(args: argparse.Namespace) -> None:
    """Fill every unset path flag of the selected tasks from `args.data_dir` (explicit flags are kept)."""
    if not getattr(args, "data_dir", None):
        return
    from modeling_flamingo.evaluation.tasks import TASKS

    flags = [f for spec in TASKS.values() if getattr(args, spec.flag, False) for f in spec.path_flags]
    folders = sorted({DATA_DIR_LAYOUT[f].split("/")[0] for f in flags if f in DATA_DIR_LAYOUT})
    root = resolve_data_dir(args.data_dir, folders)
    for flag in flags:
        if getattr(args, flag, None) is None and flag in DATA_DIR_LAYOUT:
            setattr(args, flag, os.path.join(root, DATA_DIR_LAYOUT[flag]))
