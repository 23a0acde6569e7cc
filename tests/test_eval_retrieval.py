"""`--rices`: demonstrations retrieved by CLIP image similarity (most similar last), features cached to a file."""

from __future__ import annotations

import json

import pytest
import torch
from eval_data import cli_flags, make_vqa, tiny_model_folder
from transformers import CLIPVisionModelWithProjection

from modeling_flamingo.evaluation.__main__ import build_parser, main
from modeling_flamingo.evaluation.rices import ClipImageEncoder
from modeling_flamingo.evaluation.tasks import TASKS
from modeling_flamingo.testing import tiny_vision_config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rices")
    folder, _, _ = tiny_model_folder(root)
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(tiny_vision_config())
    clip.save_pretrained(root / "tiny-clip")
    return root, folder, root / "tiny-clip", make_vqa(root / "data", "vizwiz")


@pytest.mark.parametrize("shots", [0, 3])
def test_rices_demonstrations_are_the_most_similar_last(env, shots):
    root, folder, clip, paths = env
    features_dir = root / f"features-{shots}"
    results_file = root / f"rices-{shots}.json"
    argv = ["--model", str(folder), "--eval_vizwiz", *cli_flags(paths), "--shots", str(shots), "--num_samples", "4"]
    argv += ["--batch_size", "3", "--rices", "--rices_vision_encoder_path", str(clip)]
    argv += ["--cached_demonstration_features", str(features_dir), "--results_file", str(results_file)]
    assert main(argv) == 0

    # Expected demonstrations computed here from the encoder directly: cosine similarity, top k, most similar last.
    loaded = TASKS["vizwiz"].load(build_parser().parse_args(["--model", "x", *cli_flags(paths)]))
    encoder = ClipImageEncoder(str(clip))
    train = encoder([item.load_image() for item in loaded.train])
    by_id = {item.id: item for item in loaded.test}
    records = [
        json.loads(line) for line in (root / f"rices-{shots}" / "predictions").glob("*.jsonl").__next__().open()
    ]
    k = max(shots, 2)
    for record in records:
        similarity = (encoder([by_id[record["id"]].load_image()]) @ train.T)[0]
        expected = [loaded.train[i].id for i in similarity.argsort(descending=True)[:k].tolist()[::-1]]
        assert record["demo_ids"] == [expected]
        assert similarity[[i.id for i in loaded.train].index(expected[-1])] == similarity.max()

    # The train features went to <dir>/vizwiz.pkl (the original's file name) and are read back, not recomputed.
    cached = features_dir / "vizwiz.pkl"
    features = torch.load(cached, weights_only=True)
    torch.testing.assert_close(features, train, atol=1e-5, rtol=0)
    stamp = cached.stat().st_mtime_ns
    assert main(argv) == 0
    assert cached.stat().st_mtime_ns == stamp


def test_cached_features_of_another_split_are_refused(env, capsys):
    root, folder, clip, paths = env
    features_dir = root / "wrong-features"
    features_dir.mkdir()
    torch.save(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1), features_dir / "vizwiz.pkl")
    argv = ["--model", str(folder), "--eval_vizwiz", *cli_flags(paths), "--shots", "2", "--num_samples", "2"]
    argv += ["--rices", "--rices_vision_encoder_path", str(clip), "--cached_demonstration_features", str(features_dir)]
    argv += ["--results_file", str(root / "wrong.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "vizwiz.pkl" in err and not (root / "wrong.json").exists()
