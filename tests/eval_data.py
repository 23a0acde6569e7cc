"""Tiny benchmarks in every task's real file layout (the `openflamingo/eval_benchmark` folders), images included,
and the tiny model the evaluation tests run on (the original's weights, saved as a converted folder)."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_flamingo import FlamingoProcessor
from modeling_flamingo.evaluation.classnames import IMAGENET_CLASSNAMES
from modeling_flamingo.evaluation.data_dir import DATA_DIR_LAYOUT
from modeling_flamingo.processing.image_processing_flamingo import FlamingoImageProcessor

from reference import build_original, ours_from_original

WORDS = "a the cat dog sink bus red yellow ball park man wave tennis plate food rice two people sunny couch".split()
FAMILY = "llama"


def tiny_model_folder(root: Path, family: str = FAMILY):
    """Save our model with the original's weights and its processor to `root`; return (folder, original, tokenizer)."""
    original, tokenizer = build_original(family)
    ours = ours_from_original(original, tokenizer, family)
    folder = root / "tiny-flamingo"
    ours.save_pretrained(folder)
    processor = FlamingoProcessor(FlamingoImageProcessor.from_flamingo_config(ours.config), tokenizer)
    processor.save_pretrained(folder)
    return folder, original, tokenizer


def _sentence(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_image(path: Path, seed: int) -> None:
    """A random picture of a random size and mode (RGB JPEG, or PNG in RGB/L/P), like real datasets mix."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if path.suffix.lower() == ".png":
        image = image.convert(["RGB", "L", "P"][seed % 3])
    image.save(path)


def write_png_declaring(path: Path, width: int, height: int) -> None:
    """A valid 1-bit black PNG of `width` x `height`: a few KB on disk, width * height bytes once PIL decodes it."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _path(root: Path, flag: str) -> Path:
    return root / DATA_DIR_LAYOUT[flag]


def make_coco(root: Path, num_train: int = 10, num_test: int = 6, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    images, coco_images, coco_annotations = [], [], []
    for i in range(num_train + num_test + 2):
        split = "train" if i < num_train else ("test" if i < num_train + num_test else "val")
        folder = "train2014" if i % 3 else "val2014"  # Karpathy's train split holds val2014 images too
        cocoid = 1000 + i
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image(root / "mscoco_karpathy" / folder / filename, seed * 1000 + i)
        sentences = [{"raw": _sentence(rng) + (" ." if k else "")} for k in range(3)]
        images.append(
            {"filepath": folder, "filename": filename, "cocoid": cocoid, "split": split, "sentences": sentences}
        )
        if split == "test":
            coco_images.append({"id": cocoid, "file_name": filename})
            for k, s in enumerate(sentences):
                coco_annotations.append({"image_id": cocoid, "id": cocoid * 10 + k, "caption": s["raw"]})
    _dump(_path(root, "coco_karpathy_json_path"), {"images": images, "dataset": "coco"})
    _dump(
        _path(root, "coco_annotations_json_path"),
        {"info": {}, "licenses": [], "type": "captions", "images": coco_images, "annotations": coco_annotations},
    )
    return {flag: str(_path(root, flag)) for flag in DATA_DIR_LAYOUT if flag.startswith("coco_")}


def make_flickr(root: Path, num_train: int = 10, num_test: int = 6, seed: int = 1) -> dict[str, str]:
    rng = random.Random(seed)
    images, coco_images, coco_annotations = [], [], []
    for i in range(num_train + num_test):
        split = "train" if i < num_train else "test"
        filename = f"{4000 + i}.jpg"
        write_image(_path(root, "flickr_image_dir_path") / filename, seed * 1000 + i)
        sentences = [{"raw": _sentence(rng)} for _ in range(2)]
        images.append({"filename": filename, "split": split, "sentences": sentences, "imgid": i})
        if split == "test":
            image_id = filename.split(".")[0]
            coco_images.append({"id": image_id})
            for k, s in enumerate(sentences):
                coco_annotations.append({"image_id": image_id, "id": i * 10 + k, "caption": s["raw"]})
    _dump(_path(root, "flickr_karpathy_json_path"), {"images": images, "dataset": "flickr30k"})
    _dump(_path(root, "flickr_annotations_json_path"), {"images": coco_images, "annotations": coco_annotations})
    return {flag: str(_path(root, flag)) for flag in DATA_DIR_LAYOUT if flag.startswith("flickr_")}


def make_vqa(root: Path, name: str, num_train: int = 10, num_test: int = 6, seed: int = 2) -> dict[str, str]:
    """VQAv2 / OK-VQA (COCO file names), TextVQA (`<id>.jpg`) or VizWiz (file name as image id)."""
    rng = random.Random(seed)
    flags = {}
    for split, count, coco in (("train", num_train, "train2014"), ("test", num_test, "val2014")):
        prefix = "textvqa" if name == "textvqa" else f"{name}_{split}"
        image_dir = _path(root, f"{prefix}_image_dir_path")
        questions, annotations = [], []
        for i in range(count):
            qid = (1 if split == "train" else 2) * 10000 + i
            if name in ("vqav2", "ok_vqa"):
                image_id = 500 + i
                filename = f"COCO_{coco}_{image_id:012d}.jpg"
            elif name == "vizwiz":
                image_id = filename = f"VizWiz_{split}_{i:08d}.jpg"
            else:
                image_id = f"{split}{i:04x}"
                filename = f"{image_id}.jpg"
            write_image(image_dir / filename, seed * 1000 + qid)
            questions.append(
                {"image_id": image_id, "question": f"what is the {rng.choice(WORDS)}?", "question_id": qid}
            )
            answers = [rng.choice(["yes", "no", "two", "red", "a dog", "cat"]) for _ in range(10)]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": "what is the",
                    "answer_type": "other",
                    "multiple_choice_answer": answers[0],
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)
                    ],
                }
            )
        meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": coco, "license": {}}
        q_flag, a_flag = f"{name}_{split}_questions_json_path", f"{name}_{split}_annotations_json_path"
        _dump(_path(root, q_flag), {**meta, "questions": questions})
        _dump(_path(root, a_flag), {**meta, "annotations": annotations})
        flags.update({q_flag: str(_path(root, q_flag)), a_flag: str(_path(root, a_flag))})
        flags[f"{prefix}_image_dir_path"] = str(image_dir)
    return flags


