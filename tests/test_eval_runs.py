"""Runs a researcher can trust: outputs never overwrite inputs, results of earlier runs are merged not dropped, a
resume never mixes two models or settings, Ctrl-C says how to continue, a full disk loses nothing."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from eval_data import cli_flags, make_coco, make_vqa, tiny_model_folder

from modeling_flamingo.evaluation import results as results_module
from modeling_flamingo.evaluation.__main__ import main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel


@pytest.fixture(scope="module", autouse=True)
def hf_home(tmp_path_factory):
    """A private hash cache (and hub cache) for these tests."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    folder, _, _ = tiny_model_folder(root)
    data = root / "data"
    return root, folder, {"coco": make_coco(data), "vqav2": make_vqa(data, "vqav2")}, data


def argv(folder, paths, results_file, *extra, task="coco"):
    base = ["--model", str(folder), f"--eval_{task}", *cli_flags(paths[task]), "--num_samples", "4"]
    return base + ["--batch_size", "2", "--query_set_size", "6", "--results_file", str(results_file), *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a run gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(FlamingoEvalModel, "from_pretrained", refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(env, tmp_path_factory):
    """A finished coco run at 0 and 2 shots: (results file, its JSON text, the predictions folder)."""
    root, folder, paths, _ = env
    results = tmp_path_factory.mktemp("finished") / "r.json"
    assert main(argv(folder, paths, results, "--shots", "0", "2")) == 0
    return results, results.read_text(), results.with_suffix("") / "predictions"


def copy_run(finished, tmp_path) -> Path:
    results, _, predictions = finished
    shutil.copy(results, tmp_path / "r.json")
    shutil.copy(results.with_suffix(".md"), tmp_path / "r.md")
    shutil.copytree(predictions.parent, tmp_path / "r")  # the predictions and their run record
    return tmp_path / "r.json"


# ---------------------------------------------------------------------------------------------------------------
# item: outputs that would overwrite an input


@pytest.mark.parametrize(
    "case",
    [
        "annotation_file",
        "table_is_annotation",
        "inside_image_folder",
        "data_dir",
        "model",
        "symlink",
        "input_in_predictions",
    ],
)
def test_outputs_overlapping_an_input_are_refused(env, tmp_path, case, capsys, no_model_load):
    root, folder, paths, data = env
    paths = {task: dict(p) for task, p in paths.items()}
    annotation = Path(paths["coco"]["coco_karpathy_json_path"])
    extra, named_input = [], annotation
    if case == "annotation_file":
        results = annotation  # the exact mistake of the issue: the JSON the run reads
    elif case == "table_is_annotation":
        shutil.copy(annotation, tmp_path / "dataset_coco.md")
        named_input = tmp_path / "dataset_coco.md"
        paths["coco"]["coco_karpathy_json_path"] = str(named_input)
        results = tmp_path / "dataset_coco.json"  # its table is the annotation file
    elif case == "inside_image_folder":
        named_input = Path(paths["coco"]["coco_train_image_dir_path"])
        results = named_input / "r.json"
    elif case == "data_dir":
        extra, named_input = ["--data_dir", str(data)], data
        results = data / "results" / "r.json"
    elif case == "model":
        named_input, results = folder, folder / "eval.json"
    elif case == "symlink":
        (tmp_path / "link").symlink_to(annotation.parent)
        results = tmp_path / "link" / annotation.name
    else:  # an image folder inside the predictions folder, which the run rewrites
        images = tmp_path / "r" / "predictions" / "val2014"
        shutil.copytree(paths["coco"]["coco_val_image_dir_path"], images)
        paths["coco"]["coco_val_image_dir_path"] = str(images)
        named_input = images
        results = tmp_path / "r.json"
    before = (
        {p: p.read_bytes() for p in Path(named_input).rglob("*") if p.is_file()}
        if named_input.is_dir()
        else {named_input: named_input.read_bytes()}
    )
    assert main(argv(folder, paths, results, "--shots", "0", *extra)) == 1
    line = one_error_line(capsys)
    assert os.path.realpath(named_input) in line and "--results_file" in line
    after = {p: p.read_bytes() for p in before}
    assert after == before


@pytest.mark.parametrize("case", ["no_extension", "results_is_folder", "table_is_folder", "stem_is_file"])
def test_results_paths_are_checked_before_any_work(env, tmp_path, case, capsys, no_model_load):
    root, folder, paths, _ = env
    results = tmp_path / "r" / "results.json"
    if case == "no_extension":
        results = tmp_path / "r" / "results"
        expected = f"--results_file {results}.json"
    elif case == "results_is_folder":
        results.mkdir(parents=True)
        expected = f"--results_file {results / 'results.json'}"
    elif case == "table_is_folder":
        (tmp_path / "r" / "results.md").mkdir(parents=True)
        expected = "pass a file path"
    else:
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "results").write_text("notes")
        expected = "is a file"
    assert main(argv(folder, paths, results, "--shots", "0")) == 1
    line = one_error_line(capsys)
    assert expected in line, line


# ---------------------------------------------------------------------------------------------------------------
# item: merging results of several runs


def test_later_runs_merge_per_task_and_shot(env, finished, tmp_path, capsys):
    """coco at 0 and 2 shots, then vqav2 (another task) into the same results file, then coco at 2 shots again (with
    --resume): every earlier entry stays, each (task, shots) of a later run replaces its own."""
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    first = json.loads(finished[1])
    assert main(argv(folder, paths, results, "--shots", "0", task="vqav2")) == 0
    merged = json.loads(results.read_text())
    assert merged["coco"] == first["coco"] and [e["shots"] for e in merged["vqav2"]] == [0]
    table = results.with_suffix(".md").read_text().splitlines()
    assert [line.split(" |")[0] for line in table[2:]] == ["| COCO (CIDEr)", "| VQAv2 (Accuracy)"]

    record = json.loads((tmp_path / "r" / "run_record.json").read_text())
    assert sorted(record["data"]) == ["coco", "vqav2"]
    vqav2 = merged["vqav2"]
    assert main(argv(folder, paths, results, "--shots", "2", "--resume")) == 0
    assert "coco 2-shot seed 42: reused 4 of 4 items" in capsys.readouterr().out
    assert json.loads(results.read_text()) == {"coco": first["coco"], "vqav2": vqav2}


def test_other_settings_refuse_to_mix_results(env, finished, tmp_path, capsys, no_model_load):
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    assert main(argv(folder, paths, results, "--shots", "0", "--precision", "bf16")) == 1
    line = one_error_line(capsys)
    assert "--precision fp32, this run uses bf16" in line and "coco 2-shot" in line
    assert "coco-2shot-seed42.jsonl" in line and str(results) in line
    assert results.read_text() == finished[1]


def test_results_without_a_record_are_not_mixed(env, tmp_path, capsys, no_model_load):
    """A results file the original harness (or an earlier version) wrote, with no run record: not merged blindly."""
    root, folder, paths, _ = env
    results = tmp_path / "r.json"
    earlier = {"ok_vqa": [{"shots": 4, "trials": [40.0], "mean": 40.0, "stddev": 0.0}]}
    results.write_text(json.dumps(earlier))
    assert main(argv(folder, paths, results, "--shots", "0")) == 1
    line = one_error_line(capsys)
    assert "ok_vqa 4-shot" in line and "not recorded" in line
    assert json.loads(results.read_text()) == earlier


# ---------------------------------------------------------------------------------------------------------------
# item: what predictions depend on


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--precision", "bf16"], "--precision fp32, this run uses bf16"),
        (["--zero_shot_classification_images", "query"], "--zero_shot_classification_images original, this run"),
        (["--no_caching_for_classification"], "--no_caching_for_classification False, this run uses True"),
        (["--num_samples", "3"], "--num_samples 4, this run uses 3"),
        (["--rices"], "--rices False, this run uses True"),
    ],
)
def test_resume_refuses_other_flags(env, finished, tmp_path, flags, expected, capsys, no_model_load):
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    assert main(argv(folder, paths, results, "--shots", "0", "2", "--resume", *flags)) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: --resume: the predictions in {tmp_path / 'r' / 'predictions'} were made with")
    assert expected in line


