"""Two processes (`accelerate launch`, gloo on the CPU) give the results file of one process: the plan is drawn
whole on every process, split by whole batches, and the predictions are gathered before scoring. Each process logs
the prompts of its own model calls (a wrapper script written by the test), so rank 0 computing everything fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from eval_data import cli_flags, make_hateful_memes, make_vqa, tiny_model_folder

from modeling_flamingo.evaluation.__main__ import main

from dist_helpers import free_port

# Runs the CLI with FlamingoEvalModel's two model calls logged, one JSON line of prompts per call, to calls.rank<r>.
COUNTING_MAIN = """
import json, os, sys
from modeling_flamingo.evaluation.__main__ import main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel
log = open(os.path.join(sys.argv.pop(1), "calls.rank" + os.environ["RANK"]), "a")
def logged(inner):
    def wrapped(self, batch_text, *args, **kwargs):
        log.write(json.dumps(list(batch_text)) + "\\n")
        log.flush()
        return inner(self, batch_text, *args, **kwargs)
    return wrapped
for name in ("generate", "rank_classifications"):
    setattr(FlamingoEvalModel, name, logged(getattr(FlamingoEvalModel, name)))
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_match_one(tmp_path):
    folder, _, _ = tiny_model_folder(tmp_path)
    paths = {**make_hateful_memes(tmp_path / "data"), **make_vqa(tmp_path / "data", "vizwiz")}
    # 5 items in batches of 2: process 0 gets batches 0 and 2, process 1 batch 1.
    args = ["--model", str(folder), "--eval_vizwiz", "--eval_hateful_memes", *cli_flags(paths), "--shots", "0", "2"]
    args += ["--num_samples", "5", "--batch_size", "2", "--query_set_size", "8"]
    # One intra-op thread, as each launched process has (OMP_NUM_THREADS=1): another thread count may sum the same
    # products in another order, which moves the class log-likelihoods in their last bits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args + ["--results_file", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    (tmp_path / "counting_main.py").write_text(COUNTING_MAIN)
    launch += ["--main_process_port", str(free_port()), str(tmp_path / "counting_main.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        launch + args + ["--results_file", str(tmp_path / "two.json")], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("2-shot seed 42:") == 2  # the main process alone reports each trial (2 tasks)
    # Each rank's share, 4 trials (2 tasks x 2 shots): rank 0 batches 0 and 2 (2 + 1 items), rank 1 batch 1 (2).
    calls = [[json.loads(line) for line in (tmp_path / f"calls.rank{r}").open()] for r in (0, 1)]
    assert [len(batch) for batch in calls[0]] == [2, 1] * 4 and [len(batch) for batch in calls[1]] == [2] * 4

    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert (tmp_path / "two.md").read_text() == (tmp_path / "one.md").read_text()
    one = sorted((tmp_path / "one" / "predictions").iterdir())
    two = sorted((tmp_path / "two" / "predictions").iterdir())
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 4  # no per-process files left behind
    for a, b in zip(one, two, strict=True):
        assert a.read_text() == b.read_text()
