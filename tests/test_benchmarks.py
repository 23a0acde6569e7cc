"""The generation benchmark still runs end to end (nothing is timed or compared against a speed here): one small cell,
both implementations, the language model alone, the CPU peak-memory child process, and the results file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generation_benchmark_runs_one_cell(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "benchmarks" / "bench_generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n## Load time\n\nkept\n")
    args = ["--shots", "1", "--batch", "2", "--repeats", "1", "--new-tokens", "3", "--out", str(out)]
    assert bench.main(args) == 0

    text = out.read_text()
    assert "## Load time\n\nkept" in text  # other sections survive
    header, row = [line for line in text.splitlines() if line.startswith("| ")][:2]
    names, values = ([c.strip() for c in line.strip("|").split("|")] for line in (header, row))
    cells = dict(zip(names, values, strict=True))
    assert (cells["shots"], cells["batch"]) == ("1", "2")
    assert cells["same tokens"] == "yes"  # greedy tokens of ours equal the original's at the 9B's vocabulary
    for column in ("decode tok/s (orig)", "decode tok/s (ours)", "decode tok/s (LM alone)", "blocks ms/step (ours)"):
        assert float(cells[column]) > 0, column
    assert float(cells["peak MiB (orig)"]) > 0


def test_eval_benchmark_runs_one_cell(tmp_path):
    """The evaluation benchmark end to end on one tiny cell (2 test items, 1 shot): both harnesses, the comparison
    of their predictions, the CIDEr of each, the time split, and its section of the results file."""
    spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "benchmarks" / "bench_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n## Load time\n\nkept\n")
    args = ["--shots", "1", "--num-samples", "2", "--query-set-size", "4", "--batch-size", "2", "--repeats", "1"]
    assert bench.main([*args, "--out", str(out)]) == 0

    text = out.read_text()
    assert "## Load time\n\nkept" in text  # other sections survive
    assert text.count("## Evaluation: captioning") == 1
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    (speed_header, speed_row), (split_header, *split_rows) = rows[:2], rows[2:]
    cells = dict(zip(speed_header, speed_row, strict=True))
    assert (cells["shots"], cells["batch"], cells["test items"]) == ("1", "2", "2")
    assert cells["identical predictions"] == "yes"  # our beam-search captions equal the original harness's
    assert cells["CIDEr (orig)"] == cells["CIDEr (ours)"]
    assert float(cells["items/s (orig)"]) > 0 and float(cells["items/s (ours)"]) > 0
    split = {row[1]: dict(zip(split_header, row, strict=True)) for row in split_rows}
    # The original encodes every image of every prompt once per beam (2 items x 2 images x 3 beams); ours encodes
    # each distinct image once (2 test images and at most 2 demonstrations).
    assert int(split["original"]["images encoded"]) == 12
    assert 3 <= int(split["ours"]["images encoded"]) <= 4
    for harness in ("original", "ours"):
        assert float(split[harness]["LM decode s"]) > 0


def test_gpu_script_dry_run(tmp_path):
    """`benchmarks/gpu/run.sh --dry-run` runs every GPU part on the CPU at tiny sizes and writes one results file
    with a section per part, so the script is known to work before GPU time is spent (the numbers mean nothing)."""
    out = tmp_path / "RESULTS-gpu.md"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert text.startswith("# GPU benchmarks\n") and "run.sh --dry-run" in text
    assert "Failed" not in text and "Not measured" not in text, text  # every part wrote its fragment
    assert "## bf16 numerics" in text and "## 9B shapes" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    numerics = {row[0]: row for row in rows if row[0].startswith("ours bf16 /")}
    # In fp32 on the CPU both comparisons are of the same computation: full top-1 agreement, the same tokens.
    assert [row[1] for row in numerics.values()] == ["1.0000", "1.0000"]
    assert [row[3] for row in numerics.values()] == ["yes", "yes"]
    decode = [row for row in rows if row[0] == "eager"]
    assert [row[1] for row in decode] == ["1", "8"] and all(float(row[3]) > 0 for row in decode)
    assert 'device_map="auto"' in text
