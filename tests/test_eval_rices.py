"""RICES (`modeling_flamingo.evaluation.rices`) against the original (`open_flamingo/eval/rices.py`) on a tiny open_clip
model converted to transformers' CLIP: same embeddings, same demonstration indices, cache files both can read."""

import importlib.util
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

from modeling_flamingo.evaluation import rices as ours
from modeling_flamingo.testing import tiny_vision_config

from reference import randomize_, tiny_open_clip


def _image(seed: int, size: tuple[int, int], mode: str = "RGB") -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "P":
        return image.quantize(16)
    return image.convert(mode)


# Several sizes (down- and up-scaling, portrait, landscape, odd crops) and modes.
QUERY_IMAGES = [
    _image(100, (64, 48)),
    _image(101, (30, 77), "L"),
    _image(102, (45, 45), "RGBA"),
    _image(103, (90, 20), "P"),
    _image(104, (41, 43)),
]


@pytest.fixture(scope="module")
def models():
    """(open_clip CLIP, its eval transform, our encoder on the same weights)."""
    vision_config = tiny_vision_config()
    clip = tiny_open_clip(0, vision_config)
    randomize_(clip.visual, 1)
    clip.eval()
    transform = open_clip.image_transform(vision_config.image_size, is_train=False)
    hf = CLIPVisionModelWithProjection(vision_config)
    hf.load_state_dict(ours.open_clip_to_hf_clip_vision(clip.state_dict()), strict=True)
    return clip, transform, ours.ClipImageEncoder(hf)


def _open_clip_embeddings(clip, transform, images) -> torch.Tensor:
    with torch.no_grad():
        features = clip.encode_image(torch.stack([transform(image) for image in images]))
    return features / features.norm(dim=-1, keepdim=True)


def test_embeddings_equal_open_clip(models):
    clip, transform, encoder = models
    expected = _open_clip_embeddings(clip, transform, QUERY_IMAGES)
    got = encoder(QUERY_IMAGES)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (len(QUERY_IMAGES), 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(QUERY_IMAGES)))
    assert not torch.allclose(got[0], got[1], atol=1e-2)  # distinct images, distinct embeddings
    assert encoder([]).shape == (0, 32)


def test_clip_model_and_saved_folders_give_the_same_embeddings(models, tmp_path):
    clip, transform, encoder = models
    expected = _open_clip_embeddings(clip, transform, QUERY_IMAGES)
    # A whole CLIPModel (random text tower) with the same image tower and projection.
    config = CLIPConfig(
        vision_config=encoder.model.config.to_dict(),
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=32,
    )
    full = CLIPModel(config)
    missing, unexpected = full.load_state_dict(encoder.model.state_dict(), strict=False)
    assert not unexpected and all(not key.startswith(("vision_model.", "visual_projection")) for key in missing)
    torch.testing.assert_close(ours.ClipImageEncoder(full)(QUERY_IMAGES), expected, atol=1e-5, rtol=0)
    # From folders: a CLIPVisionModelWithProjection and a CLIPModel checkpoint both load into the image half.
    encoder.model.save_pretrained(tmp_path / "vision")
    full.save_pretrained(tmp_path / "full")
    for folder in ("vision", "full"):
        loaded = ours.ClipImageEncoder(str(tmp_path / folder))
        torch.testing.assert_close(loaded(QUERY_IMAGES), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs a CLIPModel or CLIPVisionModelWithProjection"):
        ours.ClipImageEncoder(torch.nn.Linear(2, 2))


def test_converter_needs_the_projection(models):
    clip = models[0]
    state = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}
    with pytest.raises(ValueError, match="no `proj`"):
        ours.open_clip_to_hf_clip_vision(state)


