"""The results file in the original's structure, a Markdown table laid out like the model cards, atomic writes."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modeling_flamingo.evaluation.tasks import TASKS

# Row titles of the model cards' tables, and whether the stored score is a fraction shown as a percentage: each task's
# `title` and `percent`.
DISPLAY = {name: (task.title, task.percent) for name, task in TASKS.items()}


class OutputWriteError(OSError):
    """An output file could not be written (a full disk, a read-only folder); the message names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


def _write_temp(path: Path, text: str) -> str:
    """Write `text` to a new temporary file beside `path` (synced to disk) and return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def atomic_write_texts(texts: Mapping[str | os.PathLike, str]) -> None:
    """Write each `{path: text}` through a temporary file in the same folder and a rename: readers never see half a
    file, and a failed or interrupted write leaves every file with its previous content (the renames, which need no
    space, happen only once every temporary file is written).

    Raises:
        OutputWriteError: a file could not be written (e.g. no space left on the device), naming it.
    """
    written: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            path = Path(path)
            try:
                written.append((_write_temp(path, text), path))
            except OSError as err:
                raise OutputWriteError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_texts` of one file."""
    atomic_write_texts({path: text})


def shot_summary(shots: int, trials: Iterable[float]) -> dict[str, Any]:
    """`{shots, trials, mean, stddev}` as the original computes them (numpy nanmean / nanstd)."""
    trials = [float(t) for t in trials]
    values = np.asarray(trials, dtype=np.float64)
    finite = values[~np.isnan(values)]
    mean = float(np.nanmean(values)) if finite.size else math.nan
    std = float(np.nanstd(values)) if finite.size else math.nan
    return {"shots": shots, "trials": trials, "mean": mean, "stddev": std}


def markdown_table(results: Mapping[str, list[Mapping[str, Any]]]) -> str:
    """One row per task, one column per shot count, cells `mean (std)` with one decimal, as in the model cards.
    ImageNet accuracy and Hateful Memes ROC AUC, stored as fractions like the original does, are shown in percent."""
    shots = sorted({entry["shots"] for entries in results.values() for entry in entries})
    lines = [
        "| Benchmark | " + " | ".join(f"{s}-shot" for s in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for name, entries in results.items():
        title, percent = DISPLAY.get(name, (name, False))
        by_shot = {entry["shots"]: entry for entry in entries}
        cells = []
        for s in shots:
            entry = by_shot.get(s)
            if entry is None:
                cells.append("")
                continue
            scale = 100.0 if percent else 1.0
            cells.append(f"{entry['mean'] * scale:.1f} ({entry['stddev'] * scale:.1f})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_path(path: str | os.PathLike) -> Path:
    """The Markdown table beside a results file: `<stem>.md` (`<name>.table.md` for a results file named `*.md`)."""
    path = Path(path)
    return path.with_suffix(".md") if path.suffix != ".md" else path.with_name(path.name + ".table.md")


def read_results(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]] | None:
    """The results of an earlier run in `path` (None if there is no such file).

    Raises:
        ValueError: the file is not a results file in the original's structure.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"--results_file: {path} exists and is not a results file ({err}); move it away.") from err
    valid = isinstance(results, dict) and all(
        isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("shots"), int) for e in entries)
        for entries in results.values()
    )
    if not valid:
        raise ValueError(f"--results_file: {path} exists and is not a results file ({{task: [{{shots, ...}}]}}).")
    return results


def merge_results(
    previous: Mapping[str, list[Mapping[str, Any]]] | None, new: Mapping[str, list[Mapping[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """`previous` with each (task, shots) entry of `new` in place of its own: nothing else is dropped. Tasks keep
    their order of first appearance, entries are sorted by shot count."""
    merged = {task: {e["shots"]: dict(e) for e in entries} for task, entries in (previous or {}).items()}
    for task, entries in new.items():
        merged.setdefault(task, {}).update({e["shots"]: dict(e) for e in entries})
    return {task: [by_shot[s] for s in sorted(by_shot)] for task, by_shot in merged.items()}


def write_results(path: str | os.PathLike, results: Mapping[str, list[Mapping[str, Any]]]) -> Path:
    """Write the JSON results (the original's layout) and its Markdown table beside it, both or neither; returns the
    Markdown path."""
    markdown = markdown_path(path)
    atomic_write_texts({path: json.dumps(results, indent=2) + "\n", markdown: markdown_table(results)})
    return markdown