def test_resume_refuses_other_annotation_content(env, finished, tmp_path, capsys, no_model_load):
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    paths = {"coco": dict(paths["coco"])}
    edited = tmp_path / "dataset_coco.json"
    data = json.loads(Path(paths["coco"]["coco_karpathy_json_path"]).read_text())
    data["images"][0]["sentences"][0]["raw"] = "another caption"  # a demonstration's text
    edited.write_text(json.dumps(data))
    paths["coco"]["coco_karpathy_json_path"] = str(edited)
    assert main(argv(folder, paths, results, "--shots", "0", "2", "--resume")) == 1
    line = one_error_line(capsys)
    assert f"other content in --coco_karpathy_json_path than this run's {edited}" in line


def test_resume_refuses_other_weights_of_the_same_shape_and_size(env, finished, tmp_path, capsys):
    """The model folder is copied with its file times, then one weight is changed in place: same shapes, same file
    size, same modification time; the resume is refused, naming the weights file."""
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(folder, model)  # copies modification times
    # The same weights under another path resume fine: the files' content identifies the model.
    assert main(argv(model, paths, results, "--shots", "0", "2", "--resume")) == 0
    weights = model / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:  # the last bytes of the last tensor's data
        f.seek(-16, os.SEEK_END)
        tail = f.read(16)
        f.seek(-16, os.SEEK_END)
        f.write(bytes(b ^ 0x55 for b in tail))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert main(argv(model, paths, results, "--shots", "0", "2", "--resume")) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: --resume:") and "files that differ: model.safetensors" in line


