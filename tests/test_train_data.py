"""Training data (modeling_flamingo.training.data): parity with the original's `open_flamingo.train.data`
pipelines on tiny shards, bad data skipped and counted, errors at start, determinism, and the collator."""

from __future__ import annotations

import dataclasses
import importlib
import io
import itertools
import json
import os
import random
import resource
import sys
import tarfile
import time
from collections import Counter
from types import SimpleNamespace
from unittest import mock

import open_clip
import PIL.Image
import pytest
import torch
from train_data_helpers import (
    image_bytes,
    make_laion_shards,
    make_mmc4_shards,
    mmc4_document,
    png_declaring,
    random_mmc4_document,
    sentence,
    write_laion_shard,
    write_mmc4_shard,
)

from modeling_flamingo.processing import FlamingoImageProcessor
from modeling_flamingo.testing import add_flamingo_tokens, make_tiny_tokenizer
from modeling_flamingo.training import data as ours
from modeling_flamingo.training.data import pipeline as ours_pipeline
from modeling_flamingo.training.data import shards as ours_shards

from reference import original_label_masking
from train_helpers import train_args

IMAGE_SIZE = 42


@pytest.fixture(scope="module")
def original():
    """The installed original `open_flamingo.train.data` (it imports its sibling as the top-level `data_utils`)."""
    sys.modules.setdefault("data_utils", importlib.import_module("open_flamingo.train.data_utils"))
    return importlib.import_module("open_flamingo.train.data")


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = add_flamingo_tokens(make_tiny_tokenizer())
    # The original reads the ids through the transformers 4 attributes, which transformers 5 tokenizers lack.
    tokenizer.additional_special_tokens = ["<|endofchunk|>", "<image>"]
    tokenizer.additional_special_tokens_ids = tokenizer.convert_tokens_to_ids(tokenizer.additional_special_tokens)
    return tokenizer


@pytest.fixture(scope="module")
def image_processor():
    return FlamingoImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def open_clip_transform():
    return open_clip.image_transform(IMAGE_SIZE, is_train=False)


def _original_labels(input_ids, tokenizer, interleaved):
    media, eoc = tokenizer.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    return original_label_masking(input_ids, tokenizer.pad_token_id, media, eoc, interleaved=interleaved)


def _run_original(original, kind, args, tokenizer, transform, *, epoch, rank=0, world_size=1, worker=0, drop_rng=None):
    """The batches one worker of the original pipeline yields in an epoch, its sample shuffle and flips disabled
    (they are unseeded there), as the original training loop reshapes them."""
    environment = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "WORKER": str(worker)}
    environment["NUM_WORKERS"] = str(max(1, args.workers))
    args.world_size = world_size
    build = original.get_laion_dataset if kind == "laion" else original.get_mmc4_dataset
    with (
        mock.patch.object(original.wds, "shuffle", lambda **kwargs: lambda source: source),
        mock.patch.object(original.torchvision.transforms, "RandomHorizontalFlip", lambda p: lambda x: x),
        mock.patch.object(original.wds, "WebLoader", lambda dataset, **kwargs: SimpleNamespace(dataset=dataset)),
        mock.patch.object(original, "random", drop_rng or random.Random(0)),
        mock.patch.dict(os.environ, environment),
    ):
        info = build(args, image_processor=transform, tokenizer=tokenizer, epoch=epoch)
        raw = list(info.dataloader.dataset)
    batches = []
    for images, text in raw:
        if kind == "laion":
            input_ids, attention_mask = text
            pixel_values = images[:, None, None]
        else:
            input_ids = torch.stack([ids for ids, _ in text]).squeeze(1)
            attention_mask = torch.stack([mask for _, mask in text]).squeeze(1)
            pixel_values = images[:, :, None]
        labels = _original_labels(input_ids, tokenizer, interleaved=kind == "mmc4")
        batches.append((pixel_values, input_ids, attention_mask, labels))
    return batches, info.dataloader.num_batches


