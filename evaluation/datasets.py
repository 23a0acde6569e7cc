"""The file layouts of the eight benchmarks, read into lists of `EvalItem` in the original harness's order.

Every reader keeps the item order of the original's `eval_datasets.py` (which the seeded draws index into), loads
images lazily and turns any bad input into one `EvalInputError` that names the file and the item.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, open_image

# torchvision's ImageFolder extensions (the original reads ImageNet with ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class EvalInputError(ValueError):
    """A missing or malformed dataset file, or an unreadable image; the message names the file and the item."""


@dataclass
class EvalItem:
    """One example of a split.

    `id` is what predictions and metrics are keyed by (COCO `cocoid`, Flickr file stem, VQA `question_id`, Hateful
    Memes `id`, ImageNet index in the folder listing). `answers` holds the reference captions or VQA answers;
    `caption`/`answers[0]`/`class_name` fill a demonstration's answer slot. `source` ("coco (train split)") names
    the item's task and split in errors; `max_pixels` bounds the image's declared size (`--max_image_pixels`).
    """

    id: Any
    image_path: str
    caption: str | None = None
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    class_name: str | None = None
    ocr: str | None = None
    convert_rgb: bool = False  # ImageFolder's loader converts to RGB; the other original datasets do not
    source: str = ""
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def load_image(self, context: str = "") -> Image.Image:
        """Open and decode the image, its declared size checked against `max_pixels` first (raises
        `EvalInputError` naming the task, split, item and file; `context` stands in for a missing `source`)."""
        where = f"{self.source} item {self.id!r}" if self.source else f"{context}item {self.id!r}"
        if not os.path.isfile(self.image_path):
            raise EvalInputError(f"{where}: image file {self.image_path} does not exist.")
        try:
            image = open_image(self.image_path, self.max_pixels)
        except ImageTooLargeError as err:
            # A benchmark item is never skipped: a score over fewer items would not be comparable.
            raise EvalInputError(
                f"{where}: image {self.image_path} is {err.width}x{err.height} = {err.width * err.height:,} pixels, "
                f"more than --max_image_pixels {err.max_pixels:,}; it was not decoded. Raise --max_image_pixels to "
                "evaluate it (items are never skipped)."
            ) from err
        except Exception as err:  # PIL raises several unrelated types for undecodable files
            raise EvalInputError(f"{where}: cannot decode image {self.image_path}: {err}") from err
        return image.convert("RGB") if self.convert_rgb else image


def require_path(path: str | None, flag: str) -> str:
    """`path`, which the task needs: an `EvalInputError` naming `--flag` when it was not given."""
    if not path:
        raise EvalInputError(f"--{flag} is required for this task.")
    return path


def _read_json(path: str, flag: str) -> Any:
    path = require_path(path, flag)
    if not os.path.isfile(path):
        raise EvalInputError(f"--{flag}: file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"--{flag}: {path} is not valid JSON: {err}") from err
    except RecursionError as err:  # json's parser recurses once per nesting level
        raise EvalInputError(f"--{flag}: {path} is nested too deeply to be an annotation file.") from err


def _field(record: Any, key: str, path: str, what: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise EvalInputError(f"{path}: {what} has no {key!r} field.")
    return record[key]


# What a field may hold, by the type names of the error messages. bool is excluded: JSON `true` is not an id.
_STR = (str,)
_INT = (int,)
_ID = (int, str)
_TYPE_NAMES = {_STR: "a string", _INT: "an integer", _ID: "an integer or a string"}
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 40, 40, 2  # a bad value is shown, never a whole file


def _short_repr(value: Any) -> str:
    return _REPR.repr(value)


def _typed_field(record: Any, key: str, path: str, what: str, types: tuple[type, ...]) -> Any:
    """`record[key]`, which must be an instance of `types`: a null, a list or a number where a string belongs
    would otherwise become a wrong prompt (`Question:None`), a wrong file name or a crash after the generation."""
    value = _field(record, key, path, what)
    if isinstance(value, bool) or not isinstance(value, types):
        raise EvalInputError(
            f"{path}: {what} has {key!r} = {_short_repr(value)} ({type(value).__name__}); expected "
            f"{_TYPE_NAMES[types]}."
        )
    return value


def _strings(record: Any, key: str, item_key: str, path: str, what: str) -> list[str]:
    """The `item_key` strings of the non-empty list `record[key]` of objects (Karpathy sentences, VQA answers)."""
    entries = _field(record, key, path, what)
    if not isinstance(entries, list) or not entries:
        raise EvalInputError(f"{path}: {what} has {key!r} = {_short_repr(entries)}; expected a non-empty list.")
    return [_typed_field(entry, item_key, path, f"{what}, {key}[{k}],", _STR) for k, entry in enumerate(entries)]


# ---------------------------------------------------------------------------------------------------------------
# Captioning: Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`).


def read_karpathy_captions(
    karpathy_json: str,
    split: str,
    dataset: str,
    train_image_dir: str | None,
    val_image_dir: str | None = None,
    flag: str = "coco_karpathy_json_path",
) -> list[EvalItem]:
    """Items of `split` ("train" or "test"), in file order.

    COCO images live in `train_image_dir` when their `filepath` is `train2014`, else in `val_image_dir`; Flickr30K
    has a single image folder. Ids: COCO `cocoid`, Flickr the file name without extension.
    """
    data = _read_json(karpathy_json, flag)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise EvalInputError(f"{karpathy_json}: expected a Karpathy split file with an 'images' list.")
    items = []
    for position, record in enumerate(images):
        what = f"image entry {position}"
        if _typed_field(record, "split", karpathy_json, what, _STR) != split:
            continue
        filename = _typed_field(record, "filename", karpathy_json, what, _STR)
        what = f"image entry {position} ({filename})"
        captions = _strings(record, "sentences", "raw", karpathy_json, what)
        if dataset == "coco":
            in_train = _typed_field(record, "filepath", karpathy_json, what, _STR) == "train2014"
            folder = train_image_dir if in_train else val_image_dir
            item_id = _typed_field(record, "cocoid", karpathy_json, what, _INT)
        else:
            folder = train_image_dir
            item_id = filename.split(".")[0]
        if folder is None:
            raise EvalInputError(f"{karpathy_json}: {what} needs an image folder that was not given.")
        items.append(
            EvalItem(id=item_id, image_path=os.path.join(folder, filename), caption=captions[0], answers=captions)
        )
    return items


def read_coco_style_references(annotations_json: str, flag: str) -> dict[Any, list[str]]:
    """`{image_id: [captions]}` from a COCO-style captions file (`captions_val2014.json`), the metric's ground
    truth in the original (it scores against this file, not the Karpathy sentences)."""
    data = _read_json(annotations_json, flag)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise EvalInputError(f"{annotations_json}: expected a COCO-style file with an 'annotations' list.")
    references: dict[Any, list[str]] = {}
    for position, record in enumerate(annotations):
        what = f"annotation {position}"
        image_id = _typed_field(record, "image_id", annotations_json, what, _ID)
        references.setdefault(image_id, []).append(_typed_field(record, "caption", annotations_json, what, _STR))
    return references


# ---------------------------------------------------------------------------------------------------------------
# VQA: questions + annotations JSON pairs (official VQAv2/OK-VQA files, the `*_vqa_format.json` of TextVQA/VizWiz).


def read_vqa(
    image_dir: str | None,
    questions_json: str | None,
    annotations_json: str | None,
    flags: tuple[str, str, str],
    image_path: Callable[[str, Any], str],
    image_id_types: tuple[type, ...],
) -> list[EvalItem]:
    """Questions in file order; answers from the annotation at the same list position (as the original pairs
    them). `flags` names the image-dir, questions and annotations flags for error messages; `image_path(image_dir,
    image_id)` is a question's image file, its `image_id` one of `image_id_types` (what the path is built from)."""
    image_dir = require_path(image_dir, flags[0])
    questions = _read_json(questions_json, flags[1])
    annotations = _read_json(annotations_json, flags[2])
    if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
        raise EvalInputError(f"{questions_json}: expected a VQA questions file with a 'questions' list.")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list):
        raise EvalInputError(f"{annotations_json}: expected a VQA annotations file with an 'annotations' list.")
    questions, annotations = questions["questions"], annotations["annotations"]
    if len(questions) != len(annotations):
        raise EvalInputError(
            f"{questions_json} has {len(questions)} questions but {annotations_json} has {len(annotations)} "
            "annotations; they are paired by position and must match."
        )
    items = []
    for position, (question, annotation) in enumerate(zip(questions, annotations, strict=True)):
        what = f"question {position}"
        question_id = _typed_field(question, "question_id", questions_json, what, _ID)
        what = f"question {position} (question_id {question_id!r})"
        answers = _strings(annotation, "answers", "answer", annotations_json, f"annotation {position}")
        if annotation.get("question_id", question_id) != question_id:
            raise EvalInputError(
                f"{annotations_json}: annotation {position} is for question {_short_repr(annotation['question_id'])} "
                f"but {questions_json} has question {question_id!r} at that position."
            )
        image_id = _typed_field(question, "image_id", questions_json, what, image_id_types)
        items.append(
            EvalItem(
                id=question_id,
                image_path=image_path(image_dir, image_id),
                question=_typed_field(question, "question", questions_json, what, _STR),
                answers=answers,
            )
        )
    return items


