"""Bad input: one `error: ...` line naming the file and the item, exit status 1, no results file claiming a score."""

from __future__ import annotations

import json
import re

import pytest
from eval_data import cli_flags, make_coco, make_hateful_memes, make_vqa, tiny_model_folder, write_png_declaring

from modeling_flamingo.evaluation.__main__ import main


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder, _, _ = tiny_model_folder(tmp_path_factory.mktemp("model"))
    return folder


def run(folder, results_file, *argv):
    return main(
        ["--model", str(folder), "--results_file", str(results_file), "--shots", "2", "--query_set_size", "6", *argv]
    )


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def test_missing_annotation_file(model_folder, tmp_path, capsys):
    paths = make_coco(tmp_path)
    paths["coco_karpathy_json_path"] = str(tmp_path / "nope" / "dataset_coco.json")
    assert run(model_folder, tmp_path / "r.json", "--eval_coco", *cli_flags(paths)) == 1
    line = one_error_line(capsys)
    assert "--coco_karpathy_json_path" in line and "nope/dataset_coco.json" in line and "does not exist" in line
    assert not (tmp_path / "r.json").exists()


def test_malformed_annotation_file(model_folder, tmp_path, capsys):
    paths = make_vqa(tmp_path, "vqav2")
    with open(paths["vqav2_test_annotations_json_path"], "a") as f:
        f.write("}")
    assert run(model_folder, tmp_path / "r.json", "--eval_vqav2", *cli_flags(paths)) == 1
    line = one_error_line(capsys)
    assert paths["vqav2_test_annotations_json_path"] in line and "not valid JSON" in line
    assert not (tmp_path / "r.json").exists()


def test_annotation_without_a_field(model_folder, tmp_path, capsys):
    paths = make_vqa(tmp_path, "vizwiz")
    path = paths["vizwiz_test_questions_json_path"]
    data = json.loads(open(path).read())
    del data["questions"][3]["question"]
    open(path, "w").write(json.dumps(data))
    assert run(model_folder, tmp_path / "r.json", "--eval_vizwiz", *cli_flags(paths)) == 1
    line = one_error_line(capsys)
    assert path in line and "question 3" in line and "'question'" in line


def test_malformed_jsonl_line(model_folder, tmp_path, capsys):
    paths = make_hateful_memes(tmp_path)
    with open(paths["hateful_memes_test_annotations_json_path"], "a") as f:
        f.write('{"id": 9, "img": \n')
    assert run(model_folder, tmp_path / "r.json", "--eval_hateful_memes", *cli_flags(paths)) == 1
    line = one_error_line(capsys)
    assert paths["hateful_memes_test_annotations_json_path"] in line and "line 9" in line


def test_task_flag_without_its_paths(model_folder, tmp_path, capsys):
    assert run(model_folder, tmp_path / "r.json", "--eval_flickr30") == 1
    assert "--flickr_image_dir_path is required" in one_error_line(capsys)
    assert not (tmp_path / "r.json").exists()


def test_missing_image_names_file_and_item(model_folder, tmp_path, capsys):
    paths = make_coco(tmp_path)
    data = json.loads(open(paths["coco_karpathy_json_path"]).read())
    victim = next(image for image in data["images"] if image["split"] == "test")
    (tmp_path / "mscoco_karpathy" / victim["filepath"] / victim["filename"]).unlink()
    assert run(model_folder, tmp_path / "r.json", "--eval_coco", *cli_flags(paths)) == 1
    line = one_error_line(capsys)
    assert victim["filename"] in line and f"item {victim['cocoid']}" in line and "does not exist" in line
    assert not (tmp_path / "r.json").exists()


def test_undecodable_image_names_file_and_item(model_folder, tmp_path, capsys):
    paths = make_vqa(tmp_path, "textvqa")
    questions = json.loads(open(paths["textvqa_test_questions_json_path"]).read())["questions"]
    victim = questions[2]
    image = tmp_path / "textvqa" / "train_images" / f"{victim['image_id']}.jpg"
    image.write_bytes(b"definitely not a jpeg")
    assert run(model_folder, tmp_path / "r.json", "--eval_textvqa", *cli_flags(paths)) == 1
    line = one_error_line(capsys)
    assert str(image) in line and f"item {victim['question_id']}" in line and "cannot decode" in line
    assert not (tmp_path / "r.json").exists()
    assert image.read_bytes() == b"definitely not a jpeg"  # nothing of the user's is touched


def test_trial_seed_count_must_match(model_folder, tmp_path, capsys):
    paths = make_coco(tmp_path)
    assert run(model_folder, tmp_path / "r.json", "--eval_coco", *cli_flags(paths), "--num_trials", "2") == 1
    assert "--num_trials is 2 but 1 --trial_seeds" in one_error_line(capsys)


def test_missing_model_folder(tmp_path, capsys):
    paths = make_coco(tmp_path)
    assert run(tmp_path / "no-model", tmp_path / "r.json", "--eval_coco", *cli_flags(paths)) == 1
    assert "no-model" in one_error_line(capsys)


def test_dash_spellings_are_accepted(model_folder, tmp_path, capsys):
    paths = make_coco(tmp_path)
    dashed = [part.replace("_", "-") if part.startswith("--") else part for part in cli_flags(paths)]
    argv = ["--model", str(model_folder), "--eval-coco", *dashed, "--shots", "0", "--num-samples", "2"]
    argv += ["--query-set-size", "6", "--results-file", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["coco"][0]["shots"] == 0


@pytest.mark.parametrize("split", ["test", "train"])
def test_image_over_max_image_pixels_stops_the_run(model_folder, tmp_path, capsys, split):
    """A benchmark item is never dropped: an image over the bound ends the run naming task, split, item, file, size
    and flag, before it is decoded; no results file claims a score."""
    paths = make_coco(tmp_path)
    data = json.loads(open(paths["coco_karpathy_json_path"]).read())
    for victim in [image for image in data["images"] if image["split"] == split]:  # each one is evaluated or drawn
        # A PNG despite the .jpg name: PIL reads the format from the bytes.
        write_png_declaring(tmp_path / "mscoco_karpathy" / victim["filepath"] / victim["filename"], 12000, 12000)
    argv = ["--eval_coco", *cli_flags(paths), "--max_image_pixels", "100000000"]
    assert run(model_folder, tmp_path / "r.json", *argv) == 1
    line = one_error_line(capsys)
    image = rf"{tmp_path}/mscoco_karpathy/(train|val)2014/COCO_\S+\.jpg"
    assert re.match(rf"error: coco \({split} split\) item \d+: image {image} is 12000x12000", line), line
    assert "144,000,000 pixels, more than --max_image_pixels 100,000,000" in line
    assert not (tmp_path / "r.json").exists()
