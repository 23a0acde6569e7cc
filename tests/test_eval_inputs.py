"""Annotation files and images as a careless download or a hostile file gives them: every reader refuses a field of
the wrong type (or JSON nested too deeply) with one `error:` line naming the file, the item and the field, before the
model is loaded; Flickr30K's COCO-style ids are matched whether numbers or strings; an image declaring more pixels
than `--max_image_pixels` is refused before it is decoded."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import PIL.ImageFile
import pytest
from eval_data import cli_flags, make_coco, make_flickr, make_hateful_memes, make_vqa, write_png_declaring
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from modeling_flamingo.evaluation import rices
from modeling_flamingo.evaluation.__main__ import build_parser, main
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel
from modeling_flamingo.evaluation.tasks import TASKS


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Every refusal here must come before the model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(FlamingoEvalModel, "from_pretrained", refuse)


def run(tmp_path: Path, task: str, paths: dict[str, str], *argv: str) -> int:
    return main(
        ["--model", str(tmp_path / "no-model"), "--results_file", str(tmp_path / "r.json"), f"--eval_{task}"]
        + ["--shots", "0", "--query_set_size", "4", *cli_flags(paths), *argv]
    )


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def edit_json(path: str, edit) -> None:
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def edit_jsonl(path: str, line: int, edit) -> None:
    lines = Path(path).read_text().splitlines()
    record = json.loads(lines[line - 1])
    edit(record)
    lines[line - 1] = json.dumps(record)
    Path(path).write_text("\n".join(lines) + "\n")


def _test_entry(data: dict, position: int = 1) -> dict:
    return [image for image in data["images"] if image["split"] == "test"][position]


def _set(key, value, *path):
    """An edit that sets `data[path...][key] = value`."""

    def edit(data):
        for step in path:
            data = data[step]
        data[key] = value

    return edit


# (task, annotation flag, edit, what the message names besides the file)
WRONG_FIELDS = {
    "vqa-image_id-str": (
        "vqav2", "vqav2_test_questions_json_path", _set("image_id", "abc", "questions", 3), ["question 3", "'image_id'"]
    ),
    "vqa-question-null": (
        "vqav2", "vqav2_test_questions_json_path", _set("question", None, "questions", 2), ["question 2", "'question'"]
    ),
    "vizwiz-image_id-int": (
        "vizwiz", "vizwiz_train_questions_json_path", _set("image_id", 7, "questions", 1), ["question 1", "'image_id'"]
    ),
    "textvqa-question_id-list": (
        "textvqa", "textvqa_test_questions_json_path", _set("question_id", [1], "questions", 4), ["question 4"]
    ),
    "okvqa-answer-null": (
        "ok_vqa", "ok_vqa_test_annotations_json_path", _set("answer", None, "annotations", 5, "answers", 2),
        ["annotation 5", "answers[2]", "'answer'"],
    ),
    "coco_style-caption-null": (
        "coco", "coco_annotations_json_path", _set("caption", None, "annotations", 4), ["annotation 4", "'caption'"]
    ),
    "coco_style-image_id-dict": (
        "coco", "coco_annotations_json_path", _set("image_id", {"a": 1}, "annotations", 0), ["annotation 0"]
    ),
    "karpathy-raw-null": (
        "coco", "coco_karpathy_json_path", lambda data: _test_entry(data)["sentences"][1].update(raw=None),
        ["image entry 11", "sentences[1]", "'raw'"],
    ),
    "karpathy-cocoid-str": (
        "coco", "coco_karpathy_json_path", lambda data: _test_entry(data).update(cocoid="abc"), ["'cocoid'"]
    ),
    "karpathy-filename-int": (
        "flickr30", "flickr_karpathy_json_path", lambda data: _test_entry(data).update(filename=5), ["'filename'"]
    ),
}  # fmt: skip


@pytest.mark.parametrize("task, flag, edit, expected", WRONG_FIELDS.values(), ids=WRONG_FIELDS.keys())
def test_wrong_field_type_names_file_item_and_field(tmp_path, capsys, task, flag, edit, expected):
    make = {"coco": make_coco, "flickr30": make_flickr}.get(task, lambda root: make_vqa(root, task))
    paths = make(tmp_path)
    edit_json(paths[flag], edit)
    assert run(tmp_path, task, paths) == 1
    line = one_error_line(capsys)
    assert paths[flag] in line and all(part in line for part in expected), line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "key, value", [("text", None), ("label", True), ("img", 7), ("id", None)], ids=["text", "label", "img", "id"]
)
def test_hateful_memes_wrong_field_type(tmp_path, capsys, key, value):
    paths = make_hateful_memes(tmp_path)
    path = paths["hateful_memes_test_annotations_json_path"]
    edit_jsonl(path, 3, _set(key, value))
    assert run(tmp_path, "hateful_memes", paths) == 1
    line = one_error_line(capsys)
    assert path in line and "line 3" in line and repr(key) in line


def test_null_question_never_becomes_a_prompt(tmp_path):
    """`question: null` used to be read as the prompt `Question:None`."""
    paths = make_vqa(tmp_path, "vqav2")
    edit_json(paths["vqav2_train_questions_json_path"], _set("question", None, "questions", 0))
    args = build_parser().parse_args(["--model", "x", *cli_flags(paths)])
    with pytest.raises(EvalInputError, match=r"question 0 \(question_id 10000\) has 'question' = None"):
        TASKS["vqav2"].load(args)


DEPTH = 100_000  # far past Python's recursion limit


def test_deeply_nested_json_file(tmp_path, capsys):
    paths = make_vqa(tmp_path, "vqav2")
    path = Path(paths["vqav2_test_annotations_json_path"])
    path.write_text('{"annotations": ' + "[" * DEPTH + "]" * DEPTH + "}")
    assert run(tmp_path, "vqav2", paths) == 1
    line = one_error_line(capsys)
    assert str(path) in line and "--vqav2_test_annotations_json_path" in line and "nested too deeply" in line


def test_deeply_nested_jsonl_line(tmp_path, capsys):
    paths = make_hateful_memes(tmp_path)
    path = Path(paths["hateful_memes_train_annotations_json_path"])
    with path.open("a") as f:
        f.write('{"id": ' + "[" * DEPTH + "]" * DEPTH + "}\n")
    assert run(tmp_path, "hateful_memes", paths) == 1
    line = one_error_line(capsys)
    assert str(path) in line and "line 11" in line and "nested too deeply" in line


# ---------------------------------------------------------------------------------------------------------------
# Flickr30K: the COCO-style file's image ids


def _flickr_args(paths: dict[str, str]):
    return build_parser().parse_args(["--model", "x", *cli_flags(paths)])


@pytest.mark.parametrize("as_int", [False, True], ids=["string ids", "integer ids"])
def test_flickr_coco_style_ids_of_either_type(tmp_path, as_int):
    """The released file keys images by their file name stem, a string ("1000092795"): the original's results file
    holds `filename.split(".")[0]` and pycocotools' `loadRes` asserts those ids are the file's. A file with the same
    ids as numbers names the same images."""
    paths = make_flickr(tmp_path)
    coco_style = Path(paths["flickr_annotations_json_path"])
    if as_int:

        def to_int(data):
            for image in data["images"]:
                image["id"] = int(image["id"])
            for annotation in data["annotations"]:
                annotation["image_id"] = int(annotation["image_id"])

        edit_json(str(coco_style), to_int)
    annotations = json.loads(coco_style.read_text())["annotations"]
    assert all(isinstance(a["image_id"], int) == as_int for a in annotations)
    loaded = TASKS["flickr30"].load(_flickr_args(paths))
    assert [item.id for item in loaded.test] == [str(4010 + i) for i in range(6)]  # the original's ids
    for item in loaded.test:
        expected = [a["caption"] for a in annotations if str(a["image_id"]) == item.id]
        assert loaded.references[item.id] == expected == item.answers  # the Karpathy sentences are the same


def test_flickr_ids_that_do_not_match_name_both_files(tmp_path):
    paths = make_flickr(tmp_path)
    edit_json(
        paths["flickr_annotations_json_path"],
        lambda data: [a.update(image_id=int(a["image_id"]) + 100000) for a in data["annotations"]],
    )
    with pytest.raises(EvalInputError) as raised:
        TASKS["flickr30"].load(_flickr_args(paths))
    message = str(raised.value)
    assert paths["flickr_annotations_json_path"] in message and paths["flickr_karpathy_json_path"] in message
    assert "'4010'" in message and "104010" in message and "(and 5 more)" in message


# ---------------------------------------------------------------------------------------------------------------
# Images declaring more pixels than --max_image_pixels


@pytest.fixture
def decoded_sizes(monkeypatch):
    """Sizes of the images PIL decodes (where the pixel memory is allocated)."""
    sizes = []
    load = PIL.ImageFile.ImageFile.load

    def spy(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", spy)
    return sizes


def test_huge_image_is_refused_before_decoding(tmp_path, decoded_sizes):
    """The issue's case: a 12000 x 12000 image (144 MP, under PIL's own 179 MP refusal) decoded to gigabytes."""
    paths = make_vqa(tmp_path, "textvqa")
    loaded = TASKS["textvqa"].load(build_parser().parse_args(["--model", "x", *cli_flags(paths)]))
    item = loaded.test[2]
    write_png_declaring(Path(item.image_path), 12000, 12000)
    assert Path(item.image_path).stat().st_size < 100_000
    with pytest.raises(EvalInputError) as raised:
        item.load_image()
    message = str(raised.value)
    assert message.startswith(f"textvqa (test split) item {item.id!r}: image {item.image_path} is 12000x12000")
    assert "144,000,000 pixels, more than --max_image_pixels 50,000,000" in message
    assert "never skipped" in message
    assert (12000, 12000) not in decoded_sizes  # refused from the header: no pixel buffer was allocated
    assert loaded.train[0].load_image().size == header_size(loaded.train[0].image_path)  # small images still open


def header_size(path: str) -> tuple[int, int]:
    with PIL.Image.open(path) as image:
        return image.size


def test_max_image_pixels_flag_bounds_train_items(tmp_path):
    """Demonstrations (and RICES, which opens the train split the same way) name their split."""
    paths = make_vqa(tmp_path, "vizwiz")
    args = build_parser().parse_args(["--model", "x", "--max_image_pixels", "1000", *cli_flags(paths)])
    item = TASKS["vizwiz"].load(args).train[4]
    width, height = header_size(item.image_path)  # 40 to 90 pixels a side: over 1000 pixels
    with pytest.raises(
        EvalInputError, match=rf"^vizwiz \(train split\) item {item.id!r}: image .* is {width}x{height}"
    ):
        item.load_image()


def test_rices_cli_refuses_a_huge_image(tmp_path, capsys, decoded_sizes):
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16, projection_dim=8,
    )  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    image = tmp_path / "huge.png"
    write_png_declaring(image, 12000, 12000)
    (tmp_path / "images.txt").write_text(f"{image}\n")
    argv = ["--images", str(tmp_path / "images.txt"), "--output", str(tmp_path / "f.pkl")]
    assert rices.main([*argv, "--model", str(tmp_path / "clip"), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert str(image) in line and "12000x12000 = 144,000,000 pixels" in line and "--max_image_pixels" in line
    assert (12000, 12000) not in decoded_sizes
    assert not (tmp_path / "f.pkl").exists()
