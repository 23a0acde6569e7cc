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

# Row titles of the model cards' tables, and whether the stored score is a fraction shown as a percentage.
DISPLAY = {
    "coco": ("COCO (CIDEr)", False),
    "flickr30": ("Flickr-30K (CIDEr)", False),
    "vqav2": ("VQAv2 (Accuracy)", False),
    "ok_vqa": ("OK-VQA (Accuracy)", False),
    "textvqa": ("TextVQA (Accuracy)", False),
    "vizwiz": ("VizWiz (Accuracy)", False),
    "imagenet": ("ImageNet (Top-1 Accuracy)", True),
    "hateful_memes": ("Hateful Memes (ROC AUC)", True),
}


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename: readers never see half a
    file, and an interrupted write leaves the previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def write_results(path: str | os.PathLike, results: Mapping[str, list[Mapping[str, Any]]]) -> Path:
    """Write the JSON results (the original's layout) and `<stem>.md` beside it; returns the Markdown path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    markdown = path.with_suffix(".md") if path.suffix != ".md" else path.with_name(path.name + ".table.md")
    atomic_write_text(markdown, markdown_table(results))
    return markdown