def _run_ours(loader, worker=0, num_workers=1):
    """Our batches of one worker, run in this process as worker `worker` of `num_workers`."""
    info = SimpleNamespace(id=worker, num_workers=num_workers)
    with mock.patch.object(ours_pipeline, "get_worker_info", lambda: info):
        return list(loader.dataloader.dataset)


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected) > 0
    for batch, (pixel_values, input_ids, attention_mask, labels) in zip(actual, expected, strict=True):
        assert torch.equal(batch["input_ids"], input_ids)
        assert torch.equal(batch["attention_mask"], attention_mask)
        assert torch.equal(batch["labels"], labels)
        assert batch["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(batch["pixel_values"], pixel_values, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# LAION


@pytest.mark.parametrize(("rank", "world_size", "worker", "workers", "epoch"), [(0, 1, 0, 1, 0), (1, 2, 1, 2, 3)])
def test_laion_batches_match_the_original(
    tmp_path, original, tokenizer, image_processor, open_clip_transform, rank, world_size, worker, workers, epoch
):
    # 8 shards (JPEG and PNG): the seeded shard shuffle and the rank/worker split decide which samples a worker
    # sees; 9 batches of 3 per worker need more than its 2 shards of 5 samples, so it cycles through them again.
    pattern = make_laion_shards(tmp_path, num_shards=8, samples_per_shard=5)
    batch_size, num_samples = 3, 9 * 3 * world_size * workers
    args = SimpleNamespace(
        laion_shards=pattern,
        train_num_samples_laion=num_samples,
        batch_size_laion=batch_size,
        seed=7,
        workers=workers,
        dataset_resampled=False,
    )
    expected, original_num_batches = _run_original(
        original,
        "laion",
        args,
        tokenizer,
        open_clip_transform,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        worker=worker,
    )
    loader = ours.build_laion_loader(
        pattern,
        tokenizer=tokenizer,
        image_processor=image_processor,
        batch_size=batch_size,
        num_samples=num_samples,
        workers=workers,
        seed=7,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        flip=False,
        shuffle_buffer=1,
    )
    assert loader.num_batches == original_num_batches == 9 * workers
    assert loader.num_samples == num_samples
    actual = _run_ours(loader, worker, workers)
    _assert_same_batches(actual, expected)
    assert all(batch["skipped"] == {} for batch in actual)
    # Captions longer than 32 tokens are cut, shorter ones padded on the right to the batch's longest.
    lengths = {batch["input_ids"].shape[1] for batch in actual}
    assert 32 in lengths and min(lengths) < 32
    assert any((batch["input_ids"] == tokenizer.pad_token_id).any() for batch in actual)


def test_laion_preprocessing_matches_the_original_on_odd_captions(
    original, tokenizer, image_processor, open_clip_transform
):
    # The text template and the image path, sample by sample: stray whitespace, an empty caption, a caption with a
    # newline, one far over 32 tokens; JPEG and PNG images through open_clip's transform.
    images = [ours.decode_rgb_image(image_bytes(seed, fmt=fmt)) for seed, fmt in enumerate(["JPEG", "PNG"] * 2)]
    captions = ["  spaces around  ", "", "two\nlines", " ".join(sentence(seed, 12) for seed in range(4))]
    tokens = ours.check_flamingo_tokenizer(tokenizer)
    batch = ours.preprocess_laion_batch(
        images, captions, tokenizer=tokenizer, image_processor=image_processor, tokens=tokens
    )
    input_ids, attention_mask = original.preprocess_laion_text(captions, tokenizer)
    assert torch.equal(batch["input_ids"], input_ids)
    assert torch.equal(batch["attention_mask"], attention_mask)
    assert batch["input_ids"].shape == (4, 32)
    with mock.patch.object(original.torchvision.transforms, "RandomHorizontalFlip", lambda p: lambda x: x):
        pixel_values = original.preprocess_image(images, open_clip_transform)
    torch.testing.assert_close(batch["pixel_values"][:, 0, 0], pixel_values, atol=1e-5, rtol=0)
    # Any callable mapping a PIL image to a (3, H, W) tensor serves as image processor too.
    torch.testing.assert_close(ours.pixel_values_of(images, open_clip_transform), pixel_values, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad data: skipped and counted, never silently


def _totals(batches) -> dict[str, int]:
    totals: dict[str, int] = {}
    for batch in batches:
        for reason, count in batch["skipped"].items():
            totals[reason] = totals.get(reason, 0) + count
    return totals


def test_laion_bad_data_is_skipped_and_counted(tmp_path, tokenizer, image_processor):
    good = [(image_bytes(seed, width=48, height=40), f"good {seed}") for seed in range(6)]
    bad = [
        (b"\xff\xd8\xff\xe0 not really a jpeg", "undecodable"),
        (None, "no image"),
        (image_bytes(50, width=48, height=40), None),
        (image_bytes(51, width=48, height=40), b"\xff\xfe invalid utf-8"),
    ]
    write_laion_shard(tmp_path / "bad-0.tar", good[:3] + bad)
    # A shard cut in the middle of the image of its second sample: the first sample survives, the rest is lost.
    whole = write_laion_shard(tmp_path / "bad-1.tar", good[3:], first_key=100)
    with tarfile.open(whole) as archive:
        second_image = archive.getmembers()[3]
    assert second_image.name == "00101.jpg"
    whole.write_bytes(whole.read_bytes()[: second_image.offset_data + second_image.size // 2])
    # In order (no sample shuffle); 5 batches of 1: the 4 good samples, then the first of the second pass, which
    # carries the counts of whatever the first pass skipped after its last batch.
    loader = ours.build_laion_loader(
        str(tmp_path / "bad-{0..1}.tar"),
        tokenizer=tokenizer,
        image_processor=image_processor,
        batch_size=1,
        num_samples=5,
        workers=0,
        flip=False,
        shuffle_buffer=1,
    )
    batches = list(loader.dataloader)
    assert len(batches) == loader.num_batches == 5
    totals = _totals(batches)
    assert totals["undecodable_image"] == 1
    assert totals["incomplete_sample"] == 2
    assert totals["undecodable_text"] == 1
    assert totals["corrupt_tar"] == 1
    captions = [tokenizer.decode(batch["input_ids"][0]) for batch in batches]
    assert sorted(captions[:4]) == [f"<image>good {seed}<|endofchunk|><|endoftext|>" for seed in range(4)]
    assert captions[4] == captions[0]


@pytest.mark.parametrize(
    ("damage", "survivors", "reason"),
    [
        ("none", 4, None),
        ("truncated inside a member", 3, "corrupt_tar"),
        ("garbled header", 1, "corrupt_tar"),
        ("no end-of-archive marker", 2, "corrupt_tar"),
        ("not a tar", 0, "corrupt_tar"),
        ("missing", 0, "unreadable_shard"),
    ],
)
def test_broken_shards_keep_what_they_can_and_count(tmp_path, damage, survivors, reason):
    from collections import Counter

    path = write_laion_shard(tmp_path / "shard.tar", [(image_bytes(seed, width=32), f"c{seed}") for seed in range(4)])
    data = path.read_bytes()
    with tarfile.open(path) as archive:
        members = archive.getmembers()  # 3 per sample: jpg, txt, json
    if damage == "truncated inside a member":  # the third sample's caption: the sample comes with its image only
        data = data[: members[7].offset_data + 1]
    elif damage == "garbled header":  # the second sample's image header
        data = data[: members[3].offset] + bytes(range(256)) * 2 + data[members[3].offset + 512 :]
    elif damage == "no end-of-archive marker":
        data = data[: members[6].offset]
    elif damage == "not a tar":
        data = b"<html>404</html>" * 64
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data)
    skipped = Counter()
    samples = list(ours.iter_tar_samples(str(path), skipped))
    assert [sample["__key__"] for sample in samples] == [f"{key:05d}" for key in range(survivors)]
    assert skipped == (Counter({reason: 1}) if reason else Counter())
    if damage == "truncated inside a member":
        assert "txt" not in samples[-1]


# ---------------------------------------------------------------------------------------------------------------
# One clear error at start


def test_epoch_size_is_rounded_up_as_the_original_does_and_said(
    tmp_path, original, tokenizer, image_processor, caplog
):
    pattern = make_laion_shards(tmp_path, num_shards=4, samples_per_shard=2)
    options = dict(tokenizer=tokenizer, image_processor=image_processor, batch_size=3, world_size=2, workers=2)
    with caplog.at_level("WARNING", logger=ours.__name__):
        loader = ours.build_laion_loader(pattern, num_samples=13, **options)
    # ceil(13 / (3 x 2)) = 3 batches, rounded up to 4 for 2 workers: 24 samples per epoch.
    assert (loader.num_batches, loader.num_samples, len(loader)) == (4, 24, 4)
    args = SimpleNamespace(
        laion_shards=pattern, train_num_samples_laion=13, batch_size_laion=3, workers=2, world_size=2, seed=0
    )
    with mock.patch.object(original.wds, "WebLoader", lambda dataset, **kwargs: SimpleNamespace(dataset=dataset)):
        info = original.get_laion_dataset(args, image_processor=None, tokenizer=tokenizer)
    assert (info.dataloader.num_batches, info.dataloader.num_samples) == (4, 24)
    assert (
        "num_samples=13 is not a multiple of batch_size 3 x 2 processes x 2 workers: an epoch takes 24" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger=ours.__name__):
        assert ours.build_laion_loader(pattern, num_samples=24, **options).num_samples == 24
    assert caplog.text == ""


def test_errors_at_start(tmp_path, tokenizer, image_processor):
    pattern = make_laion_shards(tmp_path / "laion", num_shards=2, samples_per_shard=2)
    build = dict(tokenizer=tokenizer, image_processor=image_processor, batch_size=2, num_samples=4, workers=0)
    with pytest.raises(ValueError, match="matches no file"):
        ours.build_laion_loader(str(tmp_path / "nowhere" / "*.tar"), **build)
    with pytest.raises(ValueError, match=r"1 of the 3 shards .* do not exist, e\.g\. .*laion-00002\.tar"):
        ours.build_laion_loader(pattern.replace("00001}", "00002}"), **build)
    with pytest.raises(ValueError, match="no <image> token"):
        ours.build_laion_loader(pattern, **{**build, "tokenizer": make_tiny_tokenizer()})
    with pytest.raises(ValueError, match="2 shards cannot feed 2 workers x 2 processes"):
        ours.build_laion_loader(pattern, **{**build, "workers": 2}, world_size=2)
    with pytest.raises(ValueError, match="batch_size and num_samples must be positive"):
        ours.build_laion_loader(pattern, **{**build, "batch_size": 0})
    mmc4 = make_mmc4_shards(tmp_path / "mmc4", num_shards=1, documents_per_shard=1)
    with pytest.raises(ValueError, match="textsim_threshold=30 is outside"):
        ours.build_mmc4_loader(mmc4, **build, textsim_threshold=30)
    args = train_args(
        laion_shards=pattern,
        batch_size_laion=2,
        train_num_samples_laion=8,
        mmc4_shards=mmc4,
        batch_size_mmc4=2,
        train_num_samples_mmc4=6,
        workers=0,
    )
    with pytest.raises(ValueError, match="LAION gives 4 batches per epoch .* but MMC4 gives 3"):
        ours.build_train_loaders(args, tokenizer, image_processor, epoch=0, rank=0, world_size=1)
    no_data = train_args(laion_shards=None)
    with pytest.raises(ValueError, match="No training data"):
        ours.build_train_loaders(no_data, tokenizer, image_processor, epoch=0, rank=0, world_size=1)


def test_a_worker_without_usable_data_raises_instead_of_ending_the_epoch(tmp_path, tokenizer, image_processor):
    write_laion_shard(tmp_path / "junk-0.tar", [(b"junk", "caption")] * 3)
    for resampled in (False, True):
        loader = ours.build_laion_loader(
            str(tmp_path / "junk-0.tar"),
            tokenizer=tokenizer,
            image_processor=image_processor,
            batch_size=2,
            num_samples=4,
            workers=0,
            resampled=resampled,
        )
        with pytest.raises(RuntimeError, match=r"made no batch of 2 samples .*'undecodable_image': \d+"):
            next(iter(loader.dataloader))


# ---------------------------------------------------------------------------------------------------------------
# Determinism: a function of (seed, epoch, rank, worker) only


def _laion_loader(pattern, tokenizer, image_processor, **kwargs):
    options = dict(batch_size=2, num_samples=12, workers=2, seed=3, shuffle_buffer=4, shuffle_initial=2)
    return ours.build_laion_loader(pattern, tokenizer=tokenizer, image_processor=image_processor, **options | kwargs)


def test_batches_are_reproducible_and_resumable_with_worker_processes(tmp_path, tokenizer, image_processor):
    pattern = make_laion_shards(tmp_path, num_shards=4, samples_per_shard=3)
    loader = _laion_loader(pattern, tokenizer, image_processor)
    first = list(loader.dataloader)
    assert len(first) == loader.num_batches == 6
    again = list(_laion_loader(pattern, tokenizer, image_processor).dataloader)
    for one, other in zip(first, again, strict=True):
        assert all(torch.equal(one[key], other[key]) for key in ("pixel_values", "input_ids", "labels"))
    # Resuming after k batches: a re-created loader, its first k batches skipped, gives the rest.
    resumed = list(itertools.islice(_laion_loader(pattern, tokenizer, image_processor).dataloader, 4, None))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, first[4:], strict=True))
    # workers=0 runs worker 0 of 1 in this process: the same batches as one worker process.
    assert [b["input_ids"].tolist() for b in _laion_loader(pattern, tokenizer, image_processor, workers=0)] == [
        b["input_ids"].tolist() for b in _laion_loader(pattern, tokenizer, image_processor, workers=1)
    ]
    # Another epoch (set_epoch or epoch=) or seed gives another order.
    loader.set_epoch(1)
    next_epoch = [batch["input_ids"].tolist() for batch in loader]
    assert next_epoch == [b["input_ids"].tolist() for b in _laion_loader(pattern, tokenizer, image_processor, epoch=1)]
    assert next_epoch != [batch["input_ids"].tolist() for batch in first]


def test_resampled_shards_are_reproducible(tmp_path, tokenizer, image_processor):
    pattern = make_laion_shards(tmp_path, num_shards=3, samples_per_shard=2)
    runs = [
        [
            batch["input_ids"].tolist()
            for batch in _laion_loader(pattern, tokenizer, image_processor, resampled=True, seed=s)
        ]
        for s in (3, 3, 4)
    ]
    assert len(runs[0]) == 6 and runs[0] == runs[1] != runs[2]


def test_flips_are_per_batch_and_seeded(tmp_path, tokenizer, image_processor):
    pattern = make_laion_shards(tmp_path, num_shards=2, samples_per_shard=6)
    plain = list(_laion_loader(pattern, tokenizer, image_processor, workers=0, num_samples=24, flip=False))
    flipped = list(_laion_loader(pattern, tokenizer, image_processor, workers=0, num_samples=24))
    kinds = []
    for one, other in zip(plain, flipped, strict=True):
        assert torch.equal(one["input_ids"], other["input_ids"])
        if torch.equal(one["pixel_values"], other["pixel_values"]):
            kinds.append("same")
        else:  # the whole batch flipped at once, as torchvision flips the original's stacked batch
            assert torch.equal(one["pixel_values"].flip(-1), other["pixel_values"])
            kinds.append("flipped")
    assert set(kinds) == {"same", "flipped"}


# ---------------------------------------------------------------------------------------------------------------
# MMC4


def _mmc4_args(pattern, batch_size, num_samples, workers, seed=7):
    return SimpleNamespace(
        mmc4_shards=pattern,
        train_num_samples_mmc4=num_samples,
        batch_size_mmc4=batch_size,
        seed=seed,
        workers=workers,
        dataset_resampled=False,
        mmc4_textsim_threshold=0.24,
        mmc4_max_num_images=6,
        mmc4_min_num_images=1,
    )


@pytest.mark.parametrize(
    ("rank", "world_size", "worker", "workers", "epoch", "batches"), [(0, 1, 0, 1, 0, 6), (1, 2, 1, 2, 2, 3)]
)
def test_mmc4_batches_match_the_original(
    tmp_path,
    original,
    tokenizer,
    image_processor,
    open_clip_transform,
    rank,
    world_size,
    worker,
    workers,
    epoch,
    batches,
):
    # Random documents: images missing, small, below the threshold, more than 6 matched, texts over 256 tokens,
    # single-image documents (the original's half-time drop draws from `random`, given ours's generator here).
    pattern = make_mmc4_shards(tmp_path, num_shards=8, documents_per_shard=6, seed=1)
    batch_size = 2
    num_samples = batches * batch_size * world_size * workers
    loader = ours.build_mmc4_loader(
        pattern,
        tokenizer=tokenizer,
        image_processor=image_processor,
        batch_size=batch_size,
        num_samples=num_samples,
        workers=workers,
        seed=7,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        flip=False,
        shuffle_buffer=1,
    )
    expected, original_num_batches = _run_original(
        original,
        "mmc4",
        _mmc4_args(pattern, batch_size, num_samples, workers),
        tokenizer,
        open_clip_transform,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        worker=worker,
        drop_rng=loader.dataloader.dataset.drop_rng(worker),
    )
    assert loader.num_batches == original_num_batches == batches * workers
    actual = _run_ours(loader, worker, workers)
    _assert_same_batches(actual, expected)
    # What the documents exercised (all of it asserted equal above).
    pixel_values = torch.cat([batch["pixel_values"] for batch in actual])
    input_ids = torch.cat([batch["input_ids"] for batch in actual])
    assert pixel_values.shape[1:] == (6, 1, 3, IMAGE_SIZE, IMAGE_SIZE) and input_ids.shape[1] == 256
    images_per_document = pixel_values.flatten(2).abs().sum(-1).gt(0).sum(1)
    media = tokenizer.convert_tokens_to_ids("<image>")
    assert images_per_document.max() >= 2 and (input_ids == media).sum(1).min() == 1
    assert (input_ids[:, -1] != tokenizer.pad_token_id).any()  # a text cut at 256 tokens
    skipped = _totals(actual)
    assert skipped.get("single_image_dropped", 0) > 0 and skipped.get("too_few_images", 0) > 0
    if rank == 0:
        assert skipped.get("no_usable_image", 0) > 0


ORIGINAL_MESSAGES = {
    "no_usable_image": "No images in sample",
    "too_few_images": "Fewer than 1 images in sample",
    "single_image_dropped": "Only one image in sample",
    "image_at_end": "Only one image at the end of sample, so labels will all be -100",
}


def _preprocess_both(original, document, tokenizer, image_processor, transform, reference=None, seed=0):
    """(ours, the original's) preprocessing of one document: (pixel values, ids, mask), or why it was dropped.
    `reference` is the document given to the original instead (see the linear-assignment tests)."""
    try:
        actual = ours.preprocess_mmc4_document(
            document,
            tokenizer=tokenizer,
            image_processor=image_processor,
            tokens=ours.check_flamingo_tokenizer(tokenizer),
            rng=random.Random(seed),
        )
    except ours.SkipSample as skip:
        actual = ORIGINAL_MESSAGES.get(skip.reason, skip.reason)
    sample = (json.dumps(reference or document).encode(),)
    with (
        mock.patch.object(original, "random", random.Random(seed)),
        mock.patch.object(original.torchvision.transforms, "RandomHorizontalFlip", lambda p: lambda x: x),
    ):
        try:
            images, (input_ids, attention_mask) = original.preprocess_interleaved(
                sample, tokenizer, transform, 0.24, 1, 6
            )
            expected = (images, input_ids[0], attention_mask[0])
        except ValueError as error:
            expected = str(error)
    return actual, expected


def _assert_same_document(actual, expected):
    if isinstance(expected, str):
        assert actual == expected
        return
    assert not isinstance(actual, str), actual
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=0)
    assert torch.equal(actual[1], expected[1]) and torch.equal(actual[2], expected[2])


