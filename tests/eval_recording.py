"""Recording what our harness and the original's compute, call by call, for the evaluation parity tests: the prompts,
the images (by their pixels) and the outputs of every generation or class-ranking call, and one CLI run of ours."""

from __future__ import annotations

import hashlib
import json

import torch
from eval_data import cli_flags

from modeling_flamingo.evaluation.__main__ import main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel

SEED = 7
COMMON = {"num_samples": 5, "query_set_size": 8, "batch_size": 2}


def _fingerprints(batch_images) -> list[list[str]]:
    """Identify each image by its pixels (the original's ImageNet loader drops file names when converting to RGB)."""
    return [[hashlib.sha1(image.convert("RGB").tobytes()).hexdigest() for image in images] for images in batch_images]


class Recorder:
    """Wraps a method to record (prompts, images) of each call and what it returned."""

    def __init__(self):
        self.calls = []

    def original_generation(self, eval_model):
        inner = eval_model.get_outputs

        def wrapped(batch_text, batch_images, **kwargs):
            out = inner(batch_text=batch_text, batch_images=batch_images, **kwargs)
            self.calls.append((batch_text, _fingerprints(batch_images), out))
            return out

        return wrapped

    def original_ranking(self, eval_model):
        inner = eval_model.get_rank_classifications

        def wrapped(batch_text, batch_images, *args, **kwargs):
            out = inner(batch_text, batch_images, *args, **kwargs)
            self.calls.append((batch_text, _fingerprints(batch_images), out))
            return out

        return wrapped


def _ours(monkeypatch, method: str, recorder: Recorder):
    inner = getattr(FlamingoEvalModel, method)

    def wrapped(self, batch_text, batch_images, *args, **kwargs):
        out = inner(self, batch_text, batch_images, *args, **kwargs)
        recorder.calls.append(
            (list(batch_text), _fingerprints([[i.load_image() for i in imgs] for imgs in batch_images]), out)
        )
        return out

    monkeypatch.setattr(FlamingoEvalModel, method, wrapped)


def run_ours(root, folder, task_flag, paths, shots, monkeypatch, method, extra=()):
    recorder = Recorder()
    _ours(monkeypatch, method, recorder)
    results_file = root / f"ours-{task_flag}-{shots}.json"
    argv = ["--model", str(folder), f"--{task_flag}", *cli_flags(paths), "--shots", str(shots)]
    argv += ["--trial_seeds", str(SEED), "--results_file", str(results_file)]
    argv += [f"--{k}={v}" for k, v in COMMON.items()] + list(extra)
    assert main(argv) == 0
    results = json.loads(results_file.read_text())
    (name,) = results
    return recorder, results[name][0]["trials"][0], results_file


def classification_rows(recorder: Recorder) -> tuple[list[tuple], torch.Tensor]:
    """Each ranked prompt (text, image fingerprints) in evaluation order, and its (N, C) class log-likelihoods."""
    prompts = [(text, tuple(images)) for call in recorder.calls for text, images in zip(call[0], call[1], strict=True)]
    return prompts, torch.cat([call[2].float() for call in recorder.calls])


def run_classification(root, folder, name, paths, shots, monkeypatch, run: str, extra: list[str]):
    """Our CLI on `paths` (own output folder `root / run`): (recorded prompts, (N, C) scores, predictions records)."""
    out = root / run
    out.mkdir()
    with monkeypatch.context() as m:
        recorder, _, results_file = run_ours(
            out, folder, f"eval_{name}", paths, shots, m, "rank_classifications", extra
        )
    (predictions,) = (results_file.with_suffix("") / "predictions").glob("*.jsonl")
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    return (*classification_rows(recorder), records)
