"""docs/evaluation.md's claim: a ninth task is one definition plus one registry line. The docs' GQA definition is
added to `TASKS` (in a fresh interpreter, before anything built from the registry is imported, as a line in
evaluation/tasks/__init__.py would be) and run through the CLI, by its own flags and through `--data_dir`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from eval_data import make_vqa, tiny_model_folder

# The definition as docs/evaluation.md writes it, registered the way its one registry line does.
_REGISTER_GQA = """
import sys
import modeling_flamingo.evaluation.tasks as tasks
from modeling_flamingo.evaluation.tasks.vqa import JPG_IDS, VQATask

GQA = VQATask(
    name="gqa",
    title="GQA (Accuracy)",
    data_layout={
        "gqa_image_dir_path": "gqa/images",
        "gqa_train_questions_json_path": "gqa/train_questions_vqa_format.json",
        "gqa_train_annotations_json_path": "gqa/train_annotations_vqa_format.json",
        "gqa_test_questions_json_path": "gqa/testdev_questions_vqa_format.json",
        "gqa_test_annotations_json_path": "gqa/testdev_annotations_vqa_format.json",
    },
    image_names=JPG_IDS,
)
tasks.TASKS["gqa"] = GQA
from modeling_flamingo.evaluation.__main__ import main

sys.exit(main(sys.argv[1:]))
"""


def _gqa_data(root: Path) -> Path:
    """TextVQA-format files (the format the docs convert GQA to: `<image_id>.jpg`) in the GQA layout."""
    textvqa = make_vqa(root / "textvqa", "textvqa")
    data = root / "gqa_data"
    shutil.copytree(textvqa["textvqa_image_dir_path"], data / "gqa" / "images")
    for role, name in (
        ("train_questions", "train_questions"),
        ("train_annotations", "train_annotations"),
        ("test_questions", "testdev_questions"),
        ("test_annotations", "testdev_annotations"),
    ):
        shutil.copy(textvqa[f"textvqa_{role}_json_path"], data / "gqa" / f"{name}_vqa_format.json")
    return data


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _REGISTER_GQA, *argv], capture_output=True, text=True, timeout=600)


def test_a_ninth_task_is_one_definition_and_one_registry_line(tmp_path):
    folder, _, _ = tiny_model_folder(tmp_path)
    data = _gqa_data(tmp_path)
    help_text = _run("--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "--eval_gqa" in help_text.stdout and "--gqa_test_questions_json_path" in help_text.stdout

    common = ["--model", str(folder), "--eval_gqa", "--shots", "0", "2", "--num_samples", "3"]
    common += ["--query_set_size", "8", "--batch_size", "2"]
    by_flags = tmp_path / "flags" / "results.json"
    layout = data / "gqa"
    flags = [
        "--gqa_image_dir_path", str(layout / "images"),
        "--gqa_train_questions_json_path", str(layout / "train_questions_vqa_format.json"),
        "--gqa_train_annotations_json_path", str(layout / "train_annotations_vqa_format.json"),
        "--gqa_test_questions_json_path", str(layout / "testdev_questions_vqa_format.json"),
        "--gqa_test_annotations_json_path", str(layout / "testdev_annotations_vqa_format.json"),
    ]  # fmt: skip
    first = _run(*common, *flags, "--results_file", str(by_flags))
    assert first.returncode == 0, first.stderr[-3000:]
    by_data_dir = tmp_path / "data_dir" / "results.json"
    second = _run(*common, "--data_dir", str(data), "--results_file", str(by_data_dir))
    assert second.returncode == 0, second.stderr[-3000:]

    results = json.loads(by_flags.read_text())
    assert list(results) == ["gqa"] and [entry["shots"] for entry in results["gqa"]] == [0, 2]
    assert results == json.loads(by_data_dir.read_text())
    assert by_flags.with_suffix(".md").read_text().splitlines()[2].startswith("| GQA (Accuracy) |")
    predictions = sorted((by_flags.parent / "results" / "predictions").glob("gqa-*shot-seed42.jsonl"))
    assert len(predictions) == 2
    records = [json.loads(line) for line in predictions[0].read_text().splitlines()]
    assert len(records) == 3 and all(record["prediction"] is not None for record in records)
