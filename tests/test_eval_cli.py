"""Every task end to end through the CLI on a tiny converted model and tiny datasets in their real file layouts.

Checks what a user gets: the results file in the original's structure, the Markdown table beside it, and the
per-item predictions (items, demonstrations, prompts, references, scores) from which the score can be recomputed.
"""

from __future__ import annotations

import json

import pytest
from eval_data import cli_flags, make_all, tiny_model_folder

from modeling_flamingo.evaluation import metrics
from modeling_flamingo.evaluation.__main__ import main
from modeling_flamingo.evaluation.datasets import EvalInputError
from modeling_flamingo.evaluation.results import DISPLAY
from modeling_flamingo.evaluation.tasks import TASKS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder, _, _ = tiny_model_folder(root)
    return root, folder, make_all(root / "data")


def _okvqa_stemmer_available() -> bool:
    try:
        metrics.check_okvqa_stemmer()
    except metrics.MissingDependencyError:
        return False
    return True


# ImageNet scores all 1000 class names for every item: one shot count and two items keep it short on a CPU.
SETTINGS = {name: (["0", "4"], 4) for name in TASKS}
SETTINGS["imagenet"] = (["0"], 2)


@pytest.mark.parametrize("name", list(TASKS))
def test_task_end_to_end(env, name, capsys):
    root, folder, paths = env
    spec = TASKS[name]
    shots, num_samples = SETTINGS[name]
    results_file = root / "runs" / f"{name}.json"
    argv = ["--model", str(folder), f"--{spec.flag}", *cli_flags(paths[name]), "--shots", *shots]
    argv += ["--num_samples", str(num_samples), "--query_set_size", "8", "--batch_size", "3"]
    argv += ["--results_file", str(results_file)]

    if name == "ok_vqa" and not _okvqa_stemmer_available():
        # Without NLTK's tokenizer/tagger data the run stops before loading the model, saying what to install.
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "nltk" in err[0].lower()
        assert not results_file.exists()
        return

    assert main(argv) == 0
    results = json.loads(results_file.read_text())
    assert list(results) == [name]
    assert [entry["shots"] for entry in results[name]] == [int(s) for s in shots]
    table = results_file.with_suffix(".md").read_text()
    title, percent = DISPLAY[name]
    assert table.splitlines()[0] == "| Benchmark | " + " | ".join(f"{s}-shot" for s in shots) + " |"

    loaded = spec.load(_namespace(paths[name]))
    train_ids = {item.id for item in loaded.train}
    test_by_id = {item.id: item for item in loaded.test}
    cells = []
    for entry in results[name]:
        assert len(entry["trials"]) == 1 and entry["mean"] == entry["trials"][0] and entry["stddev"] == 0.0
        scale = 100 if percent else 1
        cells.append(f"{entry['mean'] * scale:.1f} (0.0)")
        n = entry["shots"]
        records = _records(results_file, name, n)
        assert len(records) == num_samples and len({json.dumps(r["id"]) for r in records}) == num_samples
        for record in records:
            item = test_by_id[record["id"]]
            (demos,) = record["demo_ids"]
            assert len(demos) == max(n, 2) and set(demos) <= train_ids and len(set(demos)) == len(demos)
            images_in_prompt = record["prompt"].count("<image>")
            assert images_in_prompt == (n + 1 if n else 1)
            assert record["prompt"].endswith(spec.query_prompt(item))
            assert record["references"] == loaded.references[item.id]
        # The score recomputed from the streamed predictions is the reported one.
        predictions = {r["id"]: r["prediction"] for r in records}
        references = {r["id"]: r["references"] for r in records}
        if spec.kind == "classification":
            predictions = {
                r["id"]: {"label": r["prediction"], "yes_probability": r.get("yes_probability")} for r in records
            }
            assert all(r["prediction"] in spec.class_names for r in records)
        score, per_item = spec.score(predictions, references)
        assert score == pytest.approx(entry["mean"], abs=1e-9)
        assert [r["score"] for r in records] == pytest.approx([per_item[r["id"]] for r in records])
    assert table.splitlines()[2] == f"| {title} | " + " | ".join(cells) + " |"


def _records(results_file, name, shots, seed=42):
    path = results_file.with_suffix("") / "predictions" / f"{name}-{shots}shot-seed{seed}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _namespace(paths):
    import argparse

    from modeling_flamingo.evaluation.__main__ import build_parser

    args = build_parser().parse_args(["--model", "unused", *cli_flags(paths)])
    return argparse.Namespace(**vars(args))


def test_classification_prompt_ensembling_runs(env):
    root, folder, paths = env
    results_file = root / "runs" / "hm-ensemble.json"
    argv = ["--model", str(folder), "--eval_hateful_memes", *cli_flags(paths["hateful_memes"]), "--shots", "2"]
    argv += ["--num_samples", "4", "--query_set_size", "8", "--classification_prompt_ensembling"]
    argv += ["--results_file", str(results_file)]
    assert main(argv) == 0
    records = _records(results_file, "hateful_memes", 2)
    # 2 shots: min(6, 2!) = 2 orderings of the same two demonstrations per item.
    assert all(len(r["demo_ids"]) == 2 and sorted(r["demo_ids"][0]) == sorted(r["demo_ids"][1]) for r in records)


def test_unknown_task_flag_combination_is_refused(env):
    with pytest.raises(EvalInputError, match="No task selected"):
        from modeling_flamingo.evaluation.runner import run_evaluation

        run_evaluation(_namespace({}))


def test_zero_shot_classification_images(env):
    """At 0 shots the demonstration text stays without `<image>`; classification passes the two demonstration images
    by default like the original (the query's `<image>` then sees the first), only the query's with `query`."""
    from modeling_flamingo.evaluation.runner import build_prompt

    _, _, paths = env
    spec = TASKS["hateful_memes"]
    loaded = spec.load(_namespace(paths["hateful_memes"]))
    item = loaded.test[0]
    text, images = build_prompt(spec, loaded, item, [3, 5], 0, "original")
    assert text.count("<image>") == 1 and text.endswith(spec.query_prompt(item))
    assert images == [loaded.train[3], loaded.train[5], item]
    assert build_prompt(spec, loaded, item, [3, 5], 0, "query") == (text, [item])
    caption = TASKS["coco"]
    coco = caption.load(_namespace(paths["coco"]))
    text, images = build_prompt(caption, coco, coco.test[0], [1, 2], 0, "original")
    assert images == [coco.test[0]] and text.count("<image>") == 1 and text.count("<|endofchunk|>\n") == 2