def set_vqa_test_answers(paths: dict[str, str], name: str, answers: dict[int, str]) -> None:
    """Make `answers[question_id]` all ten human answers of those test questions (the others keep theirs)."""
    path = Path(paths[f"{name}_test_annotations_json_path"])
    data = json.loads(path.read_text())
    for annotation in data["annotations"]:
        if annotation["question_id"] in answers:
            answer = answers[annotation["question_id"]]
            annotation["multiple_choice_answer"] = answer
            for slot in annotation["answers"]:
                slot["answer"] = answer
    _dump(path, data)


def make_hateful_memes(root: Path, num_train: int = 10, num_test: int = 8, seed: int = 3) -> dict[str, str]:
    rng = random.Random(seed)
    image_dir = _path(root, "hateful_memes_image_dir_path")
    for split, count in (("train", num_train), ("test", num_test)):
        lines = []
        for i in range(count):
            meme_id = (1 if split == "train" else 2) * 1000 + i
            write_image(image_dir / f"{meme_id:05d}.png", seed * 1000 + meme_id)
            label = i % 2 if split == "test" else rng.randint(0, 1)
            lines.append(
                json.dumps({"id": meme_id, "img": f"img/{meme_id:05d}.png", "label": label, "text": _sentence(rng, 4)})
            )
        path = _path(root, f"hateful_memes_{split}_annotations_json_path")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return {flag: str(_path(root, flag)) for flag in DATA_DIR_LAYOUT if flag.startswith("hateful_memes_")}


def make_imagenet(
    root: Path, num_classes: int = 3, per_class: tuple[int, int] = (3, 2), seed: int = 4
) -> dict[str, str]:
    """ImageFolder layout; folder i (sorted WordNet-style ids) is class IMAGENET_CLASSNAMES[i]."""
    base = _path(root, "imagenet_root")
    for split, count in zip(("train", "val"), per_class, strict=True):
        for c in range(num_classes):
            for i in range(count):
                write_image(base / split / f"n{c:08d}" / f"img_{i}.JPEG", seed * 1000 + c * 100 + i + len(split))
    assert IMAGENET_CLASSNAMES[0] == "tench"
    return {"imagenet_root": str(base)}


def make_all(root: Path) -> dict[str, dict[str, str]]:
    return {
        "coco": make_coco(root),
        "flickr30": make_flickr(root),
        "vqav2": make_vqa(root, "vqav2"),
        "ok_vqa": make_vqa(root, "ok_vqa", seed=5),
        "textvqa": make_vqa(root, "textvqa", seed=6),
        "vizwiz": make_vqa(root, "vizwiz", seed=7),
        "hateful_memes": make_hateful_memes(root),
        "imagenet": make_imagenet(root),
    }


def cli_flags(paths: dict[str, str]) -> list[str]:
    return [part for flag, value in paths.items() for part in (f"--{flag}", value)]


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