def _sized_jpeg(seed: int, size: int) -> bytes:
    """A JPEG of exactly `size` bytes (PIL ignores bytes after the end-of-image marker)."""
    data = image_bytes(seed, width=96, height=64)
    assert len(data) < size
    return data + b"\0" * (size - len(data))


def test_mmc4_documents_match_the_original(original, tokenizer, image_processor, open_clip_transform):
    short = [sentence(index, 4) for index in range(10)]
    images = [image_bytes(seed) for seed in range(10)]
    documents = {
        # 8 images above the threshold, each its own sentence: the first 6 (in image order) are kept.
        "cap": mmc4_document(short, images[:8], [[0.3 if s == 7 - i else 0.1 for s in range(10)] for i in range(8)]),
        # 10,999 bytes is dropped by `len // 1000 <= 10`, 11,000 kept.
        "size": mmc4_document(
            short[:3],
            [_sized_jpeg(1, 10_999), _sized_jpeg(2, 11_000), images[3]],
            [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1], [0.1, 0.1, 0.3]],
        ),
        # A similarity equal to the threshold is kept, one just below dropped.
        "threshold": mmc4_document(short[:3], images[:2], [[0.24, 0.1, 0.1], [0.1, 0.1, 0.2399]]),
        "no image above the threshold": mmc4_document(short[:2], images[:1], [[0.2, 0.1]]),
        "only small images": mmc4_document(short[:2], [image_bytes(0, noisy=False)], [[0.3, 0.1]]),
        "no image downloaded": mmc4_document(short[:2], [None, None], [[0.3, 0.1], [0.1, 0.3]]),
        # The second image's sentence lies beyond 256 tokens: one image left, then the half-time drop.
        "truncated": mmc4_document(
            [short[0], sentence(1, 40) * 4, short[1]], images[:2], [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]]
        ),
        # Every matched sentence lies beyond 256 tokens.
        "truncated to no image": mmc4_document(
            [sentence(1, 40) * 4, short[0], short[1]], images[:2], [[0.1, 0.3, 0.1], [0.1, 0.1, 0.3]]
        ),
    }
    exercised = set()
    for name, document in documents.items():
        for seed in range(4):  # seeds of the single-image drop
            actual, expected = _preprocess_both(
                original, document, tokenizer, image_processor, open_clip_transform, seed=seed
            )
            _assert_same_document(actual, expected)
            exercised.add(expected if isinstance(expected, str) else "kept")
            if not isinstance(actual, str):
                assert actual[0].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
                num_images = int((actual[1] == tokenizer.convert_tokens_to_ids("<image>")).sum())
                assert num_images == {"cap": 6, "size": 2, "threshold": 1, "truncated": 1}[name], name
    assert exercised == {"kept", *ORIGINAL_MESSAGES.values()} - {ORIGINAL_MESSAGES["image_at_end"]}


