"""The one registry of evaluation tasks: prompts, demonstration joins, generation lengths, post-processing, metrics.

Each `TaskSpec` says everything the runner needs about a benchmark; the runner has no per-task code. Prompts are the
original's (`eval/models/open_flamingo.py`): the query leaves the answer empty and has no `<|endofchunk|>`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modeling_flamingo.evaluation import datasets as ds
from modeling_flamingo.evaluation.classnames import HATEFUL_MEMES_CLASSNAMES, IMAGENET_CLASSNAMES
from modeling_flamingo.evaluation.datasets import EvalInputError, EvalItem
from modeling_flamingo.evaluation.sampling import effective_num_shots
from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS

IMAGE = "<image>"
EOC = "<|endofchunk|>"


def _answer_slot(answer: str | None) -> str:
    return "" if answer is None else f"{answer}{EOC}"


def caption_prompt(item: EvalItem | None) -> str:
    return f"{IMAGE}Output:{_answer_slot(None if item is None else item.caption.strip())}"


def vqa_prompt(question: str, item: EvalItem | None) -> str:
    return f"{IMAGE}Question:{question} Short answer:{_answer_slot(None if item is None else item.answers[0])}"


def imagenet_prompt(query: EvalItem, demo: EvalItem | None) -> str:
    return f"{IMAGE}Output:{_answer_slot(None if demo is None else demo.class_name)}"


def hateful_memes_prompt(query: EvalItem, demo: EvalItem | None) -> str:
    item = demo if demo is not None else query
    label = None if demo is None else demo.class_name
    return f"{IMAGE}is an image with: '{item.ocr}' written on it. Is it hateful? Answer:{_answer_slot(label)}"


@dataclass
class LoadedTask:
    train: list[EvalItem]
    test: list[EvalItem]
    references: dict[Any, list[str]]  # metric ground truth per test id


@dataclass
class TaskSpec:
    """One benchmark.

    Attributes:
        name: key in the results file (the original's: coco, flickr30, vqav2, ok_vqa, vizwiz, textvqa, imagenet,
            hateful_memes); also the file name of cached RICES features (`<name>.pkl`).
        flag: the `--eval_*` flag.
        kind: "captioning", "vqa" or "classification".
        path_flags: the dataset flags it reads.
        load: reads the splits from the parsed arguments.
        demo_prompt / query_prompt: a demonstration's text (with its answer) and the query's (answer left empty).
        demo_join: appended after every demonstration.
        max_new_tokens: generation length (generation tasks).
        postprocess: generated text -> prediction.
        class_names: classification label set (every name is scored for every item).
    """

    name: str
    flag: str
    kind: str
    path_flags: tuple[str, ...]
    load: Callable[[argparse.Namespace], LoadedTask]
    demo_prompt: Callable[[EvalItem], str]
    query_prompt: Callable[[EvalItem], str]
    demo_join: str
    max_new_tokens: int = 0
    postprocess: Callable[[str], str] | None = None
    class_names: Sequence[str] = field(default_factory=tuple)

    def score(self, predictions: Mapping[Any, Any], references: Mapping[Any, Any]) -> tuple[float, dict[Any, float]]:
        """(task score, per-item scores) in the original's units: CIDEr x100, VQA accuracy 0-100, ImageNet top-1
        accuracy and Hateful Memes ROC AUC as fractions."""
        from modeling_flamingo.evaluation import metrics

        if self.kind == "captioning":
            return metrics.cider_scores(predictions, references)  # one tokenizer run for both
        if self.kind == "vqa":
            per_item = {k: 100.0 * metrics.vqa_item_accuracy(predictions[k], references[k]) for k in predictions}
            return metrics.vqa_accuracy(predictions, references), per_item
        if self.name == "hateful_memes":
            ids = list(predictions)
            labels = [int(references[k][0] == "yes") for k in ids]
            probabilities = [predictions[k]["yes_probability"] for k in ids]
            return metrics.roc_auc(labels, probabilities), dict(zip(ids, probabilities, strict=True))
        per_item = {k: float(predictions[k]["label"] == references[k][0]) for k in predictions}
        return sum(per_item.values()) / len(per_item), per_item


# ---------------------------------------------------------------------------------------------------------------
# loaders


def _load_karpathy(name: str, args: argparse.Namespace) -> LoadedTask:
    if name == "coco":
        train_dir, val_dir = args.coco_train_image_dir_path, args.coco_val_image_dir_path
        karpathy, flag, coco_style = (
            args.coco_karpathy_json_path,
            "coco_karpathy_json_path",
            "coco_annotations_json_path",
        )
        for path, path_flag in ((train_dir, "coco_train_image_dir_path"), (val_dir, "coco_val_image_dir_path")):
            ds._require(path, path_flag)
    else:
        train_dir, val_dir = ds._require(args.flickr_image_dir_path, "flickr_image_dir_path"), None
        karpathy, flag, coco_style = (
            args.flickr_karpathy_json_path,
            "flickr_karpathy_json_path",
            ("flickr_annotations_json_path"),
        )
    dataset = "coco" if name == "coco" else "flickr"
    train = ds.read_karpathy_captions(karpathy, "train", dataset, train_dir, val_dir, flag)
    test = ds.read_karpathy_captions(karpathy, "test", dataset, train_dir, val_dir, flag)
    coco_style_path = getattr(args, coco_style)
    references = ds.read_coco_style_references(coco_style_path, coco_style)
    # Items are keyed as the original keys them: COCO by the integer `cocoid`, Flickr30K by the file name stem, a
    # string ("1000092795", as in the released dataset_flickr30k_coco_style.json). A COCO-style file may spell the
    # same id as a number or as a string: match them by their decimal text.
    by_text: dict[str, list[str]] = {}
    for image_id, captions in references.items():
        by_text.setdefault(str(image_id), []).extend(captions)
    missing = [item.id for item in test if str(item.id) not in by_text]
    if missing:
        raise ds.EvalInputError(
            f"--{coco_style}: {coco_style_path} has no captions for test image {missing[0]!r} of {karpathy}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; its image ids look like {next(iter(references), None)!r}: are both files of the same dataset?"
        )
    return _loaded(name, train, test, {item.id: by_text[str(item.id)] for item in test}, args)


def _loaded(
    name: str, train: list[EvalItem], test: list[EvalItem], references: dict[Any, list[str]], args: argparse.Namespace
) -> LoadedTask:
    """The splits, every item told its task and split (for errors) and the image size bound."""
    max_pixels = getattr(args, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    for split, items in (("train", train), ("test", test)):
        for item in items:
            item.source, item.max_pixels = f"{name} ({split} split)", max_pixels
    return LoadedTask(train, test, references)


def _vqa_flags(name: str) -> dict[str, tuple[str, str, str]]:
    if name == "textvqa":
        return {
            "train": (
                "textvqa_image_dir_path",
                "textvqa_train_questions_json_path",
                "textvqa_train_annotations_json_path",
            ),
            "test": (
                "textvqa_image_dir_path",
                "textvqa_test_questions_json_path",
                "textvqa_test_annotations_json_path",
            ),
        }
    return {
        split: (
            f"{name}_{split}_image_dir_path",
            f"{name}_{split}_questions_json_path",
            f"{name}_{split}_annotations_json_path",
        )
        for split in ("train", "test")
    }


def _load_vqa(name: str, args: argparse.Namespace) -> LoadedTask:
    splits = {}
    for split, flags in _vqa_flags(name).items():
        splits[split] = ds.read_vqa(name, *(getattr(args, flag) for flag in flags), flags=flags)
    return _loaded(name, splits["train"], splits["test"], {item.id: item.answers for item in splits["test"]}, args)


def _load_imagenet(args: argparse.Namespace) -> LoadedTask:
    import os

    root = ds._require(args.imagenet_root, "imagenet_root")
    train = ds.read_image_folder(os.path.join(root, "train"), IMAGENET_CLASSNAMES)
    test = ds.read_image_folder(os.path.join(root, "val"), IMAGENET_CLASSNAMES)
    return _loaded("imagenet", train, test, {item.id: [item.class_name] for item in test}, args)


def _load_hateful_memes(args: argparse.Namespace) -> LoadedTask:
    image_dir = args.hateful_memes_image_dir_path
    train = ds.read_hateful_memes(
        image_dir, args.hateful_memes_train_annotations_json_path,
        ("hateful_memes_image_dir_path", "hateful_memes_train_annotations_json_path"),
    )  # fmt: skip
    test = ds.read_hateful_memes(
        image_dir, args.hateful_memes_test_annotations_json_path,
        ("hateful_memes_image_dir_path", "hateful_memes_test_annotations_json_path"),
    )  # fmt: skip
    return _loaded("hateful_memes", train, test, {item.id: [item.class_name] for item in test}, args)


def _postprocess_caption(text: str) -> str:
    from modeling_flamingo.evaluation.metrics import postprocess_captioning_generation

    return postprocess_captioning_generation(text).replace('"', "")


def _postprocess_vqa(text: str) -> str:
    from modeling_flamingo.evaluation.metrics import postprocess_vqa_generation

    return postprocess_vqa_generation(text)


def _postprocess_ok_vqa(text: str) -> str:
    from modeling_flamingo.evaluation.metrics import okvqa_stem, postprocess_vqa_generation

    return okvqa_stem(postprocess_vqa_generation(text))


def _captioning(name: str, flag: str, path_flags: tuple[str, ...]) -> TaskSpec:
    return TaskSpec(
        name=name,
        flag=flag,
        kind="captioning",
        path_flags=path_flags,
        load=lambda args: _load_karpathy(name, args),
        demo_prompt=caption_prompt,
        query_prompt=lambda item: caption_prompt(None),
        demo_join="\n",
        max_new_tokens=20,
        postprocess=_postprocess_caption,
    )


def _vqa(name: str, max_new_tokens: int = 5) -> TaskSpec:
    flags = _vqa_flags(name)
    return TaskSpec(
        name=name,
        flag=f"eval_{name}",
        kind="vqa",
        path_flags=tuple(dict.fromkeys(flags["train"] + flags["test"])),
        load=lambda args: _load_vqa(name, args),
        demo_prompt=lambda item: vqa_prompt(item.question, item),
        query_prompt=lambda item: vqa_prompt(item.question, None),
        demo_join="\n",
        max_new_tokens=max_new_tokens,
        postprocess=_postprocess_ok_vqa if name == "ok_vqa" else _postprocess_vqa,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _captioning(
            "flickr30",
            "eval_flickr30",
            ("flickr_image_dir_path", "flickr_karpathy_json_path", "flickr_annotations_json_path"),
        ),
        _captioning(
            "coco",
            "eval_coco",
            (
                "coco_train_image_dir_path",
                "coco_val_image_dir_path",
                "coco_karpathy_json_path",
                "coco_annotations_json_path",
            ),
        ),
        _vqa("ok_vqa"),
        _vqa("vqav2"),
        _vqa("vizwiz"),
        _vqa("textvqa", max_new_tokens=10),
        TaskSpec(
            name="imagenet",
            flag="eval_imagenet",
            kind="classification",
            path_flags=("imagenet_root",),
            load=_load_imagenet,
            demo_prompt=lambda item: imagenet_prompt(item, item),
            query_prompt=lambda item: imagenet_prompt(item, None),
            demo_join="",
            class_names=IMAGENET_CLASSNAMES,
        ),
        TaskSpec(
            name="hateful_memes",
            flag="eval_hateful_memes",
            kind="classification",
            path_flags=(
                "hateful_memes_image_dir_path",
                "hateful_memes_train_annotations_json_path",
                "hateful_memes_test_annotations_json_path",
            ),
            load=_load_hateful_memes,
            demo_prompt=lambda item: hateful_memes_prompt(item, item),
            query_prompt=lambda item: hateful_memes_prompt(item, None),
            demo_join="",
            class_names=HATEFUL_MEMES_CLASSNAMES,
        ),
    )
}
"""In the original's order of evaluation (Flickr30K, COCO, OK-VQA, VQAv2, VizWiz, TextVQA, ImageNet, Hateful Memes)."""


