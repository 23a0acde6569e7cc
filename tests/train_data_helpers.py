"""Builders of tiny training shards for tests: LAION (img2dataset layout) and MMC4 (convert_mmc4_to_wds.py layout).

Everything is written with PIL and `tarfile`, deterministically from seeds:

    image = image_bytes(seed=3, noisy=True)                  # ~15 KB JPEG; noisy=False gives ~2 KB
    bomb = png_declaring(30_000, 30_000)                     # ~110 KB PNG, 900 MP decoded
    write_laion_shard(path, [(image, "a caption"), ...])     # 00000.jpg, 00000.txt, 00000.json, 00001.jpg, ...
    pattern = make_laion_shards(tmp_path, num_shards=4, samples_per_shard=6)   # ".../laion-{00000..00003}.tar"

    document = mmc4_document(["first sentence.", "second."], [image, None], [[0.3, 0.1], [0.2, 0.25]])
    write_mmc4_shard(path, [document, ...])                  # <32 hex digits>.json per document
    pattern = make_mmc4_shards(tmp_path, num_shards=2, documents_per_shard=5)

MMC4's size filter keeps images of at least 11,000 bytes (`len // 1000 > 10`): `image_bytes(noisy=True)` at the
default 128x96 is above it, `image_bytes(noisy=False)` and small noisy ones below (check `len()` when it matters).
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "a cat dog sits on the red blue couch near small park ball with two people playing tennis".split()


def image_bytes(seed: int = 0, width: int = 128, height: int = 96, noisy: bool = True, fmt: str = "JPEG") -> bytes:
    """An encoded image. `noisy=True`: uniform noise (incompressible, ~15 KB as a 128x96 quality-95 JPEG);
    `noisy=False`: a smooth gradient (~2 KB). `fmt`: any PIL format ("JPEG", "PNG")."""
    rng = np.random.default_rng(seed)
    if noisy:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None] * np.ones((height, 1, 3))
        pixels = (ramp * rng.uniform(0.3, 1.0, size=3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def png_declaring(width: int, height: int, min_bytes: int = 0) -> bytes:
    """A valid 1-bit black PNG of `width` x `height` pixels, written row block by row block (never held decoded).

    Its all-zero rows compress about 1000:1: 30000 x 30000 takes ~110 KB on disk and 900 MP once decoded (3.6 GB as
    RGB), a decompression bomb. `min_bytes`: zero bytes appended after the end chunk (decoders stop there) up to this
    length, to pass MMC4's size filter."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte "none", then the packed pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row * min(1000, height - start)) for start in range(0, height, 1000))
    data += compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    return png + b"\0" * max(0, min_bytes - len(png))


def sentence(seed: int, num_words: int = 6) -> str:
    """A made-up sentence of `num_words` words."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(num_words)).capitalize() + "."


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file with the given (name, bytes) members, in order."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_laion_shard(
    path: str | Path, samples: list[tuple[bytes | None, str | bytes | None]], ext: str = "jpg", first_key: int = 0
) -> Path:
    """A LAION shard as img2dataset writes it: `KEY.{ext}`, `KEY.txt`, `KEY.json` per (image bytes, caption).

    A `None` image or caption leaves that member out (an incomplete sample); a bytes caption is written as is
    (e.g. invalid UTF-8). Keys are 5-digit numbers from `first_key`.
    """
    members = []
    for index, (image, caption) in enumerate(samples):
        key = f"{first_key + index:05d}"
        if image is not None:
            members.append((f"{key}.{ext}", image))
        if caption is not None:
            members.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode("utf-8")))
        members.append((f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()))
    return write_tar(path, members)


def make_laion_shards(
    directory: str | Path, num_shards: int = 2, samples_per_shard: int = 6, seed: int = 0, image_size: int = 48
) -> str:
    """`num_shards` LAION shards of valid samples (JPEG and PNG, captions of 2 to 30 words with stray spaces), and
    the brace pattern naming them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        samples = []
        for index in range(samples_per_shard):
            sample_seed = seed * 100_000 + shard * 1000 + index
            caption = "  " + sentence(sample_seed, num_words=2 + sample_seed % 29) + " "
            samples.append((image_bytes(sample_seed, width=image_size + index, height=image_size), caption))
        write_laion_shard(
            directory / f"laion-{shard:05d}.tar",
            samples,
            ext="png" if shard % 2 else "jpg",
            first_key=shard * samples_per_shard,
        )
    return str(directory / f"laion-{{00000..{num_shards - 1:05d}}}.tar")


