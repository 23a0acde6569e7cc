"""What a training data pipeline skips, and under which reason it counts it (`SKIP_REASONS`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


SKIP_REASONS = {
    "unreadable_shard": "a shard that could not be opened (counted once per shard pass)",
    "corrupt_tar": "a tar stream that broke off (bad header, truncated file): the rest of that shard is lost",
    "member_too_large": "a sample with a tar member of more than MAX_TAR_MEMBER_BYTES (1 GiB), skipped unread",
    "incomplete_sample": "LAION: a sample without a caption or without a jpg/png/jpeg image",
    "undecodable_image": "an image that does not decode (LAION: the sample; MMC4: that image of the document)",
    "image_too_large": "an image declaring more than max_image_pixels pixels, refused from its header before decoding "
    "(or that the image processor would resize to more): LAION: the sample; MMC4: that image of the document",
    "undecodable_text": "LAION: a caption that is not UTF-8",
    "image_token_in_text": "a caption or MMC4 sentence containing the text `<image>`: it would tokenize to more "
    "`<image>` tokens than the sample has images, which the model refuses (ending the run)",
    "bad_document": "MMC4: a JSON member that does not parse (also nested too deep, numbers of over 4300 digits) or "
    "lacks/garbles text_list (a list of strings), image_info (a list), similarity_matrix",
    "unsupported_document": "MMC4: a ChatGPT-generated document (`is_gpt`), not supported",
    "no_usable_image": "MMC4: no image left after the size filter, decoding and the similarity threshold",
    "too_few_images": "MMC4: fewer than min_num_images `<image>` tokens left after truncation",
    "single_image_dropped": "MMC4: a single-image document dropped by the original's keep-half-of-them rule",
    "image_at_end": "MMC4: a single `<image>` as the last token (every label would be -100)",
    "sample_error": "any other exception while reading one sample (logged with the sample's key): that sample only",
}


class SkipSample(Exception):
    """A sample (or document) to skip, with the `SKIP_REASONS` key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def read_samples(
    samples: Iterable[dict[str, Any]], read: Callable[[dict[str, Any]], T], skipped: Counter
) -> Iterator[T]:
    """`read(sample)` of each sample that it does not raise for: a `SkipSample` is counted under its reason, any other
    exception (a bug or an input nobody foresaw must not end a run of days) as `sample_error`, and logged.

    `Exception` only: KeyboardInterrupt, SystemExit and GeneratorExit (a closed loader) still propagate."""
    for sample in samples:
        try:
            result = read(sample)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        except Exception as error:
            skipped["sample_error"] += 1
            logger.warning("Skipping sample %r of %s: %r", sample.get("__key__"), sample.get("__url__"), error)
            continue
        yield result
