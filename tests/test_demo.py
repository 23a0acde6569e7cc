"""The README's demo command keeps working, keeps what it made, and prints commands that can be pasted."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from modeling_flamingo.demo import DEFAULT_OUTPUT_DIR, MARKER, main


def _echoed_commands(out: str) -> list[list[str]]:
    return [shlex.split(line.strip()[2:]) for line in out.splitlines() if line.strip().startswith("$ ")]


def test_demo_converts_generates_and_keeps_its_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "max logit difference: 0.00e+00" in out
    assert "demo finished" in out
    folder = tmp_path / DEFAULT_OUTPUT_DIR
    converted = folder / "converted"
    assert (converted / "model.safetensors").is_file()  # kept after the demo ends
    assert str(converted) in out

    convert, use = _echoed_commands(out)
    assert convert[:3] == [sys.executable, "-m", "modeling_flamingo.convert"]
    assert convert[convert.index("--output-dir") + 1] == str(converted)
    # The last command is pasteable as printed: it loads the kept folder and generates.
    result = subprocess.run(use, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("[")

    # A rerun replaces the demo's own output.
    (folder / "stale.txt").write_text("from the previous run")
    assert main([]) == 0
    assert not (folder / "stale.txt").exists() and (converted / "model.safetensors").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["--output-dir", str(mine)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {mine} is not empty and was not written by this demo")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--output-dir", str(a_file)]) == 2
    assert a_file.read_text() == "x"


def test_an_empty_or_marked_folder_is_used(tmp_path):
    from modeling_flamingo.demo import prepare_output_dir

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_output_dir(empty)
    assert (empty / MARKER).is_file()
    (empty / "old").mkdir()
    prepare_output_dir(empty)  # marked: the demo's own, replaced
    assert sorted(p.name for p in empty.iterdir()) == [MARKER]
    with pytest.raises(ValueError, match="choose another --output-dir"):
        prepare_output_dir(tmp_path)  # holds "empty", no marker
