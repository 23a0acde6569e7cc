"""The generation benchmark still runs end to end (nothing is timed or compared against a speed here): one small cell,
both implementations, the language model alone, the CPU peak-memory child process, and the results file."""

from __future__ import annotations

import importlib.util
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