def test_unchanged_files_are_hashed_once(tmp_path, monkeypatch):
    from modeling_flamingo.evaluation import run_record

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 1000)
    first = run_record.file_hashes([path])
    hashed = []
    inner = run_record.file_sha256
    monkeypatch.setattr(run_record, "file_sha256", lambda path: hashed.append(1) or inner(path))
    assert run_record.file_hashes([path]) == first and hashed == []
    stat = path.stat()
    path.write_bytes(b"\1" * 1000)  # same size, modification time set back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run_record.file_hashes([path]) != first and hashed == [1]


def test_hub_model_is_identified_by_its_commit(tmp_path, monkeypatch):
    """A hub repo in transformers format: the commit its `main` ref resolved to in the hub cache (the files of that
    commit are fixed), so a repo that moved to new weights is another model."""
    from modeling_flamingo.evaluation import run_record

    repo = tmp_path / "hub" / "models--someone--flamingo"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    before = run_record.model_identity("someone/flamingo")
    assert before == {"repo": "someone/flamingo", "commit": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)
    record = {"settings": {}, "data": {}, "package_version": "1"}
    found = run_record.differences(
        {**record, "model": before}, {**record, "model": run_record.model_identity("someone/flamingo")}
    )
    assert found == [
        f"--model someone/flamingo at commit {'a' * 40}, this run uses --model someone/flamingo at commit {'b' * 40}"
    ]