def test_mmc4_single_image_at_the_end_is_dropped(original, tokenizer, image_processor, open_clip_transform):
    # " a" is one token: 255 of them put the only <image> at position 255, the last one kept by truncation.
    assert len(tokenizer("a" + " a" * 254)["input_ids"]) == 255
    document = mmc4_document(["a" + " a" * 254, "Two cats."], [image_bytes(0)], [[0.1, 0.3]])
    outcomes = set()
    for seed in range(4):
        actual, expected = _preprocess_both(
            original, document, tokenizer, image_processor, open_clip_transform, seed=seed
        )
        _assert_same_document(actual, expected)
        outcomes.add(actual)
    assert outcomes == {ORIGINAL_MESSAGES["image_at_end"], ORIGINAL_MESSAGES["single_image_dropped"]}


def test_mmc4_matching_is_a_linear_assignment(original, tokenizer, image_processor, open_clip_transform):
    # The installed release matches each image to its best sentence; the repository head (and we) solve a one-to-one
    # assignment. Given a document whose best sentences already are the assignment, the release serves as reference.
    sentences = [sentence(index, 5) for index in range(3)]
    a, b, c = image_bytes(11), image_bytes(12), image_bytes(13)
    # Both images prefer sentence 0; the assignment gives it to B (0.35) and sentence 1 to A (0.28 > 0.24).
    document = mmc4_document(sentences, [a, b], [[0.30, 0.28, 0.1], [0.35, 0.1, 0.1]])
    reference = mmc4_document(sentences, [a, b], [[0.0, 0.28, 0.1], [0.35, 0.1, 0.1]])
    kept = None
    for seed in range(2):
        actual, expected = _preprocess_both(
            original, document, tokenizer, image_processor, open_clip_transform, reference=reference, seed=seed
        )
        _assert_same_document(actual, expected)
        kept = actual
    text = tokenizer.decode(kept[1], skip_special_tokens=False).replace("<PAD>", "")
    assert (
        text == f"<image>{sentences[0]}<|endofchunk|><image>{sentences[1]} {sentences[2]}<|endofchunk|><|endoftext|>"
    )
    # As in the original, the images stay in document order (A, B) while the text names B's sentence first.
    torch.testing.assert_close(kept[0][0], open_clip_transform(ours.decode_rgb_image(a)), atol=1e-5, rtol=0)
    # image_order="text" gives each <image> its own image: B then A, with the same text.
    aligned = ours.preprocess_mmc4_document(
        document,
        tokenizer=tokenizer,
        image_processor=image_processor,
        tokens=ours.check_flamingo_tokenizer(tokenizer),
        image_order="text",
        rng=random.Random(0),
    )
    assert torch.equal(aligned[1], kept[1])
    assert torch.equal(aligned[0][:2], kept[0][[1, 0]]) and aligned[0][2:].abs().sum() == 0
    # Three images for two sentences: C takes sentence 1 (0.5), B sentence 0 (0.35); A is left without a sentence.
    document = mmc4_document(sentences[:2], [a, b, c], [[0.3, 0.25], [0.35, 0.26], [0.1, 0.5]])
    reference = mmc4_document(sentences[:2], [None, b, c], [[0.3, 0.25], [0.35, 0.26], [0.1, 0.5]])
    actual, expected = _preprocess_both(
        original, document, tokenizer, image_processor, open_clip_transform, reference=reference
    )
    _assert_same_document(actual, expected)
    assert actual[0][2].abs().sum() == 0  # two images, then padding


