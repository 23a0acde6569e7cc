"""The generation benchmark still runs end to end (nothing is timed or compared against a speed here): one small cell,
both implementations, the language model alone, the CPU peak-memory child process, and the results file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_eval_benchmark_runs_one_cell(tmp_path, monkeypatch):
    """The evaluation benchmark end to end on one tiny cell (2 test items, 1 shot) with `--device cpu`: both
    harnesses (the original's inputs sent to the device given, every clock read through the synchronising timer), the
    comparison of their predictions, the CIDEr of each, the time split, and its section of the results file."""
    spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "benchmarks" / "bench_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    devices = {"original inputs": set(), "clocks": set()}
    prepare = bench.OriginalEvalModel._prepare_images

    def recording_prepare(self, batch):
        pixels = prepare(self, batch)
        devices["original inputs"].add(pixels.device)
        return pixels

    monkeypatch.setattr(bench.OriginalEvalModel, "_prepare_images", recording_prepare)
    now, clock_readers = bench.now, set()

    def recording_now(device):
        devices["clocks"].add(device)
        clock_readers.add(sys._getframe(1).f_code.co_name)
        return now(device)

    monkeypatch.setattr(bench, "now", recording_now)
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n## Load time\n\nkept\n")
    args = ["--shots", "1", "--num-samples", "2", "--query-set-size", "4", "--batch-size", "2", "--repeats", "1"]
    assert bench.main([*args, "--tasks", "captioning", "--device", "cpu", "--out", str(out)]) == 0

    assert devices == {"original inputs": {torch.device("cpu")}, "clocks": {torch.device("cpu")}}
    assert clock_readers == {"measure_cell", "pre", "post"}  # the trial's clock and the forward hooks' clocks
    text = out.read_text()
    assert "## Load time\n\nkept" in text  # other sections survive
    assert text.count("## Evaluation: captioning `scaled9b` (cpu, fp32)") == 1
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


def test_eval_benchmark_runs_classification(tmp_path):
    """The classification benchmark end to end at tiny sizes (Hateful Memes and the first 5 ImageNet names, 2 test
    items, 1 shot): both harnesses on their cached paths, every class log-likelihood compared, the score of each,
    the time split, the machine's load, and its own section of the results file (the captioning one is kept)."""
    bench = _load("bench_eval")
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmarks\n\n## Evaluation: captioning\n\nkept\n")
    args = ["--tasks", "classification", "--classification-shots", "1", "--classification-samples", "2"]
    args += ["--imagenet-classes", "5", "--query-set-size", "2", "--batch-size", "2", "--repeats", "1"]
    assert bench.main([*args, "--out", str(out)]) == 0

    text = out.read_text()
    assert "## Evaluation: captioning\n\nkept" in text
    assert text.count("## Evaluation: classification") == 1
    assert "1-minute load average" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    (header, *speed_rows), (split_header, *split_rows) = rows[:3], rows[3:]
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in speed_rows}
    assert sorted(cells) == ["hateful_memes", "imagenet"]
    assert (cells["hateful_memes"]["classes"], cells["imagenet"]["classes"]) == ("2", "5")
    for task, row in cells.items():
        assert (row["shots"], row["batch"], row["test items"]) == ("1", "2", "2"), task
        assert row["same scores"] == "yes", task  # every item's class log-likelihoods within 1e-4, same AUC / accuracy
        assert float(row["max log-likelihood difference"]) <= 1e-4, task
        assert row["AUC / accuracy (orig)"] == row["AUC / accuracy (ours)"], task
        assert float(row["items/s (orig)"]) > 0 and float(row["items/s (ours)"]) > 0, task
    split = {(row[0], row[1]): dict(zip(split_header, row, strict=True)) for row in split_rows}
    assert len(split) == 4
    # The original encodes every image of every prompt (2 items x 2 images); ours each distinct image once.
    assert int(split["imagenet", "original"]["images encoded"]) == 4
    assert int(split["imagenet", "ours"]["images encoded"]) <= 3
    # The original feeds the tokens of multi-token class names one forward at a time from the prompts' cache.
    assert float(split["imagenet", "original"]["LM on class names s"]) > 0