def test_original_release_is_identified_by_its_commit(tmp_path, monkeypatch):
    """An original OpenFlamingo release holds only checkpoint.pt (no config.json): its commit still comes from the
    `main` ref the hub cache resolved."""
    from modeling_flamingo.evaluation import run_record

    repo = tmp_path / "hub" / "models--openflamingo--OpenFlamingo-3B-vitl-mpt1b"
    (repo / "snapshots" / ("c" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("c" * 40) / "checkpoint.pt").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    identity = run_record.model_identity("openflamingo/OpenFlamingo-3B-vitl-mpt1b")
    assert identity == {"repo": "openflamingo/OpenFlamingo-3B-vitl-mpt1b", "commit": "c" * 40}


def test_fresh_run_into_another_runs_predictions_is_refused(env, finished, tmp_path, capsys, no_model_load):
    """Without --resume, another run's record and predictions that this run would not replace are not mixed."""
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    results.unlink()  # only the predictions folder is left
    assert main(argv(folder, paths, results, "--shots", "0", "--query_set_size", "8")) == 1
    line = one_error_line(capsys)
    assert "--query_set_size 6, this run uses 8" in line and "coco-2shot-seed42.jsonl" in line


# ---------------------------------------------------------------------------------------------------------------
# item: Ctrl-C


def test_ctrl_c_says_what_is_saved_and_how_to_continue(env, tmp_path):
    root, folder, _, _ = env
    paths = {"coco": make_coco(tmp_path / "data", num_test=16)}
    results = tmp_path / "out" / "r.json"
    run_argv = argv(folder, paths, results, "--shots", "0", "--num_samples", "16", "--batch_size", "1")
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_flamingo.evaluation", *run_argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    stream = tmp_path / "out" / "r" / "predictions" / "coco-0shot-seed42.jsonl"
    while not (stream.is_file() and stream.read_text().count("\n") >= 1):
        try:
            process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the run ended before it was interrupted: {process.stderr.read()}")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    saved = stream.read_text().count("\n")
    assert 1 <= saved < 16
    lines = err.strip().splitlines()
    assert (
        lines[-2]
        == f"Interrupted: coco 0-shot seed 42: {saved} of 16 items saved in {stream} (earlier trials are complete). Continue with:"
    )
    command = shlex.split(lines[-1])
    assert command == [sys.executable, "-m", "modeling_flamingo.evaluation", *run_argv, "--resume"]
    assert not results.exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"coco 0-shot seed 42: reused {saved} of 16 items" in resumed.stdout

    reference = tmp_path / "reference.json"
    assert main(argv(folder, paths, reference, "--shots", "0", "--num_samples", "16", "--batch_size", "1")) == 0
    assert json.loads(results.read_text()) == json.loads(reference.read_text())
    assert stream.read_text() == (tmp_path / "reference" / "predictions" / "coco-0shot-seed42.jsonl").read_text()


def test_ctrl_c_before_any_trial(env, tmp_path, monkeypatch, capsys):
    root, folder, paths, _ = env

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FlamingoEvalModel, "from_pretrained", interrupted)
    assert main(argv(folder, paths, tmp_path / "r.json", "--shots", "0")) == 130
    err = capsys.readouterr().err
    assert err == "Interrupted before any trial started: this run saved no prediction.\n"


# ---------------------------------------------------------------------------------------------------------------
# item: a full disk


def _no_space_for(monkeypatch, name_part: str) -> None:
    """`os.fsync` fails with ENOSPC on the temporary files of outputs whose name holds `name_part`."""
    inner = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return inner(fd)

    monkeypatch.setattr(results_module.os, "fsync", fsync)


@pytest.mark.parametrize("which", [".r.json.", ".r.md."])
def test_full_disk_while_writing_results_keeps_the_earlier_results(
    env, finished, tmp_path, which, monkeypatch, capsys
):
    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    table = results.with_suffix(".md").read_text()
    _no_space_for(monkeypatch, which)
    assert main(argv(folder, paths, results, "--shots", "0", "2")) == 1
    line = one_error_line(capsys)
    assert line == f"error: cannot write {tmp_path / which[1:-1]}: No space left on device"
    assert results.read_text() == finished[1] and results.with_suffix(".md").read_text() == table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "r.json", "r.md"]  # no temporary file


def test_full_disk_while_streaming_predictions(env, finished, tmp_path, monkeypatch, capsys):
    from modeling_flamingo.evaluation import runner

    root, folder, paths, _ = env
    results = copy_run(finished, tmp_path)
    written = []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written.append(text)
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def streaming_open(path, mode="r", **kwargs):
        return Full(open(path, mode, **kwargs)) if "a" in mode else open(path, mode, **kwargs)

    monkeypatch.setattr(runner, "open", streaming_open, raising=False)
    assert main(argv(folder, paths, results, "--shots", "0")) == 1
    stream = tmp_path / "r" / "predictions" / "coco-0shot-seed42.jsonl"
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {stream}: No space left on device; the 2 items saved before")
    assert line.endswith("continue with --resume.")
    assert len(stream.read_text().splitlines()) == 2 and results.read_text() == finished[1]
    monkeypatch.undo()
    assert main(argv(folder, paths, results, "--shots", "0", "--resume")) == 0
    assert results.read_text() == finished[1]
