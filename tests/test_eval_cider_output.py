"""CIDEr scoring keeps Java's PTBTokenizer output out of the terminal (where the progress bars are) and reports the
characters it deletes as untokenizable in one warning line, without changing the score."""

from __future__ import annotations

import logging
import os

import pytest

from modeling_flamingo.evaluation.metrics import cider_scores

REFERENCES = {1: ["a dog and a cat on the couch", "two dogs"], 2: ["hello world people", "a red bus"]}
PREDICTIONS = {1: "a dog and cat", 2: "hello red bus"}
# Control characters: PTBTokenizer has no rule for them and deletes them (the scores below show it).
DIRTY_PREDICTIONS = {1: "a dog \x01and \x02cat", 2: "hello red bus"}
DIRTY_REFERENCES = {1: REFERENCES[1], 2: ["hello world \x03 people", "a red bus"]}


def test_java_output_is_captured(capfd, caplog):
    with caplog.at_level(logging.WARNING):
        score = cider_scores(PREDICTIONS, REFERENCES)
    out, err = capfd.readouterr()
    assert "PTBTokenizer" not in out + err and "edu.stanford" not in out + err
    assert caplog.records == []  # nothing was deleted: nothing to report
    assert score[0] > 0


def test_untokenizable_characters_are_counted_once(capfd, caplog):
    with caplog.at_level(logging.WARNING):
        dirty = cider_scores(DIRTY_PREDICTIONS, DIRTY_REFERENCES)
    out, err = capfd.readouterr()
    assert "Untokenizable" not in out + err and "PTBTokenizer tokenized" not in out + err
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert "deleted 3 character(s) it cannot tokenize (2 in the predictions, 1 in the references)" in messages[0]
    assert dirty == cider_scores(PREDICTIONS, REFERENCES)  # deleted, as when the score was java's alone


def test_java_errors_are_still_printed(tmp_path, monkeypatch, capfd):
    """Only the tokenizer's usual lines are held back: a failing java's message reaches the user."""
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: Could not find or load main class (a broken java)' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="different number of lines"):
        cider_scores(PREDICTIONS, REFERENCES)
    assert "Error: Could not find or load main class (a broken java)" in capfd.readouterr().err


def test_java_output_is_printed_when_the_tokenizer_raises(monkeypatch, capfd):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def failing_tokenize(self, captions):
        os.write(2, b"java: what went wrong\n")  # as the java child writes to the descriptor it inherits
        raise OSError("the tokenizer failed")

    monkeypatch.setattr(PTBTokenizer, "tokenize", failing_tokenize)
    with pytest.raises(OSError, match="the tokenizer failed"):
        cider_scores(PREDICTIONS, REFERENCES)
    assert "java: what went wrong" in capfd.readouterr().err
