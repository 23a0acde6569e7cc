"""`--resume` after an interruption, and the image-latents cache: neither may change a prediction or a score."""

from __future__ import annotations

import json

import pytest
import torch
from eval_data import cli_flags, make_coco, tiny_model_folder

from modeling_flamingo.evaluation.__main__ import build_parser, main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel
from modeling_flamingo.evaluation.runner import run_evaluation


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    folder, _, _ = tiny_model_folder(root)
    return root, folder, make_coco(root / "data")


def argv(folder, paths, results_file, *extra):
    base = ["--model", str(folder), "--eval_coco", *cli_flags(paths), "--shots", "2", "--num_samples", "6"]
    return base + ["--batch_size", "2", "--query_set_size", "8", "--results_file", str(results_file), *extra]


def test_interrupted_run_resumes_where_it_stopped(env, tmp_path, monkeypatch):
    root, folder, paths = env
    reference = tmp_path / "reference.json"
    assert main(argv(folder, paths, reference)) == 0

    generated = []
    inner = FlamingoEvalModel.generate

    def interrupted_on_third_batch(self, batch_text, *args, **kwargs):
        if len(generated) == 2:
            raise KeyboardInterrupt
        generated.append(len(batch_text))
        return inner(self, batch_text, *args, **kwargs)

    resumed = tmp_path / "resumed.json"
    monkeypatch.setattr(FlamingoEvalModel, "generate", interrupted_on_third_batch)
    assert main(argv(folder, paths, resumed)) == 130  # Ctrl-C: no traceback, exit status 130
    assert not resumed.exists()  # no score was claimed
    stream = tmp_path / "resumed" / "predictions" / "coco-2shot-seed42.jsonl"
    with open(stream, "a") as f:
        f.write('{"id": 12')  # a line cut by the interruption
    assert len(stream.read_text().splitlines()) == 5

    generated.clear()

    def counting(self, batch_text, *args, **kwargs):
        generated.append(len(batch_text))
        return inner(self, batch_text, *args, **kwargs)

    monkeypatch.setattr(FlamingoEvalModel, "generate", counting)
    assert main(argv(folder, paths, resumed, "--resume")) == 0
    assert generated == [2]  # only the third batch was computed
    assert json.loads(resumed.read_text()) == json.loads(reference.read_text())
    ours = (tmp_path / "resumed" / "predictions" / "coco-2shot-seed42.jsonl").read_text()
    assert ours == (tmp_path / "reference" / "predictions" / "coco-2shot-seed42.jsonl").read_text()


def test_resume_refuses_predictions_of_other_settings(env, tmp_path, capsys):
    root, folder, paths = env
    results = tmp_path / "r.json"
    assert main(argv(folder, paths, results)) == 0
    assert main(argv(folder, paths, results, "--resume", "--query_set_size", "9")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume:") and "different settings" in err


def _count_encoded_images(eval_model: FlamingoEvalModel) -> list[int]:
    counts = []
    inner = eval_model.model.get_image_features

    def counting(pixel_values):
        counts.append(pixel_values.shape[0] * pixel_values.shape[1])
        return inner(pixel_values)

    eval_model.model.get_image_features = counting
    return counts


def test_each_image_is_encoded_once_per_run(env, tmp_path):
    """Two trials at two shot counts reuse query-set images many times; each goes through the vision tower and the
    resampler once. Without the cache (0 MB) every use is encoded again, and nothing else changes."""
    root, folder, paths = env
    runs = {}
    for name, cache_mb in (("cached", 2048), ("uncached", 0)):
        results = tmp_path / f"{name}.json"
        args = build_parser().parse_args(
            argv(folder, paths, results, "--shots", "2", "4", "--num_trials", "2", "--trial_seeds", "1", "2")
        )
        eval_model = FlamingoEvalModel.from_pretrained(str(folder), latents_cache_bytes=cache_mb << 20)
        counts = _count_encoded_images(eval_model)
        run_evaluation(args, eval_model)
        predictions = {}
        used = set()
        test_paths = {item.id: item.image_path for item in _coco(args).test}
        train_paths = {item.id: item.image_path for item in _coco(args).train}
        for file in sorted((tmp_path / name / "predictions").glob("*.jsonl")):
            records = [json.loads(line) for line in file.read_text().splitlines()]
            predictions[file.name] = [r["prediction"] for r in records]
            for r in records:
                used.add(test_paths[r["id"]])
                used.update(train_paths[d] for d in r["demo_ids"][0])
        runs[name] = (sum(counts), len(used), predictions, json.loads(results.read_text()))
    encoded, distinct, predictions, results = runs["cached"]
    assert encoded == distinct
    assert runs["uncached"][0] > 2 * distinct
    assert runs["uncached"][2] == predictions and runs["uncached"][3] == results


def _coco(args):
    from modeling_flamingo.evaluation.tasks import TASKS

    return TASKS["coco"].load(args)


def test_latents_cache_is_bounded():
    from modeling_flamingo.evaluation.eval_model import LatentsCache

    cache = LatentsCache(max_bytes=3 * 4 * 16)
    for i in range(5):
        cache.put(str(i), torch.full((4, 4), float(i)))
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.get("0") is None and torch.equal(cache.get("4"), torch.full((4, 4), 4.0))
