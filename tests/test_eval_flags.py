"""`openflamingo-eval`'s flags: every value is checked before the model is loaded, `--help` shows the defaults, and
every flag of the original `evaluate.py` (2.0.1, read from the installed package) is accepted with its kind."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from eval_data import cli_flags, make_coco, make_vqa

from modeling_flamingo.evaluation.__main__ import build_parser, main
from modeling_flamingo.evaluation.eval_model import FlamingoEvalModel


@pytest.fixture
def model_loads(monkeypatch):
    """Counts model loads; a load fails (the model path of these tests does not exist anyway)."""
    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise OSError("model loading reached")

    monkeypatch.setattr(FlamingoEvalModel, "from_pretrained", record)
    return calls


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, make_coco(root)  # 10 train and 6 test items


def run(root: Path, paths: dict[str, str], *argv: str) -> int:
    return main(
        ["--model", str(root / "no-model"), "--results_file", str(root / "r.json"), "--eval_coco"]
        + [*cli_flags(paths), "--query_set_size", "6", "--shots", "2", *argv]
    )


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shots", "0", "-1"], "--shots -1: a number of demonstrations is 0 or more."),
        (["--batch_size", "0"], "--batch_size 0: must be 1 or more."),
        (["--num_samples", "0"], "--num_samples 0: give the number of test items per trial (1 or more), or -1"),
        (["--num_samples", "-2"], "--num_samples -2: give the number of test items per trial"),
        (["--num_samples", "7"], "--num_samples 7 is larger than the coco test split (6 items)."),
        (["--num_trials", "0"], "--num_trials 0: must be 1 or more."),
        (["--query_set_size", "0"], "--query_set_size 0: must be 1 or more."),
        (["--query_set_size", "11"], "--query_set_size 11 is larger than the coco train split (10 items)."),
        (["--shots", "8"], "--shots: 8 demonstrations cannot be drawn from a query set of 6 (--query_set_size)"),
        (["--rices", "--shots", "12"], "--shots: 12 demonstrations cannot be retrieved from the coco train split"),
        (["--class_batch_size", "0"], "--class_batch_size 0: must be 1 or more."),
        (["--latents_cache_mb", "-1"], "--latents_cache_mb -1: must be 0 (no cache) or more."),
        (["--max_image_pixels", "0"], "--max_image_pixels 0: must be 1 or more."),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_values_are_refused_before_the_model_loads(coco, capsys, model_loads, argv, message):
    root, paths = coco
    assert run(root, paths, *argv) == 1
    assert one_error_line(capsys).startswith(f"error: {message}")
    assert model_loads == []
    assert not (root / "r.json").exists()


def test_query_set_size_checked_for_every_selected_task(tmp_path, capsys, model_loads):
    """The split sizes of all selected tasks are checked before any model load; the message names the task."""
    coco_paths = make_coco(tmp_path)  # 10 train items
    vqa_paths = make_vqa(tmp_path, "vqav2", num_train=5)
    argv = ["--model", str(tmp_path / "no-model"), "--eval_coco", "--eval_vqav2", "--query_set_size", "8"]
    argv += ["--shots", "4"]
    assert main([*argv, *cli_flags(coco_paths), *cli_flags(vqa_paths)]) == 1
    assert one_error_line(capsys) == "error: --query_set_size 8 is larger than the vqav2 train split (5 items)."
    assert model_loads == []


def test_valid_values_reach_the_model(coco, capsys, model_loads):
    """The checks refuse nothing that is allowed: the boundary values go on to load the model."""
    root, paths = coco
    argv = ["--shots", "0", "2", "--batch_size", "1", "--num_samples", "-1", "--query_set_size", "10"]
    argv += ["--class_batch_size", "1", "--latents_cache_mb", "0", "--max_image_pixels", "1"]
    assert run(root, paths, *argv) == 1
    assert "model loading reached" in one_error_line(capsys)
    assert len(model_loads) == 1


# ---------------------------------------------------------------------------------------------------------------
# --help


def test_help_shows_every_default(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps long words at hyphens
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    # One entry per flag: its spellings, then its help, wrapped over lines.
    entries = {("-" + entry).split()[0].rstrip(","): " ".join(entry.split()) for entry in options.split("\n  -")}
    for flag, default in {
        "--shots": "[0, 4, 8, 16, 32]",
        "--num_trials": "1",
        "--trial_seeds": "[42]",
        "--num_samples": "-1",
        "--query_set_size": "2048",
        "--batch_size": "8",
        "--precision": "fp32",
        "--latents_cache_mb": "2048",
        "--class_batch_size": "64",
        "--max_image_pixels": "50000000",
        "--zero_shot_classification_images": "original",
        "--rices_vision_encoder_path": "openai/clip-vit-large-patch14",
    }.items():
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]
    assert "default" not in entries["--rices"]  # a switch is off unless given


# ---------------------------------------------------------------------------------------------------------------
# The original's flags

# Flags that mlfoundations/open_flamingo's main branch added to `open_flamingo/eval/evaluate.py` after 2.0.1: read at
# the head commit 655f693fbfa04cd6e9a987d960654624d48917cf (2023-10-11). Between the 2.0.1 tag and that commit only
# `open_flamingo/eval/rices.py` changed under `open_flamingo/eval/`; its `evaluate.py` is 2.0.1's, so none.
HEAD_ADDED_FLAGS: dict[str, str] = {}


def original_flags() -> dict[str, bool]:
    """`{flag: takes_a_value}` of every `add_argument` call of the installed original's `eval/evaluate.py`."""
    spec = importlib.util.find_spec("open_flamingo")
    source = Path(spec.origin).parent / "eval" / "evaluate.py"
    flags = {}
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            action = keywords.get("action")
            for name in node.args:
                flags[name.value] = not (isinstance(action, ast.Constant) and action.value == "store_true")
    return flags


def test_every_flag_of_the_original_is_accepted_with_its_kind():
    flags = original_flags()
    assert len(flags) == 61 and flags["--shots"] and not flags["--rices"]  # the parse found 2.0.1's list
    parser = build_parser()
    actions = parser._option_string_actions
    for flag, takes_value in {**flags, **dict.fromkeys(HEAD_ADDED_FLAGS, True)}.items():
        assert flag in actions, f"{flag} of the original is not accepted"
        action = actions[flag]
        assert (action.nargs != 0) == takes_value, f"{flag}: a switch in one, a value in the other"
        value = ["3"] if takes_value else []
        if flag == "--model":  # the original's model family name; ours is the model itself
            continue
        args = parser.parse_args(["--model", "m", flag, *value])
        expected = action.type("3") if action.type else "3"
        parsed = getattr(args, action.dest)
        assert parsed == ([expected] if action.nargs == "+" else expected if takes_value else True), flag
