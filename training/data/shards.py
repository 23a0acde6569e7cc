"""Tar shards: expanding patterns into URLs, reading one shard as a stream of samples, the buffered shuffle."""

from __future__ import annotations

import glob
import importlib
import logging
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# Buffered shuffle of the shard list (seeded), as the original's.
SHARD_SHUFFLE_BUFFER, SHARD_SHUFFLE_INITIAL = 2000, 500
# Tar members larger than this are not read (their sample is skipped): far above a LAION image or an MMC4 document
# (a few MB with its base64 images), far below what a worker can hold.
MAX_TAR_MEMBER_BYTES = 1 << 30


def import_train_dependency(module: str) -> Any:
    """Import an optional dependency of the `train` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"The training data pipelines need `{module}`: pip install 'openflamingo-transformers[train]'."
        ) from None


def _has_glob_magic(path: str) -> bool:
    return any(char in path for char in "*?[")


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """The shard URLs of brace patterns, globs or explicit lists, checked to exist.

    `"/data/{00000..00099}.tar"` expands with `braceexpand`; `"/data/*.tar"` (or `s3://bucket/*.tar`) is globbed
    (sorted); a list may mix both. Local paths must all exist; for remote URLs the first one is checked (one request).

    Raises:
        ValueError: nothing matched, a local shard is missing, or the URL's protocol cannot be opened.
    """
    braceexpand = import_train_dependency("braceexpand")
    fsspec = import_train_dependency("fsspec")

    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns or not all(isinstance(pattern, str) and pattern for pattern in patterns):
        raise ValueError(f"Shards must be a non-empty string or list of strings, got {shards!r}.")
    urls: list[str] = []
    for pattern in patterns:
        for path in braceexpand.braceexpand(pattern):
            if not _has_glob_magic(path):
                urls.append(path)
                continue
            if "://" in path:
                fs, _ = _filesystem(path)
                urls.extend(sorted(fs.unstrip_protocol(match) for match in fs.glob(path)))
            else:
                urls.extend(sorted(glob.glob(path)))
    if not urls:
        raise ValueError(f"The shard pattern {shards!r} matches no file.")
    local = [url for url in urls if "://" not in url or url.startswith("file://")]
    missing = [url for url in local if not fsspec.filesystem("file").exists(url.removeprefix("file://"))]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(urls)} shards of {shards!r} do not exist, e.g. {missing[0]!r}; check the "
            "path and the brace range."
        )
    remote = [url for url in urls if url not in local]
    if remote:
        fs, path = _filesystem(remote[0])
        if not fs.exists(path):
            raise ValueError(f"The shard {remote[0]!r} (the first of {len(remote)} remote shards) does not exist.")
    return urls


def _filesystem(url: str):
    fsspec = import_train_dependency("fsspec")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ValueError(f"Cannot open shards at {url!r}: {error}") from None


def buffer_shuffle(items: Iterable, buffer_size: int, initial: int, rng: random.Random) -> Iterator:
    """webdataset's buffered shuffle, draw for draw (so a seeded shard order equals the original's).

    It fills a buffer of up to `buffer_size` items, reading two items per step while the buffer is not full, starts
    yielding once it holds `initial` items, each time a uniformly drawn one. `buffer_size <= 1` keeps the order.
    """
    items = iter(items)
    initial = min(initial, buffer_size)
    buffer: list = []

    def pop() -> Any:
        index = rng.randint(0, len(buffer) - 1)
        item = buffer[index]
        buffer[index] = buffer[-1]
        buffer.pop()
        return item

    for item in items:
        buffer.append(item)
        if len(buffer) < buffer_size:
            following = next(items, _END)
            if following is not _END:
                buffer.append(following)
        if len(buffer) >= initial:
            yield pop()
    while buffer:
        yield pop()


_END = object()


def _split_member_name(name: str) -> tuple[str | None, str | None]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`): the sample key ends at the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


class _CheckedTarInfo(tarfile.TarInfo):
    """Records a broken member header on the archive: `tarfile` ends the iteration there as if at the end."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:  # a zero block: the archive's proper end
            raise
        except tarfile.HeaderError as error:  # garbled, truncated, or missing (the file ends without the end marker)
            archive.broken_header = error
            raise


def iter_tar_samples(url: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, read as a stream: `{"__key__", "__url__", ext: bytes, ...}` per key.

    Consecutive members sharing a key form a sample (a repeated extension starts a new one, as the original's
    non-throwing grouping does); `__*__` metadata members are ignored. A shard that cannot be opened counts
    `unreadable_shard`; one that breaks off (truncated, garbled header, no end-of-archive marker) counts
    `corrupt_tar`, and the samples read before the break are kept. A sample with a member larger than
    `MAX_TAR_MEMBER_BYTES` is skipped without reading it (`member_too_large`).
    """
    fsspec = import_train_dependency("fsspec")
    try:
        fileobj = fsspec.open(url, "rb").open()
    except Exception as error:  # any filesystem's error: the run goes on with the other shards
        skipped["unreadable_shard"] += 1
        logger.warning("Skipping shard %s: it cannot be opened (%r).", url, error)
        return
    sample: dict[str, Any] | None = None
    dropped_key: str | None = None  # the key of a sample with a member too large to read
    broken: BaseException | None = None
    try:
        with fileobj, tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key, extension = _split_member_name(member.name)
                if key is None or re.match(r"__[^/]*__($|/)", member.name):
                    continue
                if member.size > MAX_TAR_MEMBER_BYTES:  # the stream skips over it by reading in small blocks
                    skipped["member_too_large"] += 1
                    logger.warning(
                        "Skipping sample %r of %s: its member %s has %d bytes.", key, url, member.name, member.size
                    )
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                    sample, dropped_key = None, key
                    continue
                if key == dropped_key:
                    continue
                dropped_key = None
                data = archive.extractfile(member).read()
                archive.members = []  # a streamed tar would otherwise keep every header in memory
                extension = extension.lower()
                if sample is None or key != sample["__key__"] or extension in sample:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[extension] = data
            broken = getattr(archive, "broken_header", None)
    except Exception as error:  # TarError, OSError, EOFError, zlib.error, or a remote filesystem's own errors
        broken = error
    if broken is not None:
        skipped["corrupt_tar"] += 1
        last_key = sample["__key__"] if sample is not None else None
        logger.warning("Shard %s breaks off after key %r (%r); skipping its rest.", url, last_key, broken)
    if sample is not None:
        yield sample