def _load(name: str):
    """A benchmark script as a module (registered in `sys.modules`, where its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _machine_module():
    return _load("_machine")


class FakeClock:
    """A load-average sequence, one reading per call, and a clock that `sleep` advances (nothing really sleeps)."""

    def __init__(self, loads: list[float]):
        self.loads, self.now, self.sleeps = list(loads), 0.0, []

    def loadavg(self):
        load = self.loads.pop(0) if len(self.loads) > 1 else self.loads[0]
        return (load, load, load)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _check(machine, fake: FakeClock, wait: float):
    return machine.check_load(
        wait, 0.5, poll_s=10, loadavg=fake.loadavg, sleep=fake.sleep, clock=lambda: fake.now, cpus=4
    )


def test_load_guard_measures_at_once_on_a_quiet_machine(capsys):
    machine = _machine_module()
    fake = FakeClock([1.5])  # below 0.5 per core on 4 cores
    load = _check(machine, fake, wait=60)
    assert (load.busy, load.threshold, load.waited_s, fake.sleeps) == (False, 2.0, 0.0, [])
    assert capsys.readouterr().err == ""
    load.finish(lambda: (3.0, 2.0, 1.0))
    assert load.describe() == "4 cores, 1-minute load average 1.50 at the start, 3.00 at the end (busy above 2.00)"


def test_load_guard_waits_for_the_machine_to_become_quiet(capsys):
    machine = _machine_module()
    fake = FakeClock([3.0, 2.5, 1.0])  # busy for two readings, then quiet
    load = _check(machine, fake, wait=60)
    assert fake.sleeps == [10, 10]
    assert (load.busy, load.start[0], load.waited_s) == (False, 1.0, 20)
    assert capsys.readouterr().err == ""
    assert "waited 20 s" in load.describe() and "busy machine" not in load.describe()


def test_load_guard_warns_when_still_busy_and_says_so_in_the_results(capsys):
    machine = _machine_module()
    fake = FakeClock([3.0])
    load = _check(machine, fake, wait=25)  # waits at most 25 s: 10 + 10 + 5
    assert fake.sleeps == [10, 10, 5]
    assert load.busy and load.waited_s == 25
    err = capsys.readouterr().err
    assert err.startswith("warning: the machine is busy after waiting 25 s: 1-minute load average 3.00 on 4 cores")
    assert "measured on a busy machine" in load.describe()

    fake = FakeClock([3.0])
    assert _check(machine, fake, wait=0).busy and fake.sleeps == []  # the default: warn, do not wait
    assert "warning: the machine is busy: 1-minute" in capsys.readouterr().err


def test_gpu_script_dry_run(tmp_path):
    """`benchmarks/gpu/run.sh --dry-run` runs every GPU part on the CPU at tiny sizes and writes one results file
    with a section per part, so the script is known to work before GPU time is spent (the numbers mean nothing):
    MPT's eager decode rows, compiled against eager decode on the LLaMA twin (MPT cannot be compiled whole), and the
    evaluation and training benchmarks (`--device cpu` where the GPU run gives `--device cuda`)."""
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
    assert "## bf16 numerics" in text and "## 9B shapes: MPT" in text and "## 9B shapes: compiled decoding" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    numerics = {row[0]: row for row in rows if row[0].startswith("ours bf16 /")}
    # In fp32 on the CPU both comparisons are of the same computation: full top-1 agreement, the same tokens.
    assert [row[1] for row in numerics.values()] == ["1.0000", "1.0000"]
    assert [row[3] for row in numerics.values()] == ["yes", "yes"]
    decode = {(row[0], row[1], row[2]): row for row in rows if row[1] in ("eager", "compiled")}
    assert sorted(decode) == [
        ("LLaMA twin", "compiled", "1"),
        ("LLaMA twin", "compiled", "8"),
        ("LLaMA twin", "eager", "1"),
        ("LLaMA twin", "eager", "8"),
        ("MPT", "eager", "1"),
        ("MPT", "eager", "8"),
    ]
    assert all(float(row[4]) > 0 for row in decode.values()), decode  # tokens/s: numbers, not nan
    # The compiled decoding step gives eager's greedy tokens.
    assert all(row[8] == "yes" for key, row in decode.items() if key[0] == "LLaMA twin"), decode
    assert 'device_map="auto"' in text
    # The evaluation and training benchmarks' command lines, on the device the dry run gives them.
    assert "## Evaluation: captioning `scaled9b` (cpu, fp32)" in text
    assert "## Training step: `tiny` (cpu, float32)" in text


def test_train_benchmark_runs_on_the_device_given(tmp_path, monkeypatch):
    """`bench_train.py --device cpu` at the tiny size: both loops run on that device (the original's batches read
    onto the `device_id` its loop is given, Accelerate kept on the CPU even where a GPU would be visible), the clocks
    read through the synchronising timer, and the section names the device."""
    bench = _load("bench_train")
    placements = {}
    original_loop = bench.train_utils.train_one_epoch

    def recording_loop(**kwargs):
        placements["original"] = (kwargs["device_id"], next(kwargs["model"].parameters()).device)
        return original_loop(**kwargs)

    monkeypatch.setattr(bench.train_utils, "train_one_epoch", recording_loop)
    trainer_init = bench.FlamingoTrainer.__init__

    def recording_init(self, *args, **kwargs):
        placements["accelerate_env"] = os.environ.get("ACCELERATE_USE_CPU")
        trainer_init(self, *args, **kwargs)
        placements["ours"] = (self.accelerator.device, next(self.model.parameters()).device)

    monkeypatch.setattr(bench.FlamingoTrainer, "__init__", recording_init)
    timed = []
    timed_steps = bench.timed_steps
    monkeypatch.setattr(
        bench, "timed_steps", lambda loop, n, device: timed.append(device) or timed_steps(loop, n, device)
    )
    out = tmp_path / "RESULTS.md"
    args = ["--size", "tiny", "--device", "cpu", "--batch-laion", "1", "--batch-mmc4", "1", "--steps", "1"]
    assert bench.main([*args, "--repeats", "1", "--out", str(out)]) == 0

    cpu = torch.device("cpu")
    assert placements == {"original": (cpu, cpu), "accelerate_env": "true", "ours": (cpu, cpu)}
    assert timed == [cpu, cpu]  # one timed run per implementation
    text = out.read_text()
    assert "## Training step: `tiny` (cpu, float32)" in text
    row = [line for line in text.splitlines() if line.startswith("| 1 + 1 |")]
    assert len(row) == 1 and all(float(c.strip().rstrip("x")) > 0 for c in row[0].strip("|").split("|")[1:])


@pytest.mark.parametrize("script", ["bench_eval", "bench_train"])
def test_benchmark_device_without_cuda_is_one_error_line(script, capsys, monkeypatch):
    """`--device cuda` where torch sees no GPU (as on CI), or a device the benchmarks do not run on, stops with one
    line naming the flag, before any model is built."""
    bench = _load(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, wherever the test runs
    for device, expected in (("cuda", "torch sees no CUDA device here"), ("mps", "use cpu or cuda")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--device", device])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"--device {device}: {expected}" in err and "Traceback" not in err
