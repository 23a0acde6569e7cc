"""Evaluation flags that change speed and memory, not what is computed: `--latents_cache_mb`."""

from __future__ import annotations

import json

from eval_data import cli_flags, make_coco, tiny_model_folder

from modeling_flamingo.evaluation.__main__ import main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel


def test_latents_cache_smaller_than_query_set_gives_same_predictions(tmp_path, monkeypatch):
    """A tiny image's latents take 16 KB, so 1 MB holds the whole tiny query set: for the small run the test turns
    `--latents_cache_mb 1` into room for 3 images, which evicts and re-encodes demonstrations across batches."""
    folder, _, _ = tiny_model_folder(tmp_path)
    paths = make_coco(tmp_path / "data")
    models, small_bytes = [], []
    init = FlamingoEvalModel.__init__

    def recording_init(self, model, processor, latents_cache_bytes=2 << 30, **kwargs):
        if small_bytes:
            latents_cache_bytes = small_bytes[0]
        init(self, model, processor, latents_cache_bytes=latents_cache_bytes, **kwargs)
        models.append(self)

    monkeypatch.setattr(FlamingoEvalModel, "__init__", recording_init)
    predictions = []
    for run, cache_mb in (("large", 2048), ("small", 1)):
        if run == "small":
            latent = models[0].cache._entries[next(iter(models[0].cache._entries))]
            small_bytes.append(3 * latent.numel() * latent.element_size())
        results_file = tmp_path / f"{run}.json"
        argv = ["--model", str(folder), "--eval_coco", *cli_flags(paths), "--shots", "4", "--num_samples", "6"]
        argv += ["--query_set_size", "10", "--batch_size", "2", "--latents_cache_mb", str(cache_mb)]
        assert main(argv + ["--results_file", str(results_file)]) == 0
        (stream,) = (tmp_path / run / "predictions").glob("*.jsonl")
        predictions.append([(r["id"], r["prediction"]) for r in map(json.loads, stream.open())])
    large, small = models
    assert len(small.cache) <= 3 < len(large.cache)
    assert small.cache.misses > large.cache.misses  # evicted latents were encoded again
    assert predictions[0] == predictions[1] and any(p for _, p in predictions[0])