def mmc4_document(sentences: list[str], images: list[bytes | None], similarity: list[list[float]], **extra) -> dict:
    """An MMC4 document as convert_mmc4_to_wds.py stores it: `text_list`, `image_info` (with `image_base64` for
    each non-None image; None is an image that failed to download), `similarity_matrix` (images x sentences)."""
    image_info = []
    for index, image in enumerate(images):
        info = {"image_name": f"{index}.jpg", "raw_url": f"http://example.com/{index}.jpg", "matched_text_index": 0}
        if image is not None:
            info["image_base64"] = base64.b64encode(image).decode("ascii")
        image_info.append(info)
    return {"text_list": list(sentences), "image_info": image_info, "similarity_matrix": similarity, **extra}


def write_mmc4_shard(path: str | Path, documents: list[dict | bytes], first_key: int = 0) -> Path:
    """An MMC4 shard: one `KEY.json` per document (a dict is JSON-encoded, bytes are written as they are)."""
    members = []
    for index, document in enumerate(documents):
        data = document if isinstance(document, bytes) else json.dumps(document).encode("utf-8")
        members.append((f"{first_key + index:032x}.json", data))
    return write_tar(path, members)


def random_mmc4_document(seed: int, num_images: int | None = None, num_sentences: int | None = None) -> dict:
    """A document of 2 to 14 sentences of 3 to 20 words (often over 256 tokens in all) and 1 to 8 images (at most
    one per sentence), of which ~10% failed to download and ~15% are small (dropped by the 10 KB filter).

    Each image's most similar sentence is its own (a random one, similarity in [0.1, 0.4], about half above the
    0.24 threshold; the others lower), so matching each image to its best sentence (the pip release 2.0.1 of the
    original) and the one-to-one linear assignment (its repository head, and this package) agree.
    """
    rng = random.Random(seed)
    num_sentences = num_sentences or rng.randint(2, 14)
    num_images = num_images or rng.randint(1, min(8, num_sentences))
    images = []
    for index in range(num_images):
        draw = rng.random()
        if draw < 0.1:
            images.append(None)
        else:
            images.append(image_bytes(seed * 100 + index, width=120 + index, noisy=draw >= 0.25))
    sentences = [sentence(seed * 100 + index, num_words=rng.randint(3, 20)) for index in range(num_sentences)]
    best = rng.sample(range(num_sentences), num_images)
    similarity = []
    for image in range(num_images):
        top = round(rng.uniform(0.1, 0.4), 4)
        similarity.append(
            [top if s == best[image] else round(rng.uniform(0.0, top - 0.01), 4) for s in range(num_sentences)]
        )
    return mmc4_document(sentences, images, similarity)


def make_mmc4_shards(directory: str | Path, num_shards: int = 2, documents_per_shard: int = 5, seed: int = 0) -> str:
    """`num_shards` MMC4 shards of `random_mmc4_document`s, and the brace pattern naming them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        documents = [
            random_mmc4_document(seed * 100_000 + shard * 1000 + index) for index in range(documents_per_shard)
        ]
        write_mmc4_shard(directory / f"mmc4-{shard:05d}.tar", documents, first_key=shard * documents_per_shard)
    return str(directory / f"mmc4-{{00000..{num_shards - 1:05d}}}.tar")
