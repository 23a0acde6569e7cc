"""The output filter: every text the app shows (streamed pieces included) is judged before it is shown.

Two kinds of filter:

- `ProfanityClassifierFilter` (`--content_filter default`): `alt-profanity-check`, a linear SVM on TF-IDF
  character and word n-grams trained on ~200k human-labelled English comments (Wikipedia talk pages, tweets). It runs
  offline from the registry package and judges the whole answer so far, so it sees words in context.
- `WordListFilter` (`--content_filter PATH`): a UTF-8 file with one word or phrase per line (`#` starts a comment);
  an answer is flagged when it contains one of them as whole words, case-insensitively.

`StreamingFilter` applies either one to a stream of decoded pieces: it shows only text up to the last white
space, once that text has been judged, and holds back the trailing partial word (a later token may complete it
into a flagged word). A flagged answer is replaced as a whole by `FLAGGED_NOTICE`.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod

FLAGGED_NOTICE = "[This answer was hidden by the content filter.]"

_WORD = re.compile(r"\w+(?:'\w+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class ContentFilter(ABC):
    """Decides whether a text may be shown."""

    @abstractmethod
    def is_flagged(self, text: str) -> bool:
        """True when `text` must not be shown."""


class WordListFilter(ContentFilter):
    """Flags a text holding any of `phrases` as whole words (case-insensitive; punctuation between words ignored).

    Args:
        phrases: words or multi-word phrases.
    """

    def __init__(self, phrases: list[str]):
        self.phrases = {tuple(words) for words in map(_words, phrases) if words}
        if not self.phrases:
            raise ValueError("the word list holds no words")
        self._longest = max(map(len, self.phrases))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordListFilter:
        """Read one word or phrase per line; blank lines and `#` comments are skipped."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0].strip() for line in f]
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the word list {path}: {error}") from error
        try:
            return cls([line for line in lines if line])
        except ValueError as error:
            raise ValueError(f"{path}: {error}; give one word or phrase per line") from None

    def is_flagged(self, text: str) -> bool:
        words = _words(text)
        return any(
            tuple(words[start : start + n]) in self.phrases
            for n in range(1, self._longest + 1)
            for start in range(len(words) - n + 1)
        )


class ProfanityClassifierFilter(ContentFilter):
    """`alt-profanity-check`'s classifier: flags a text whose profanity probability is at least `threshold`."""

    def __init__(self, threshold: float = 0.5):
        try:
            from profanity_check import predict_prob
        except ImportError as error:
            raise ValueError(
                "the default content filter needs the `alt-profanity-check` package: install the app extra "
                "(pip install 'openflamingo-transformers[app]'), or pass --content_filter PATH (a word list) or none"
            ) from error
        self._predict_prob = predict_prob
        self.threshold = threshold

    def is_flagged(self, text: str) -> bool:
        return bool(text.strip()) and float(self._predict_prob([text])[0]) >= self.threshold


def load_content_filter(spec: str) -> ContentFilter | None:
    """`none` -> no filter, `default` -> the profanity classifier, anything else -> a word-list file.

    Raises:
        ValueError: the classifier's package is missing, or the word list cannot be read or is empty.
    """
    if spec == "none":
        return None
    if spec == "default":
        return ProfanityClassifierFilter()
    if not os.path.isfile(spec):
        raise ValueError(f"--content_filter {spec!r} is not a file; give none, default or the path of a word list")
    return WordListFilter.from_file(spec)


class StreamingFilter:
    """Judges a growing answer word by word and returns what may be shown of it.

    Args:
        content_filter: the filter, or None to show everything (still only up to word boundaries while streaming,
            so the page behaves the same with and without a filter).
    """

    def __init__(self, content_filter: ContentFilter | None):
        self.content_filter = content_filter
        self.text = ""
        self.flagged = False

    def _judge(self, text: str) -> str:
        if self.content_filter is not None and self.content_filter.is_flagged(text):
            self.flagged = True
        return FLAGGED_NOTICE if self.flagged else text

    def feed(self, piece: str) -> str:
        """Add a decoded piece; returns the text to show: the judged words up to the last word boundary."""
        if self.flagged:
            return FLAGGED_NOTICE
        self.text += piece
        # Hold back the trailing partial word: a later token may complete it.
        boundary = max((m.end() for m in re.finditer(r"\s", self.text)), default=0)
        return self._judge(self.text[:boundary])

    def finish(self) -> str:
        """The whole answer once generation ended, judged as a whole."""
        return FLAGGED_NOTICE if self.flagged else self._judge(self.text)
