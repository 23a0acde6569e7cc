"""`--data_dir`: every path from one folder in the `openflamingo/eval_benchmark` layout, or from that hub dataset
through huggingface_hub (a fake hub cache, offline, as tests/test_hub_cache.py fakes model repos)."""

from __future__ import annotations

import json
import shutil

import pytest
from eval_data import make_hateful_memes, make_vqa, tiny_model_folder

from modeling_flamingo.evaluation.__main__ import main, parse_arguments
from modeling_flamingo.evaluation.data_dir import DATA_DIR_LAYOUT, apply_data_dir

REPO = "openflamingo/eval_benchmark"
COMMIT = "d" * 40


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder, _, _ = tiny_model_folder(tmp_path_factory.mktemp("model"))
    return folder


def _argv(folder, data_dir, results_file, *flags):
    return ["--model", str(folder), "--data_dir", str(data_dir), *flags, "--shots", "2", "--num_samples", "3"] + [
        "--query_set_size", "6", "--results_file", str(results_file),
    ]  # fmt: skip


def test_layout_fills_only_missing_flags(tmp_path):
    argv = ["--model", "m", "--data_dir", str(tmp_path), "--eval_vqav2"]
    args = apply_data_dir(parse_arguments([*argv, "--vqav2_test_image_dir_path", "/mine/val2014"]))
    assert args.vqav2_test_image_dir_path == "/mine/val2014"
    assert args.vqav2_train_questions_json_path == str(tmp_path / DATA_DIR_LAYOUT["vqav2_train_questions_json_path"])
    assert args.coco_karpathy_json_path is None  # not a selected task


def test_local_data_dir_runs_like_explicit_paths(model_folder, tmp_path):
    paths = make_hateful_memes(tmp_path / "bench")
    explicit = tmp_path / "explicit.json"
    flags = [part for flag, value in paths.items() for part in (f"--{flag}", value)]
    argv = ["--model", str(model_folder), "--eval_hateful_memes", *flags, "--shots", "2", "--num_samples", "3"]
    assert main(argv + ["--query_set_size", "6", "--results_file", str(explicit)]) == 0
    from_dir = tmp_path / "from_dir.json"
    assert main(_argv(model_folder, tmp_path / "bench", from_dir, "--eval_hateful_memes")) == 0
    assert json.loads(from_dir.read_text()) == json.loads(explicit.read_text())


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The hub dataset's `vizwiz/` folder in a hub cache (`datasets--openflamingo--eval_benchmark`), offline."""
    bench = tmp_path / "bench"
    make_vqa(bench, "vizwiz")
    cache = tmp_path / "hub_cache"
    repo = cache / f"datasets--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(bench / "vizwiz", repo / "snapshots" / COMMIT / "vizwiz")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables when it is imported: set its constants too (restored after the test).
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_hub_dataset_id_through_snapshot_download(model_folder, fake_hub, tmp_path):
    results = tmp_path / "hub.json"
    assert main(_argv(model_folder, REPO, results, "--eval_vizwiz")) == 0
    assert json.loads(results.read_text())["vizwiz"][0]["shots"] == 2
    records = (tmp_path / "hub" / "predictions" / "vizwiz-2shot-seed42.jsonl").read_text().splitlines()
    assert len(records) == 3


def test_unknown_hub_dataset_offline_is_one_error(model_folder, fake_hub, tmp_path, capsys):
    assert main(_argv(model_folder, "someone/not-cached", tmp_path / "x.json", "--eval_vizwiz")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --data_dir: cannot fetch the hub dataset someone/not-cached")
    assert not (tmp_path / "x.json").exists()