class _Split:
    """A training split as the original's datasets give it: dicts with an image (and here its index)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "index": index}


def _train_images():
    images = [_image(i, (40 + 3 * i, 56 - 2 * i), "RGB" if i % 3 else "L") for i in range(10)]
    # Exact duplicates make exactly tied similarities: the tie order must be the original's.
    return images + [images[2], images[5], images[2]]


@pytest.fixture
def original_rices_class(monkeypatch):
    """open_flamingo/eval/rices.py imports `utils` as a top-level module (it runs from its own folder)."""
    import open_flamingo.eval.utils as eval_utils

    monkeypatch.setitem(sys.modules, "utils", eval_utils)
    path = Path(eval_utils.__file__).with_name("rices.py")
    spec = importlib.util.spec_from_file_location("_original_rices", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RICES


def test_find_picks_the_original_demonstrations(models, original_rices_class):
    clip, transform, encoder = models
    train = _train_images()
    with mock.patch.object(open_clip, "create_model_and_transforms", lambda *a, **k: (clip, None, transform)):
        original = original_rices_class(_Split(train), "cpu", 4, vision_encoder_path="tiny", cached_features=None)
    rices = ours.RICES.from_images(train, encoder, batch_size=4, desc="test")
    assert len(rices) == len(train)
    torch.testing.assert_close(rices.features, original.features, atol=1e-5, rtol=0)

    # Our pipeline (our features, our query embeddings) picks what the original picks.
    for k in (1, 2, 4):
        expected = [[int(item["index"]) for item in row] for row in original.find(QUERY_IMAGES, k)]
        assert rices.find(QUERY_IMAGES, k) == expected, k

    # Same features and query embeddings: the same indices for every k, most similar last, exact ties included
    # (duplicated rows; batching makes the computed duplicates differ in the last bits, so they are copied).
    tied = original.features.clone()
    tied[10] = tied[12] = tied[2]
    tied[11] = tied[5]
    original.features = tied
    same = ours.RICES(tied)
    queries = QUERY_IMAGES + [train[2], train[5]]
    query_embeddings = _open_clip_embeddings(clip, transform, queries)  # what original.find computes
    for k in (1, 2, 3, 4, len(train)):
        expected = [[int(item["index"]) for item in row] for row in original.find(queries, k)]
        assert same.find(query_embeddings, k) == expected, k
    assert same.find(encoder(queries), 3) == same.find(queries, 3, encoder=encoder)
    # The query image itself (and its duplicates) come last: the most similar.
    assert set(rices.find([train[2]], 3)[0]) == {2, 10, 12}
    assert rices.find([train[7]], 2)[0][-1] == 7
    assert rices.find(queries, 0) == [[] for _ in queries]


def test_find_rejects_bad_requests(models):
    encoder = models[2]
    rices = ours.RICES(encoder(QUERY_IMAGES))
    with pytest.raises(ValueError, match="between 0 and 5"):
        rices.find(QUERY_IMAGES, 6, encoder=encoder)
    with pytest.raises(ValueError, match="needs an encoder"):
        rices.find(QUERY_IMAGES, 1)
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        rices.find(torch.randn(2, 7), 1)
    with pytest.raises(ValueError, match="NaN"):
        ours.RICES(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        ours.RICES(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        ours.RICES(torch.ones(0, 3))


def test_cache_file_written_atomically_and_read_back(models, tmp_path, monkeypatch):
    encoder = models[2]
    train = _train_images()
    cache = tmp_path / "cache" / "coco.pkl"
    computed = ours.RICES.from_images(train, encoder, batch_size=5, cache_file=cache)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["coco.pkl"]
    torch.testing.assert_close(torch.load(cache, weights_only=True), computed.features, rtol=0, atol=0)

    # Read back without embedding anything.
    def no_embedding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(ours.ClipImageEncoder, "__call__", no_embedding)
    loaded = ours.RICES.from_images(train, encoder, cache_file=cache)
    torch.testing.assert_close(loaded.features, computed.features, rtol=0, atol=0)


def test_reads_the_original_cache_format(models, original_rices_class, tmp_path, monkeypatch):
    """cache_rices_features.py does `torch.save(rices.features, "<dataset>.pkl")`, often from the GPU."""
    clip, transform, encoder = models
    train = _train_images()
    with mock.patch.object(open_clip, "create_model_and_transforms", lambda *a, **k: (clip, None, transform)):
        original = original_rices_class(_Split(train), "cpu", 8, vision_encoder_path="tiny")
    torch.save(original.features, tmp_path / "flickr30.pkl")
    rices = ours.RICES.from_images(train, encoder, cache_file=tmp_path / "flickr30.pkl")
    torch.testing.assert_close(rices.features, original.features, rtol=0, atol=0)
    # And the original reads ours (evaluate.py: torch.load(..., map_location="cpu")).
    ours.RICES.from_images(train, encoder, cache_file=tmp_path / "ours.pkl")
    back = torch.load(tmp_path / "ours.pkl", map_location="cpu")
    assert isinstance(back, torch.Tensor) and back.shape == (len(train), 32)


def test_bad_cache_files_are_refused_and_kept(models, tmp_path):
    encoder = models[2]
    train = _train_images()
    stale = tmp_path / "stale.pkl"
    torch.save(torch.randn(4, 32), stale)
    with pytest.raises(ValueError, match="has shape \\(4, 32\\), but there are 13 training images"):
        ours.RICES.from_images(train, encoder, cache_file=stale)
    wrong_dim = tmp_path / "dim.pkl"
    torch.save(torch.randn(13, 8), wrong_dim)
    with pytest.raises(ValueError, match="8-dimensional features, but the encoder gives 32"):
        ours.RICES.from_images(train, encoder, cache_file=wrong_dim)
    a_dict = tmp_path / "dict.pkl"
    torch.save({"features": torch.randn(13, 32)}, a_dict)
    with pytest.raises(ValueError, match="holds a dict, not a tensor"):
        ours.RICES.from_images(train, encoder, cache_file=a_dict)
    pickle = tmp_path / "pickle.pkl"
    torch.save(_Split([1]), pickle)  # an arbitrary object: never unpickled
    with pytest.raises(ValueError, match="could not be read as a tensor file"):
        ours.RICES.from_images(train, encoder, cache_file=pickle)
    for path in (stale, wrong_dim, a_dict, pickle):
        assert path.exists()  # nothing deleted or overwritten


def test_failed_computation_leaves_no_file(models, tmp_path):
    encoder = models[2]

    class Broken(list):
        def __getitem__(self, index):
            if index == 7:
                raise OSError("image 7 is unreadable")
            return super().__getitem__(index)

    with pytest.raises(OSError, match="unreadable"):
        ours.RICES.from_images(Broken(_train_images()), encoder, batch_size=4, cache_file=tmp_path / "f.pkl")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="batch_size"):
        ours.RICES.from_images(_train_images(), encoder, batch_size=0)


def test_cli_writes_features(models, tmp_path, capsys):
    encoder = models[2]
    encoder.model.save_pretrained(tmp_path / "clip")
    train = _train_images()[:6]
    paths = []
    for i, image in enumerate(train):
        paths.append(tmp_path / f"img{i}.png")
        image.save(paths[-1])
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    out = tmp_path / "features.pkl"
    argv = ["--images", str(listing), "--output", str(out), "--model", str(tmp_path / "clip"), "--device", "cpu"]
    assert ours.main(argv + ["--batch-size", "4"]) == 0
    expected = encoder([PIL.Image.open(p) for p in paths])
    torch.testing.assert_close(torch.load(out, weights_only=True), expected, atol=1e-6, rtol=0)
    assert "features of shape (6, 32)" in capsys.readouterr().out

    assert ours.main(argv) == 2  # the output exists: not overwritten
    assert capsys.readouterr().err.startswith("error: ") and out.exists()
    listing.write_text(str(tmp_path / "missing.png"))
    assert ours.main(argv[:3] + [str(tmp_path / "new.pkl")] + argv[4:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not exist" in err and not (tmp_path / "new.pkl").exists()


def test_tie_order_on_many_duplicates_is_the_originals(original_rices_class):
    """With many exact ties torch's (unstable) CPU argsort does not keep index order; ours makes the same call."""
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(13, 16), dim=-1)
    features = torch.cat([base] * 40)  # every row 40 times
    queries = torch.nn.functional.normalize(base[[2, 5, 7]] + 0.3 * torch.randn(3, 16), dim=-1)

    class Identity(torch.nn.Module):
        def encode_image(self, x):
            return x.clone()

    original = original_rices_class.__new__(original_rices_class)
    original.features, original.model, original.image_processor = features, Identity(), lambda x: x
    original.device, original.dataset = "cpu", list(range(len(features)))
    rices = ours.RICES(features)
    for k in (1, 5, 40, 41, 100):
        expected = [[int(i) for i in row] for row in original.find(list(queries), k)]
        assert rices.find(queries, k) == expected, k
    top = rices.find(queries, 40)
    assert any(row != sorted(row, reverse=True) for row in top)  # ties are not in index order: the test has teeth


def test_encoder_in_bfloat16_returns_float32(models, tmp_path):
    clip, transform, encoder = models
    encoder.model.save_pretrained(tmp_path / "clip")
    half = ours.ClipImageEncoder(str(tmp_path / "clip"), device="cpu", dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    got = half(QUERY_IMAGES)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, _open_clip_embeddings(clip, transform, QUERY_IMAGES), atol=5e-2, rtol=0)