def check_run_arguments(args: argparse.Namespace) -> None:
    """Refuse a numeric flag out of its range (raises `EvalInputError`), before any file is read or model loaded."""
    bad_shots = [shots for shots in args.shots if shots < 0]
    limits = (
        (not bad_shots, f"--shots {bad_shots[0] if bad_shots else 0}: a number of demonstrations is 0 or more."),
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: must be 1 or more."),
        (
            args.num_samples == -1 or args.num_samples >= 1,
            f"--num_samples {args.num_samples}: give the number of test items per trial (1 or more), or -1 for the "
            "whole test split.",
        ),
        (args.num_trials >= 1, f"--num_trials {args.num_trials}: must be 1 or more."),
        (args.query_set_size >= 1, f"--query_set_size {args.query_set_size}: must be 1 or more."),
    )
    optional = (  # flags a programmatic Namespace may leave out
        ("class_batch_size", 1, "must be 1 or more"),
        ("latents_cache_mb", 0, "must be 0 (no cache) or more"),
        ("max_image_pixels", 1, "must be 1 or more"),
    )
    for ok, message in limits:
        if not ok:
            raise EvalInputError(message)
    for flag, minimum, rule in optional:
        value = getattr(args, flag, minimum)
        if value < minimum:
            raise EvalInputError(f"--{flag} {value}: {rule}.")