# ---------------------------------------------------------------------------------------------------------------
# Classification.


def read_hateful_memes(image_dir: str | None, annotations_jsonl: str | None, flags: tuple[str, str]) -> list[EvalItem]:
    """JSONL lines `{id, img, label, text}`; label 1 is "yes" (hateful). Images are looked up by base name."""
    image_dir = require_path(image_dir, flags[0])
    path = require_path(annotations_jsonl, flags[1])
    if not os.path.isfile(path):
        raise EvalInputError(f"--{flags[1]}: file {path} does not exist.")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}: line {line_number} is not valid JSON: {err}") from err
            except RecursionError as err:
                raise EvalInputError(f"{path}: line {line_number} is nested too deeply to be an annotation.") from err
            what = f"line {line_number}"
            label = _typed_field(record, "label", path, what, _INT)
            if label not in (0, 1):
                raise EvalInputError(f"{path}: {what} has label {label!r}; expected 0 or 1.")
            items.append(
                EvalItem(
                    id=_typed_field(record, "id", path, what, _ID),
                    image_path=os.path.join(image_dir, _typed_field(record, "img", path, what, _STR).split("/")[-1]),
                    ocr=_typed_field(record, "text", path, what, _STR),
                    class_name="yes" if label == 1 else "no",
                )
            )
    return items


def read_image_folder(root: str, class_names: Sequence[str], flag: str = "imagenet_root") -> list[EvalItem]:
    """torchvision `ImageFolder` order: class folders sorted by name (folder i is class `class_names[i]`), files
    sorted within each (sub)folder. Ids are positions in this listing, as the original's."""
    if not os.path.isdir(root):
        raise EvalInputError(f"--{flag}: folder {root} does not exist.")
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not folders:
        raise EvalInputError(f"--{flag}: {root} has no class folders.")
    if len(folders) > len(class_names):
        raise EvalInputError(f"{root} has {len(folders)} class folders but only {len(class_names)} class names exist.")
    items = []
    for class_index, folder in enumerate(folders):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, folder), followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    items.append(
                        EvalItem(
                            id=len(items),
                            image_path=os.path.join(dirpath, filename),
                            class_name=class_names[class_index],
                            convert_rgb=True,
                        )
                    )
    if not items:
        raise EvalInputError(f"--{flag}: {root} has no image files.")
    return items