def test_mmc4_bad_images_and_documents_are_skipped_and_counted(tmp_path, tokenizer, image_processor):
    good = random_mmc4_document(3, num_images=2, num_sentences=3)
    good["similarity_matrix"] = [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1]]
    # An image that does not decode is dropped from its document (the original drops the whole document).
    with_bad_image = mmc4_document(
        good["text_list"],
        [b"\xff\xd8" + bytes(range(256)) * 50, image_bytes(5)],
        [[0.5, 0.1, 0.1], [0.1, 0.3, 0.1]],
    )
    documents = [
        good,
        with_bad_image,
        b"{not json",
        {"text_list": ["x"], "image_info": []},  # no similarity_matrix
        mmc4_document(["x", "y"], [image_bytes(6)], [[0.3]]),  # matrix of the wrong shape
        mmc4_document(["x", "y"], [None], [[0.3, 0.1]]),  # no image
        {**good, "is_gpt": True},
    ]
    write_mmc4_shard(tmp_path / "mmc4-0.tar", documents)
    loader = ours.build_mmc4_loader(
        str(tmp_path / "mmc4-0.tar"),
        tokenizer=tokenizer,
        image_processor=image_processor,
        batch_size=1,
        num_samples=3,
        workers=0,
        flip=False,
        shuffle_buffer=1,
    )
    batches = list(loader.dataloader)
    assert len(batches) == 3
    assert _totals(batches) == {
        "undecodable_image": 1,
        "bad_document": 3,
        "no_usable_image": 1,
        "unsupported_document": 1,
    }
    # The document with the bad image kept its good one, which took sentence 1.
    media = tokenizer.convert_tokens_to_ids("<image>")
    assert (batches[1]["input_ids"] == media).sum() == 1
    assert batches[1]["pixel_values"][0, 1].abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# FlamingoDataCollator: users' own interleaved data


@pytest.fixture(scope="module")
def processor(image_processor):
    from modeling_flamingo.processing import FlamingoProcessor

    return FlamingoProcessor(image_processor=image_processor, tokenizer=add_flamingo_tokens(make_tiny_tokenizer()))


def _interleaved_dataset():
    import datasets

    images = [ours.decode_rgb_image(image_bytes(seed, width=40 + 8 * seed)) for seed in range(4)]
    rows = {
        "text": [
            "Intro text <image>An image of two cats.<|endofchunk|> junk <image>A dog runs.<|endofchunk|>",
            "<image>A sink in a small bathroom.<|endofchunk|>",
            "Only text, no image.",
            "<image>A red ball.<|endofchunk|>",
        ],
        "images": [images[:2], [images[2]], [], [images[3]]],
    }
    features = datasets.Features({"text": datasets.Value("string"), "images": datasets.List(datasets.Image())})
    return datasets.Dataset.from_dict(rows, features=features), images


