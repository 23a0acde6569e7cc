"""ImageNet classification with all 1,000 class names, as users run it, compared per item and class.

Our CLI ranks the full `IMAGENET_CLASSNAMES` for 2 test items (1 shot, so the prompts differ in length and the batch
is left-padded) in four ways: cached context at batch 8 with the default `--class_batch_size` (64 rows: 32 names of
one token length per forward), cached with all names of a length in one forward (`--class_batch_size=8000`), uncached
at batch 8 (32 names per forward, in list order), and cached at batch 1 (64 names per forward). Every class
log-likelihood of every item must agree (1e-4) across the four runs, the two duplicated names must score alike
wherever they stand, and the predictions files must report the best five of the scores.

The original's `get_rank_classifications` takes about 0.1 s of CPU per class name and batch here (one full forward,
vision tower included, per name), so all 1,000 names would take minutes: on the same prompts and images (batch of
2, uncached path, as in `test_eval_classification_parity.py`), it ranks `ORIGINAL_SLICE`, the names most likely to
expose a bug: the longest in tokens, names that are token prefixes of others or share a long prefix, the two
duplicated names, the first and last names, and those on either side of the uncached run's forward boundaries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from eval_data import make_imagenet, tiny_model_folder
from eval_recording import run_classification
from PIL import Image
from reference_eval import OriginalEvalModel

from modeling_flamingo.evaluation.classnames import IMAGENET_CLASSNAMES

NUM_ITEMS = 2
TOL = dict(atol=1e-4, rtol=0)
NAMES = list(IMAGENET_CLASSNAMES)


def _indices(*names: str) -> list[int]:
    """Every index of each name (a duplicated name has two)."""
    found = [i for i, n in enumerate(NAMES) if n in names]
    assert {NAMES[i] for i in found} == set(names)
    return found


ORIGINAL_SLICE = sorted(
    {
        # the longest names in tokens of the tiny tokenizer (26 to 31 byte-level tokens)
        *_indices("Mexican hairless dog (xoloitzcuintli)", "desert grassland whiptail lizard"),
        *_indices("eastern diamondback rattlesnake", "military hat (bearskin or shako)"),
        # names whose tokens begin another name's, and names sharing a long prefix
        *_indices("tiger", "tiger shark", "tiger cat", "tiger beetle", "chain", "chain-link fence", "chain mail"),
        *_indices("chainsaw", "American robin", "American alligator", "American Staffordshire Terrier"),
        # the list's two duplicated names (four indices)
        *_indices("missile", "sunglasses"),
        # first and last names, and both sides of list-order chunk boundaries (32 names per forward at batch 2, the
        # uncached run's; 64 at batch 1)
        *(0, 31, 32, 63, 64, 959, 960, 991, 992, 999),
    }
)


def _images_by_fingerprint(root: Path) -> dict[str, Image.Image]:
    """Every image of the ImageFolder tree, RGB, by the fingerprint `eval_recording` records (sha1 of the pixels)."""
    images = {}
    for path in root.rglob("*.JPEG"):
        image = Image.open(path).convert("RGB")
        images[hashlib.sha1(image.tobytes()).hexdigest()] = image
    return images


def test_all_imagenet_class_names_cached_uncached_batched_chunked_and_original(tmp_path, monkeypatch):
    folder, original, tokenizer = tiny_model_folder(tmp_path)
    paths = make_imagenet(tmp_path / "data")
    common = ["--num_samples", str(NUM_ITEMS), "--query_set_size", "9", "--batch_size=8"]
    runs = {
        "cached, one chunk": ["--class_batch_size=8000"],
        "cached, default chunks": [],
        "uncached, default chunks": ["--no_caching_for_classification"],
        "cached, batch 1": ["--batch_size=1"],
    }
    ours = {
        run: run_classification(
            tmp_path, folder, "imagenet", paths, 1, monkeypatch, run.replace(", ", "-").replace(" ", "_"), common + x
        )
        for run, x in runs.items()
    }
    prompts, expected, _ = ours["cached, one chunk"]
    assert expected.shape == (NUM_ITEMS, 1000)
    lengths = {len(tokenizer(text)["input_ids"]) for text, _ in prompts}
    assert len(lengths) > 1  # left padding in the batch of 2
    for run, (our_prompts, scores, records) in ours.items():
        assert our_prompts == prompts, run
        torch.testing.assert_close(scores, expected, **TOL, msg=lambda m, run=run: f"{run}: {m}")
        for record, row in zip(records, scores, strict=True):
            top = torch.topk(row, k=5)
            assert [c for c, _ in record["top_classes"]] == [NAMES[i] for i in top.indices], run
            torch.testing.assert_close(torch.tensor([v for _, v in record["top_classes"]]), top.values, **TOL)
    # A duplicated name scores the same wherever it stands in the list (different chunks in the chunked runs).
    for name in ("missile", "sunglasses"):
        first, second = _indices(name)
        torch.testing.assert_close(expected[:, first], expected[:, second], **TOL)

    images = _images_by_fingerprint(Path(paths["imagenet_root"]))
    theirs = OriginalEvalModel(original, tokenizer, image_size=42).get_rank_classifications(
        [text for text, _ in prompts],
        [[images[fingerprint] for fingerprint in fingerprints] for _, fingerprints in prompts],
        [NAMES[i] for i in ORIGINAL_SLICE],
        use_cache=False,
        normalize_length=True,
    )
    torch.testing.assert_close(expected[:, ORIGINAL_SLICE], theirs.float(), **TOL)
