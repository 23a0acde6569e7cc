"""`--data_dir` against the layout the original documents, written here independently of `DATA_DIR_LAYOUT`.

The expected paths are the original's sample evaluation script, transcribed flag by flag:
mlfoundations/open_flamingo, `open_flamingo/scripts/run_eval.sh` at commit 655f693fbfa04cd6e9a987d960654624d48917cf
(its `/path/to/...` arguments). `open_flamingo/eval/README.md` (same commit) says the annotation files are uploaded
to the hub dataset `openflamingo/eval_benchmark`; the script's folders are that dataset's top-level folders, with two
placeholders that the script names differently:

- VizWiz: the script says `v7w/`; the hub dataset's folder is `vizwiz/`. Third-party scripts that read the
  dataset from the hub cache name `datasets--openflamingo--eval_benchmark/snapshots/
  2391a430b8bb92b7cf0677a541a180a310497d4f/` + `vizwiz/train_{questions,annotations}_vqa_format.json`,
  `textvqa/train_questions_vqa_format.json` and `flickr30k/dataset_flickr30k.json`, as the script does.
- Hateful Memes: the script says `hateful_memes/`; no stored source names the hub dataset's folder, so only the file
  names inside it (`img/`, `train.json`, `dev.json`) are checked, not the folder's name.

ImageNet is not in the script nor in the hub dataset (`--imagenet_root` is an `ImageFolder` root of the user's).
"""

from __future__ import annotations

import os

import pytest

from modeling_flamingo.evaluation.__main__ import parse_arguments
from modeling_flamingo.evaluation.data_dir import DATA_DIR_LAYOUT, apply_data_dir
from modeling_flamingo.evaluation.tasks import TASKS

# flag -> argument in run_eval.sh (commit 655f693), verbatim but for the trailing "/" of textvqa's image folder.
RUN_EVAL_SH = {
    "coco_train_image_dir_path": "/path/to/mscoco_karpathy/train2014",
    "coco_val_image_dir_path": "/path/to/mscoco_karpathy/val2014",
    "coco_karpathy_json_path": "/path/to/mscoco_karpathy/dataset_coco.json",
    "coco_annotations_json_path": "/path/to/mscoco_karpathy/annotations/captions_val2014.json",
    "vqav2_train_image_dir_path": "/path/to/vqav2/train2014",
    "vqav2_train_annotations_json_path": "/path/to/vqav2/v2_mscoco_train2014_annotations.json",
    "vqav2_train_questions_json_path": "/path/to/vqav2/v2_OpenEnded_mscoco_train2014_questions.json",
    "vqav2_test_image_dir_path": "/path/to/vqav2/val2014",
    "vqav2_test_annotations_json_path": "/path/to/vqav2/v2_mscoco_val2014_annotations.json",
    "vqav2_test_questions_json_path": "/path/to/vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
    "flickr_image_dir_path": "/path/to/flickr30k/flickr30k-images",
    "flickr_karpathy_json_path": "/path/to/flickr30k/dataset_flickr30k.json",
    "flickr_annotations_json_path": "/path/to/flickr30k/dataset_flickr30k_coco_style.json",
    "ok_vqa_train_image_dir_path": "/path/to/okvqa/train2014",
    "ok_vqa_train_annotations_json_path": "/path/to/okvqa/mscoco_train2014_annotations.json",
    "ok_vqa_train_questions_json_path": "/path/to/okvqa/OpenEnded_mscoco_train2014_questions.json",
    "ok_vqa_test_image_dir_path": "/path/to/okvqa/val2014",
    "ok_vqa_test_annotations_json_path": "/path/to/okvqa/mscoco_val2014_annotations.json",
    "ok_vqa_test_questions_json_path": "/path/to/okvqa/OpenEnded_mscoco_val2014_questions.json",
    "textvqa_image_dir_path": "/path/to/textvqa/train_images",
    "textvqa_train_questions_json_path": "/path/to/textvqa/train_questions_vqa_format.json",
    "textvqa_train_annotations_json_path": "/path/to/textvqa/train_annotations_vqa_format.json",
    "textvqa_test_questions_json_path": "/path/to/textvqa/val_questions_vqa_format.json",
    "textvqa_test_annotations_json_path": "/path/to/textvqa/val_annotations_vqa_format.json",
    "vizwiz_train_image_dir_path": "/path/to/v7w/train",
    "vizwiz_test_image_dir_path": "/path/to/v7w/val",
    "vizwiz_train_questions_json_path": "/path/to/v7w/train_questions_vqa_format.json",
    "vizwiz_train_annotations_json_path": "/path/to/v7w/train_annotations_vqa_format.json",
    "vizwiz_test_questions_json_path": "/path/to/v7w/val_questions_vqa_format.json",
    "vizwiz_test_annotations_json_path": "/path/to/v7w/val_annotations_vqa_format.json",
    "hateful_memes_image_dir_path": "/path/to/hateful_memes/img",
    "hateful_memes_train_annotations_json_path": "/path/to/hateful_memes/train.json",
    "hateful_memes_test_annotations_json_path": "/path/to/hateful_memes/dev.json",
}
# The script's placeholder folder -> the hub dataset's folder (see the module docstring); None: not confirmed.
HUB_FOLDER = {"v7w": "vizwiz", "hateful_memes": None}
IMAGE_DIR_FLAGS = {flag for flag in RUN_EVAL_SH if flag.endswith("_image_dir_path")}


def _relative(flag: str) -> tuple[str | None, str]:
    """(hub folder or None if unconfirmed, path inside it) of `flag` in the documented layout."""
    folder, inner = RUN_EVAL_SH[flag].removeprefix("/path/to/").split("/", 1)
    return HUB_FOLDER.get(folder, folder), inner


def test_every_documented_flag_is_a_task_path_flag():
    """The script's flags are exactly the path flags of the tasks it runs (all but ImageNet)."""
    task_flags = {f for name, spec in TASKS.items() if name != "imagenet" for f in spec.path_flags}
    assert set(RUN_EVAL_SH) == task_flags
    assert TASKS["imagenet"].path_flags == ("imagenet_root",)


def test_data_dir_resolves_every_flag_to_the_documented_files(tmp_path):
    """A folder laid out as documented: `--data_dir` with every task fills each flag with that folder's file."""
    hateful_folder = DATA_DIR_LAYOUT["hateful_memes_image_dir_path"].split("/", 1)[0]  # unconfirmed: see docstring
    expected = {}
    for flag in RUN_EVAL_SH:
        folder, inner = _relative(flag)
        path = tmp_path / (folder or hateful_folder) / inner
        if flag in IMAGE_DIR_FLAGS:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        expected[flag] = path
    argv = ["--model", "m", "--data_dir", str(tmp_path)] + [f"--{spec.flag}" for spec in TASKS.values()]
    args = apply_data_dir(parse_arguments(argv))
    for flag, path in expected.items():
        assert os.path.normpath(getattr(args, flag)) == str(path), flag


@pytest.mark.parametrize("flag", sorted(RUN_EVAL_SH))
def test_layout_table_agrees_with_the_documented_layout(flag):
    folder, inner = _relative(flag)
    table_folder, table_inner = DATA_DIR_LAYOUT[flag].split("/", 1)
    assert table_inner == inner
    if folder is not None:
        assert table_folder == folder