def check_split_sizes(args: argparse.Namespace, loaded: Mapping[str, LoadedTask]) -> None:
    """Refuse `--num_samples`, `--query_set_size` or `--shots` larger than a selected task's split can give, naming
    the task and the split size (raises `EvalInputError`); called once the splits are read, before the model loads."""
    most_shots = max(effective_num_shots(shots) for shots in args.shots)
    for name, task in loaded.items():
        num_test, num_train = len(task.test), len(task.train)
        if args.num_samples > num_test:
            raise EvalInputError(
                f"--num_samples {args.num_samples} is larger than the {name} test split ({num_test} items)."
            )
        if args.rices:
            if most_shots > num_train:
                raise EvalInputError(
                    f"--shots: {most_shots} demonstrations cannot be retrieved from the {name} train split "
                    f"({num_train} items)."
                )
            continue  # RICES retrieves from the whole train split: no query set is drawn
        if args.query_set_size > num_train:
            raise EvalInputError(
                f"--query_set_size {args.query_set_size} is larger than the {name} train split ({num_train} items)."
            )
        if most_shots > args.query_set_size:
            raise EvalInputError(
                f"--shots: {most_shots} demonstrations cannot be drawn from a query set of {args.query_set_size} "
                f"(--query_set_size) for {name}."
            )
