"""Annotation files as a careless download or a hostile file gives them: every reader refuses a field of the wrong
type (or JSON nested too deeply) with one `error:` line naming the file, the item and the field, before the model is
loaded; Flickr30K's COCO-style ids are matched whether numbers or strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_data import cli_flags, make_coco, make_flickr, make_hateful_memes, make_vqa

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