def test_collator_batches_an_hf_dataset(processor, image_processor):
    dataset, images = _interleaved_dataset()
    collator = ours.FlamingoDataCollator(processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collator)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    tokenizer = processor.tokenizer
    texts = [text + tokenizer.eos_token for text in dataset["text"][:3]]
    expected = tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["attention_mask"][2, -1] == 0  # right padding
    assert torch.equal(batch["labels"], _original_labels(batch["input_ids"], tokenizer, interleaved=True))
    # (B, T_img, 1, 3, H, W): the images of each sample in order, zeros after them.
    assert batch["pixel_values"].shape == (3, 2, 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    reference = ours.pixel_values_of(images[:3], image_processor)
    torch.testing.assert_close(batch["pixel_values"][0, :, 0], reference[:2], atol=0, rtol=0)
    torch.testing.assert_close(batch["pixel_values"][1, 0, 0], reference[2], atol=0, rtol=0)
    assert batch["pixel_values"][1, 1].abs().sum() == 0 and batch["pixel_values"][2].abs().sum() == 0
    # The LAION branch's masking: only pad and <image>.
    plain = ours.FlamingoDataCollator(processor, interleaved=False)([dataset[1], dataset[3]])
    assert torch.equal(plain["labels"], _original_labels(plain["input_ids"], tokenizer, interleaved=False))
    assert (plain["labels"][:, 1:] != -100).any()


def test_collator_errors(processor):
    dataset, _ = _interleaved_dataset()
    collator = ours.FlamingoDataCollator(processor)
    with pytest.raises(ValueError, match=r"Sample 0 has no 'text' string .*remove_unused_columns=False"):
        collator([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"Sample 0: the text has 2 `<image>` tokens but 1 images were given"):
        collator([{"text": dataset[0]["text"], "images": dataset[0]["images"][:1]}])
    with pytest.raises(ValueError, match="truncation must not cut an image token"):
        ours.FlamingoDataCollator(processor, max_length=6)([dataset[0]])
    with pytest.raises(ValueError, match="no <image> token"):
        ours.FlamingoDataCollator(SimpleNamespace(tokenizer=make_tiny_tokenizer()))
    # max_length padding and truncation of plain text are fine.
    batch = ours.FlamingoDataCollator(processor, max_length=40, padding="max_length")([dataset[1], dataset[2]])
    assert batch["input_ids"].shape == (2, 40)


def test_collator_trains_a_model_with_the_trainer(tmp_path, processor):
    from transformers import Trainer, TrainingArguments

    from modeling_flamingo import FlamingoForConditionalGeneration
    from modeling_flamingo.testing import tiny_flamingo_config
    from modeling_flamingo.training import freeze_for_flamingo_training

    dataset, _ = _interleaved_dataset()
    torch.manual_seed(0)
    model = FlamingoForConditionalGeneration(tiny_flamingo_config("gpt_neox", tokenizer=processor.tokenizer))
    freeze_for_flamingo_training(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=ours.FlamingoDataCollator(processor)
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    # The gates start closed, so only they (and the embeddings) get a gradient at the first step; theirs comes
    # through the images the collator placed at the `<image>` tokens.
    assert any(name.endswith("gated_cross_attn_layer.attn_gate") for name in changed)


def test_build_train_loaders_from_the_original_options(tmp_path, tokenizer, image_processor):
    options = dict(
        laion_shards=make_laion_shards(tmp_path / "laion", num_shards=2, samples_per_shard=4),
        batch_size_laion=4,
        train_num_samples_laion=8,
        mmc4_shards=[make_mmc4_shards(tmp_path / "mmc4", num_shards=2, documents_per_shard=8)],
        batch_size_mmc4=2,
        train_num_samples_mmc4=4,
        workers=0,
        seed=1,
        dataset_resampled=True,
        mmc4_textsim_threshold=0.2,
        mmc4_max_num_images=3,
    )
    args = train_args(**options)
    loaders = ours.build_train_loaders(args, tokenizer, image_processor, epoch=0, rank=0, world_size=1)
    assert set(loaders) == {"laion", "mmc4"}
    assert loaders["laion"].num_batches == loaders["mmc4"].num_batches == len(loaders["mmc4"]) == 2
    steps = list(zip(loaders["laion"], loaders["mmc4"], strict=True))
    assert len(steps) == 2
    laion, mmc4 = steps[0]
    assert laion["pixel_values"].shape == (4, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE) and laion["input_ids"].shape[0] == 4
    assert mmc4["pixel_values"].shape == (2, 3, 1, 3, IMAGE_SIZE, IMAGE_SIZE) and mmc4["input_ids"].shape == (2, 256)
    only_laion = train_args(**{k: v for k, v in options.items() if not k.startswith("mmc4")})
    assert set(ours.build_train_loaders(only_laion, tokenizer, image_processor, epoch=0, rank=0, world_size=1)) == {
        "laion"
    }


def test_each_loader_reads_one_stream_config_built_from_the_command_line(tmp_path, tokenizer, image_processor):
    args = train_args(
        laion_shards=make_laion_shards(tmp_path / "laion", num_shards=1, samples_per_shard=2),
        mmc4_shards=make_mmc4_shards(tmp_path / "mmc4", num_shards=1, documents_per_shard=2),
        batch_size_laion=2,
        train_num_samples_laion=4,
        batch_size_mmc4=1,
        train_num_samples_mmc4=2,
        mmc4_max_num_images=3,
        mmc4_image_order="text",
        workers=0,
        seed=5,
        dataset_resampled=True,
        no_flip=True,
        max_image_pixels=10_000,
    )
    loaders = ours.build_train_loaders(args, tokenizer, image_processor, epoch=2, rank=1, world_size=2)
    shared = dict(
        resampled=True, workers=0, seed=5, epoch=2, rank=1, world_size=2, flip=False, max_image_pixels=10_000
    )
    laion = loaders["laion"].dataloader.dataset.config
    assert laion == ours.StreamConfig(batch_size=2, num_samples=4, **shared)
    assert loaders["mmc4"].dataloader.dataset.config == ours.Mmc4StreamConfig(
        batch_size=1,
        num_samples=2,
        textsim_threshold=args.mmc4_textsim_threshold,
        max_num_images=3,
        min_num_images=args.mmc4_min_num_images,
        image_order="text",
        **shared,
    )
    # Frozen: a new epoch is a new config, the rest unchanged.
    with pytest.raises(dataclasses.FrozenInstanceError):
        laion.epoch = 3
    loaders["laion"].set_epoch(3)
    assert loaders["laion"].dataloader.dataset.config == dataclasses.replace(laion, epoch=3) and laion.epoch == 2
    # The LAION loader takes no MMC4 option, as before.
    with pytest.raises(TypeError, match="textsim_threshold"):
        ours.build_laion_loader(
            args.laion_shards, tokenizer=tokenizer, image_processor=image_processor, batch_size=1, num_samples=1,
            textsim_threshold=0.3,
        )  # fmt: skip


def test_shards_at_fsspec_urls(tmp_path, tokenizer, image_processor):
    import fsspec

    pattern = make_laion_shards(tmp_path, num_shards=2, samples_per_shard=3)
    memory = fsspec.filesystem("memory")
    for shard in sorted(tmp_path.glob("*.tar")):
        memory.pipe(f"/flamingo-test/{shard.name}", shard.read_bytes())
    try:
        found = ours.expand_shards("memory://flamingo-test/*.tar")
        assert [url.rsplit("/", 1)[1] for url in found] == ["laion-00000.tar", "laion-00001.tar"]
        assert all(url.startswith("memory://") for url in found)
        options = dict(tokenizer=tokenizer, image_processor=image_processor, batch_size=2, num_samples=4, workers=0)
        remote = ours.build_laion_loader("memory://flamingo-test/laion-{00000..00001}.tar", flip=False, **options)
        local = ours.build_laion_loader(pattern, flip=False, **options)
        assert [b["input_ids"].tolist() for b in remote] == [b["input_ids"].tolist() for b in local]
        with pytest.raises(ValueError, match="does not exist"):
            ours.build_laion_loader("memory://flamingo-test/laion-{00005..00006}.tar", **options)
    finally:
        memory.rm("/flamingo-test", recursive=True)


# ---------------------------------------------------------------------------------------------------------------
# One bad sample must not end a run


def _hostile_mmc4_documents() -> dict[str, tuple[bytes | dict, dict[str, int]]]:
    """Documents in the real MMC4 layout that each used to end a run or be read as something else, and what they
    are counted as."""
    valid = random_mmc4_document(40, num_images=2, num_sentences=3)
    header = b'{"text_list": ["A cat."], "image_info": [], "similarity_matrix": [[0.3]], '
    return {
        # json.loads raises RecursionError (not a ValueError) beyond ~1000 levels.
        "nested": (header + b'"url": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {"bad_document": 1}),
        # Python refuses to convert integers of more than 4300 digits (a plain ValueError).
        "huge integer": (header + b'"url": ' + b"1" * 5000 + b"}", {"bad_document": 1}),
        "not an object": (b"[1, 2, 3]", {"bad_document": 1}),
        # The original drops these (it indexes and joins text_list); read leniently they became other documents.
        "text_list a string": ({**valid, "text_list": "A cat sits."}, {"bad_document": 1}),
        "text_list of numbers": ({**valid, "text_list": [1, 2, 3]}, {"bad_document": 1}),
        "image_info an object": ({**valid, "image_info": {"image_base64": "x"}}, {"bad_document": 1}),
        "similarity of strings": ({**valid, "similarity_matrix": [["a", "b", "c"]] * 2}, {"bad_document": 1}),
        "similarity of objects": ({**valid, "similarity_matrix": [{"a": 1}] * 2}, {"bad_document": 1}),
        "similarity NaN": ({**valid, "similarity_matrix": [[float("nan")] * 3] * 2}, {"bad_document": 1}),
        "image_base64 a list": (
            {**valid, "image_info": [{"image_base64": [1]}, {"image_base64": {"a": 1}}]},
            {"undecodable_image": 2, "no_usable_image": 1},
        ),
    }


def test_mmc4_hostile_documents_are_skipped_and_counted_without_changing_the_batches(
    tmp_path, tokenizer, image_processor
):
    documents = [random_mmc4_document(seed, num_images=3, num_sentences=6) for seed in range(6)]
    hostile = _hostile_mmc4_documents()
    write_mmc4_shard(tmp_path / "clean-0.tar", documents)
    # The hostile documents first: they are all read before the first batch is made.
    write_mmc4_shard(tmp_path / "mixed-0.tar", [document for document, _ in hostile.values()] + documents)
    options = dict(tokenizer=tokenizer, image_processor=image_processor, batch_size=2, num_samples=4, workers=0)
    clean = list(ours.build_mmc4_loader(str(tmp_path / "clean-0.tar"), shuffle_buffer=1, **options).dataloader)
    mixed = list(ours.build_mmc4_loader(str(tmp_path / "mixed-0.tar"), shuffle_buffer=1, **options).dataloader)
    assert len(mixed) == len(clean) == 2
    for one, other in zip(mixed, clean, strict=True):
        assert all(torch.equal(one[key], other[key]) for key in ("pixel_values", "input_ids", "labels"))
    expected = _totals(clean)
    for _, counts in hostile.values():
        for reason, count in counts.items():
            expected[reason] = expected.get(reason, 0) + count
    assert _totals(mixed) == expected


def _failing_transform(transform, width: int, error: BaseException):
    """A user's image transform (a callable PIL image -> (3, H, W) tensor) that raises `error` on images `width`
    pixels wide."""

    def apply(image):
        if image.width == width:
            raise error
        return transform(image)

    return apply


def test_any_exception_of_one_sample_is_skipped_counted_and_logged(tmp_path, tokenizer, open_clip_transform, caplog):
    # The image transform may be anyone's callable: whatever it raises on one image skips that sample, and only that.
    samples = [(image_bytes(seed, width=40 + seed), f"c{seed}") for seed in range(4)]
    write_laion_shard(tmp_path / "laion-0.tar", samples)
    sentences = ["A cat.", "A dog.", "A ball."]
    similarity = [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1]]
    good = mmc4_document(sentences, [image_bytes(1), image_bytes(2)], similarity)
    bad = mmc4_document(sentences, [image_bytes(3), image_bytes(4, width=200)], similarity)
    write_mmc4_shard(tmp_path / "mmc4-0.tar", [bad, good])
    options = dict(tokenizer=tokenizer, batch_size=1, workers=0, flip=False, shuffle_buffer=1)
    laion_transform = _failing_transform(open_clip_transform, 41, ZeroDivisionError("division by zero"))
    mmc4_transform = _failing_transform(open_clip_transform, 200, AssertionError("a bug in a transform"))
    with caplog.at_level("WARNING", logger=ours.__name__):
        laion = ours.build_laion_loader(
            str(tmp_path / "laion-0.tar"), image_processor=laion_transform, num_samples=3, **options
        )
        laion = list(laion.dataloader)
        mmc4 = ours.build_mmc4_loader(
            str(tmp_path / "mmc4-0.tar"), image_processor=mmc4_transform, num_samples=1, **options
        )
        mmc4 = list(mmc4.dataloader)
    assert [tokenizer.decode(batch["input_ids"][0]) for batch in laion] == [
        f"<image>c{seed}<|endofchunk|><|endoftext|>" for seed in (0, 2, 3)
    ]
    assert _totals(laion) == {"sample_error": 1}
    assert len(mmc4) == 1 and _totals(mmc4) == {"sample_error": 1}
    assert "Skipping sample '00001' of " in caplog.text and "ZeroDivisionError('division by zero')" in caplog.text
    assert f"Skipping sample '{0:032x}' of " in caplog.text and "AssertionError('a bug in a transform')" in caplog.text
    # Interrupts and exits are no sample's failure: they end the run as they should.
    interrupted = _failing_transform(open_clip_transform, 40, KeyboardInterrupt())
    loader = ours.build_laion_loader(
        str(tmp_path / "laion-0.tar"), image_processor=interrupted, num_samples=1, **options
    )
    with pytest.raises(KeyboardInterrupt):
        next(iter(loader.dataloader))


# ---------------------------------------------------------------------------------------------------------------
# One huge image must not exhaust memory


def test_decompression_bombs_are_refused_from_their_header_fast_and_without_memory(
    tmp_path, tokenizer, image_processor
):
    # Real PNGs of ~12 KB and ~110 KB declaring 100 MP (over the default bound, 50 MP) and 900 MP (also over PIL's
    # own refusal, twice its 89 MP warning limit): decoded, 0.5 GB and 4.8 GB.
    bombs = [png_declaring(10_000, 10_000, min_bytes=11_000), png_declaring(30_000, 30_000)]
    assert all(len(bomb) < 200_000 for bomb in bombs)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for bomb in bombs:
        start = time.perf_counter()
        with pytest.raises(ours.SkipSample) as skip:
            ours.decode_rgb_image(bomb)
        assert skip.value.reason == "image_too_large" and time.perf_counter() - start < 1

    # In a LAION shard: the same batches as without the bombs, and both counted.
    good = [(image_bytes(seed, width=48, height=40, fmt="PNG"), f"good {seed}") for seed in range(3)]
    write_laion_shard(tmp_path / "laion-clean.tar", good, ext="png")
    with_bombs = [good[0], (bombs[0], "bomb"), good[1], (bombs[1], "bomb"), good[2]]
    write_laion_shard(tmp_path / "laion-bombs.tar", with_bombs, ext="png")
    options = dict(tokenizer=tokenizer, image_processor=image_processor, workers=0, flip=False, shuffle_buffer=1)
    runs = {}
    for name in ("clean", "bombs"):
        loader = ours.build_laion_loader(str(tmp_path / f"laion-{name}.tar"), batch_size=3, num_samples=3, **options)
        runs[name] = list(loader.dataloader)
    assert len(runs["bombs"]) == len(runs["clean"]) == 1
    assert all(torch.equal(runs["bombs"][0][key], runs["clean"][0][key]) for key in ("pixel_values", "input_ids"))
    assert _totals(runs["bombs"]) == {"image_too_large": 2} and _totals(runs["clean"]) == {}

    # In an MMC4 document: that image is dropped, as if it had failed to download.
    sentences = [sentence(seed, 5) for seed in range(4)]
    similarity = [[0.3 if column == row else 0.1 for column in range(4)] for row in range(4)]
    images = [image_bytes(1), bombs[0], image_bytes(2), bombs[1]]
    write_mmc4_shard(tmp_path / "mmc4-bombs.tar", [mmc4_document(sentences, images, similarity)])
    missing = [images[0], None, images[2], None]
    write_mmc4_shard(tmp_path / "mmc4-clean.tar", [mmc4_document(sentences, missing, similarity)])
    for name in ("clean", "bombs"):
        loader = ours.build_mmc4_loader(str(tmp_path / f"mmc4-{name}.tar"), batch_size=1, num_samples=1, **options)
        runs[name] = list(loader.dataloader)
    assert all(torch.equal(runs["bombs"][0][key], runs["clean"][0][key]) for key in ("pixel_values", "input_ids"))
    assert _totals(runs["bombs"]) == {"image_too_large": 2} and _totals(runs["clean"]) == {}
    # Nothing was decoded: the peak memory of this process grew by far less than one decoded bomb.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000


def test_max_image_pixels_bounds_every_training_image(tmp_path, tokenizer, image_processor):
    from modeling_flamingo.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS
    from modeling_flamingo.training.cli import build_parser

    # LAION images of 48x48, 49x48, 50x48, 51x48: a bound of 49 x 48 pixels keeps the first two (it is inclusive).
    pattern = make_laion_shards(tmp_path / "laion", num_shards=1, samples_per_shard=4)
    options = dict(tokenizer=tokenizer, image_processor=image_processor, workers=0, flip=False, shuffle_buffer=1)
    loader = ours.build_laion_loader(pattern, batch_size=2, num_samples=2, max_image_pixels=49 * 48, **options)
    batches = list(loader.dataloader)
    assert len(batches) == 1 and batches[0]["pixel_values"].shape[0] == 2
    # The skips after the batch are carried by the next batch of a longer run: here, one more pass.
    loader = ours.build_laion_loader(pattern, batch_size=2, num_samples=4, max_image_pixels=49 * 48, **options)
    assert _totals(list(loader.dataloader)) == {"image_too_large": 2}
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer; got 0"):
        ours.build_laion_loader(pattern, batch_size=2, num_samples=2, max_image_pixels=0, **options)
    # The command line's --max_image_pixels reaches both loaders (default DEFAULT_MAX_IMAGE_PIXELS).
    mmc4 = make_mmc4_shards(tmp_path / "mmc4", num_shards=1, documents_per_shard=2)
    command = ["--model", "m", "--laion_shards", pattern, "--mmc4_shards", mmc4, "--workers", "0"]
    command += ["--batch_size_laion", "1", "--train_num_samples_laion", "2"]
    command += ["--batch_size_mmc4", "1", "--train_num_samples_mmc4", "2"]
    assert build_parser().parse_args(command).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    args = build_parser().parse_args([*command, "--max_image_pixels", "2352"])
    loaders = ours.build_train_loaders(args, tokenizer, image_processor, epoch=0, rank=0, world_size=1)
    assert {name: loader.dataloader.dataset.config.max_image_pixels for name, loader in loaders.items()} == {
        "laion": 2352,
        "mmc4": 2352,
    }


def test_mmc4_decodes_only_matched_images_and_drops_bad_ones_from_the_assignment(
    original, tokenizer, image_processor, open_clip_transform
):
    sentences = [sentence(index, 5) for index in range(4)]
    a, b = image_bytes(21), image_bytes(22)
    truncated = image_bytes(23, width=300, height=200)[:30_000]  # its header reads, its pixels do not decode
    with pytest.raises(OSError, match="truncated"):
        PIL.Image.open(io.BytesIO(truncated)).load()
    bomb = png_declaring(10_000, 10_000, min_bytes=11_000)  # 100 MP, over the default bound
    not_an_image = bytes(range(256)) * 50
    large = png_declaring(7_000, 7_000, min_bytes=11_000)  # 49 MP, within the bound: 196 MB decoded to RGB
    low = [0.05] * 4
    images = [truncated, a, bomb, not_an_image, b, truncated, large, large, large, large]
    similarity = [
        [0.5, 0.1, 0.1, 0.1],  # the truncated image takes sentence 0, then fails to decode: A gets it instead
        [0.35, 0.26, 0.1, 0.1],  # A: sentence 1 while the truncated image is matched, sentence 0 after
        [0.1, 0.1, 0.9, 0.1],  # refused from its header: never matched
        [0.1, 0.1, 0.1, 0.9],  # no image format: never matched
        [0.1, 0.1, 0.3, 0.1],  # B: sentence 2
        low,  # a second truncated image, matched below the threshold: never decoded, so never counted
        *[low] * 4,  # four large images below the threshold: never decoded
    ]
    document = mmc4_document(sentences, images, similarity)
    # The original, given the document without the images it cannot use (it would decode the bomb and fail on the
    # others, dropping the document), takes each image's best sentence: here the assignment's result.
    reference = mmc4_document(sentences, [None, a, None, None, b] + [None] * 5, similarity)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    skipped = Counter()
    ours.preprocess_mmc4_document(
        document,
        tokenizer=tokenizer,
        image_processor=image_processor,
        tokens=ours.check_flamingo_tokenizer(tokenizer),
        rng=random.Random(0),
        skipped=skipped,
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 150_000
    assert skipped == {"image_too_large": 1, "undecodable_image": 2}
    actual, expected = _preprocess_both(
        original, document, tokenizer, image_processor, open_clip_transform, reference=reference
    )
    _assert_same_document(actual, expected)
    text = tokenizer.decode(actual[1], skip_special_tokens=False).replace("<PAD>", "")
    assert text == (
        f"<image>{sentences[0]} {sentences[1]}<|endofchunk|><image>{sentences[2]} {sentences[3]}<|endofchunk|>"
        "<|endoftext|>"
    )
    torch.testing.assert_close(actual[0][1], open_clip_transform(ours.decode_rgb_image(b)), atol=1e-5, rtol=0)


def test_images_the_processor_would_blow_up_are_refused_before_the_resize(tmp_path, tokenizer):
    # A 70-byte PNG of 4000x1 pixels is small, but resizing its shortest side to 224 gives 224x896,000 pixels
    # (800 MB, seconds); 50000x1 would take 10 GB. The default bound (50 MP) applies to the resized image too.
    image_processor = FlamingoImageProcessor()  # shortest side 224, as the released models
    blow_up = png_declaring(4_000, 1)
    assert len(blow_up) < 100
    good = [(image_bytes(seed, width=48, height=40, fmt="PNG"), f"good {seed}") for seed in range(2)]
    write_laion_shard(tmp_path / "laion-0.tar", [good[0], (blow_up, "wide"), good[1]], ext="png")
    sentences = [sentence(seed, 5) for seed in range(3)]
    similarity = [[0.3, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.3]]
    images = [image_bytes(1), png_declaring(4_000, 1, min_bytes=11_000), image_bytes(2)]
    write_mmc4_shard(tmp_path / "mmc4-0.tar", [mmc4_document(sentences, images, similarity)])
    options = dict(tokenizer=tokenizer, image_processor=image_processor, workers=0, flip=False, shuffle_buffer=1)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    laion = list(ours.build_laion_loader(str(tmp_path / "laion-0.tar"), batch_size=2, num_samples=2, **options))
    mmc4 = list(ours.build_mmc4_loader(str(tmp_path / "mmc4-0.tar"), batch_size=1, num_samples=1, **options))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000
    assert _totals(laion) == _totals(mmc4) == {"image_too_large": 1}
    assert tokenizer.batch_decode(laion[0]["input_ids"]) == [
        f"<image>good {seed}<|endofchunk|><|endoftext|>" for seed in range(2)
    ]
    media = tokenizer.convert_tokens_to_ids("<image>")
    assert (mmc4[0]["input_ids"] == media).sum() == 2  # the first and third images, at their own sentences


def test_texts_containing_the_image_token_are_skipped(tmp_path, tokenizer, image_processor):
    # Web text may contain "<image>" itself: it tokenizes to the media token, one more than the sample's images, and
    # the model's forward raises on it ("Sample 0 has 2 <image> tokens but only 1 images were given"), ending the run.
    good = [(image_bytes(seed, width=48, height=40), f"good {seed}") for seed in range(2)]
    write_laion_shard(tmp_path / "laion-0.tar", [good[0], (image_bytes(7, width=48), "An <image> tag"), good[1]])
    sentences = ["A cat.", "A <image> tag in the page.", "A dog."]
    similarity = [[0.3, 0.1, 0.1], [0.1, 0.1, 0.3]]
    documents = [mmc4_document(sentences, [image_bytes(1), image_bytes(2)], similarity)]
    documents.append(
        mmc4_document([sentences[0], "No tag.", sentences[2]], [image_bytes(1), image_bytes(2)], similarity)
    )
    write_mmc4_shard(tmp_path / "mmc4-0.tar", documents)
    options = dict(tokenizer=tokenizer, image_processor=image_processor, workers=0, flip=False, shuffle_buffer=1)
    laion = list(ours.build_laion_loader(str(tmp_path / "laion-0.tar"), batch_size=2, num_samples=2, **options))
    mmc4 = list(ours.build_mmc4_loader(str(tmp_path / "mmc4-0.tar"), batch_size=1, num_samples=1, **options))
    assert _totals(laion) == _totals(mmc4) == {"image_token_in_text": 1}
    media = tokenizer.convert_tokens_to_ids("<image>")
    for batch in laion + mmc4:
        images = batch["pixel_values"].flatten(2).abs().sum(-1).gt(0).sum(1)
        assert torch.equal((batch["input_ids"] == media).sum(1), images)


def test_samples_with_huge_tar_members_are_skipped_unread(tmp_path, tokenizer, image_processor):
    # The bound (1 GiB) lowered to 20 KB: sample 1's image and sample 2's caption exceed it. Each such sample is
    # skipped whole, whichever of its members is the large one, and counted once.
    samples = [(image_bytes(seed, width=48, height=40), f"good {seed}") for seed in range(5)]
    samples[1] = (image_bytes(1, width=160, height=120), "large image")
    samples[2] = (samples[2][0], "large caption " + "x" * 30_000)
    assert len(samples[1][0]) > 20_000 and all(len(image) < 20_000 for image, _ in samples[2:])
    write_laion_shard(tmp_path / "laion-0.tar", samples)
    options = dict(tokenizer=tokenizer, image_processor=image_processor, workers=0, flip=False, shuffle_buffer=1)
    with mock.patch.object(ours_shards, "MAX_TAR_MEMBER_BYTES", 20_000):
        batches = list(ours.build_laion_loader(str(tmp_path / "laion-0.tar"), batch_size=3, num_samples=3, **options))
    assert tokenizer.batch_decode(batches[0]["input_ids"]) == [
        f"<image>good {seed}<|endofchunk|><|endoftext|>" for seed in (0, 3, 4)
    ]
    assert _totals(batches) == {"member_too_large": 2}
