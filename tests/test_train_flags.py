"""The training command line against the original's: every flag of the installed `open_flamingo` 2.0.1
`open_flamingo/train/train.py` (read with `ast`, never imported) and of the repository head is accepted with its kind
and meaning, or refused with a message saying where its setting lives; `--vision_encoder_pretrained` picks the HF CLIP
of the original's open_clip tower, and `--save_checkpoints_to_wandb` puts the checkpoints into the W&B run. Also what
a run prints and records of itself: the epoch each step belongs to (log line and trainer_state.json), and a last line
with where its exports and last checkpoint are."""

from __future__ import annotations

import ast
import glob
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from train_data_helpers import make_laion_shards

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.training import FlamingoTrainer, TrainerState
from modeling_flamingo.training.cli import _MOVED_FLAGS, build_parser, parse_args

from train_helpers import (
    batches,
    fresh_accelerate_state,
    loader_factory,
    offline_wandb_env,
    tiny_model,
    tiny_processor,
    train_args,
)


def original_train_flags(source: str) -> dict[str, dict]:
    """flag -> {"store_true": bool, "default": ..., "type": name or None, "choices": [...] or None} for every
    `parser.add_argument("--flag", ...)` call of a train.py source."""
    flags = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        for name in (a.value for a in node.args if isinstance(a, ast.Constant)):
            flags[name] = {
                "store_true": ast.literal_eval(keywords["action"]) == "store_true" if "action" in keywords else False,
                "default": ast.literal_eval(keywords["default"]) if "default" in keywords else None,
                "type": keywords["type"].id if "type" in keywords else None,
                "choices": ast.literal_eval(keywords["choices"]) if "choices" in keywords else None,
            }
    return flags


def _installed_original_train_py() -> Path:
    spec = importlib.util.find_spec("open_flamingo")  # locates the package without importing it
    return Path(spec.submodule_search_locations[0]) / "train" / "train.py"


ORIGINAL_VERSION = importlib.metadata.version("open_flamingo")
ORIGINAL_FLAGS = original_train_flags(_installed_original_train_py().read_text())

# The flags mlfoundations/open_flamingo's main branch added to open_flamingo/train/train.py after 2.0.1, read at the
# head of main, commit 655f693fbfa04cd6e9a987d960654624d48917cf (2023-10-11): none. train.py was last changed in
# 5c90779 ("OpenFlamingo v2", the 2.0.x code); the commits after the 2.0.1 tag touch data.py, train_utils.py and the
# evaluation only. Kept as a list so that a later head's additions are checked the same way.
HEAD_EXTRA_FLAGS: dict[str, dict] = {}

# The original's own rule: `save_checkpoints_to_wandb requires report_to_wandb` (a ValueError in its train.py).
NEEDS = {"--save_checkpoints_to_wandb": ["--report_to_wandb"]}
# The original's default tower, open_clip's ViT-L-14 with OpenAI's weights, is transformers'
# openai/clip-vit-large-patch14 (the same weights, docs/conversion.md).
MAPPED = {("--vision_encoder_path", "ViT-L-14"): "openai/clip-vit-large-patch14"}
BASE = ["--model", "some/model", "--laion_shards", "x.tar"]


def _sample_value(flag: str, spec: dict, tmp_path: Path) -> str:
    if flag == "--resume_from_checkpoint":
        return str(tmp_path)  # must be a folder
    if spec["choices"]:
        return spec["choices"][0]
    if spec["default"] is not None:
        return str(spec["default"])
    return {"int": "3", "float": "0.5"}.get(spec["type"], "value")


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_installed_original_is_2_0_1_and_its_flags_were_read():
    assert ORIGINAL_VERSION == "2.0.1"
    # Spot checks of the reader on three kinds of flags of that file.
    assert ORIGINAL_FLAGS["--no-set-device-rank"]["store_true"]
    assert ORIGINAL_FLAGS["--vision_encoder_pretrained"] == {
        "store_true": False, "default": "openai", "type": "str", "choices": None,
    }  # fmt: skip
    assert ORIGINAL_FLAGS["--precision"]["choices"] == ["amp_bf16", "amp_bfloat16", "bf16", "fp16", "fp32"]


@pytest.mark.parametrize("flag", sorted({**ORIGINAL_FLAGS, **HEAD_EXTRA_FLAGS}))
def test_every_flag_of_the_original_is_accepted_with_its_kind_or_mapped(flag, tmp_path, capsys):
    spec = {**ORIGINAL_FLAGS, **HEAD_EXTRA_FLAGS}[flag]
    value = [] if spec["store_true"] else [_sample_value(flag, spec, tmp_path)]
    if flag in _MOVED_FLAGS:
        message = _error([*BASE, flag, *value], capsys)
        assert (
            message
            == f"error: {flag} is set in the accelerate config here: {_MOVED_FLAGS[flag]} (see docs/training.md)"
        )
        return
    action = build_parser()._option_string_actions[flag]
    args = parse_args([*BASE, *NEEDS.get(flag, []), flag, *value])
    if spec["store_true"]:
        assert action.nargs == 0 and getattr(args, action.dest) is True
        assert getattr(parse_args(BASE), action.dest) is False
        return
    assert action.nargs is None  # takes exactly one value, as argparse's default in the original
    expected = MAPPED.get((flag, value[0]), value[0])
    assert getattr(args, action.dest) == (action.type(expected) if action.type else expected)
    for choice in spec["choices"] or []:
        assert getattr(parse_args([*BASE, flag, choice]), action.dest) == choice
    assert "expected one argument" in _error([*BASE, flag], capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "openai/clip-vit-large-patch14"),
        (["--vision_encoder_path", "ViT-L-14"], "openai/clip-vit-large-patch14"),
        (
            ["--vision_encoder_path", "ViT-L-14", "--vision_encoder_pretrained", "openai"],
            "openai/clip-vit-large-patch14",
        ),
        (["--vision_encoder_path", "/models/clip", "--vision-encoder-pretrained", "openai"], "/models/clip"),
        (
            ["--vision_encoder_path", "ViT-L-14", "--vision_encoder_pretrained", "laion2b_s32b_b82k"],
            "error: --vision_encoder_path ViT-L-14 --vision_encoder_pretrained laion2b_s32b_b82k: no transformers CLIP",
        ),
        (
            ["--vision_encoder_path", "/models/clip", "--vision_encoder_pretrained", "laion2b_s32b_b82k"],
            "error: --vision_encoder_pretrained laion2b_s32b_b82k names open_clip weights, but --vision_encoder_path",
        ),
    ],
)
def test_vision_encoder_pretrained_picks_the_hf_clip_of_the_original_tower(argv, expected, capsys):
    if expected.startswith("error:"):
        assert _error([*BASE, *argv], capsys).startswith(expected)
    else:
        assert parse_args([*BASE, *argv]).vision_encoder_path == expected


def test_save_checkpoints_to_wandb_needs_report_to_wandb(capsys):
    message = _error([*BASE, "--save_checkpoints_to_wandb"], capsys)
    assert message == "error: --save_checkpoints_to_wandb needs --report_to_wandb (or --report_to wandb)"
    assert parse_args([*BASE, "--save-checkpoints-to-wandb", "--report_to", "wandb"]).save_checkpoints_to_wandb


def test_cli_saves_checkpoints_to_an_offline_wandb_run(tmp_path):
    """As the original's `wandb.save` of each checkpoint: every checkpoint folder and checkpoint.pt land in the W&B
    run's files, named as in the run folder, with the bytes they had when saved."""
    model, tokenizer = tiny_model()
    processor = tiny_processor(tokenizer)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    laion = make_laion_shards(tmp_path / "laion", num_shards=2, samples_per_shard=3)
    run = tmp_path / "run"
    env = offline_wandb_env(tmp_path)
    command = [
        sys.executable, "-m", "modeling_flamingo.training", "--model", str(tmp_path / "model"),
        "--laion_shards", laion, "--run_name", str(run), "--offline", "--report_to_wandb", "--save_checkpoints_to_wandb",
        "--batch_size_laion", "2", "--train_num_samples_laion", "4", "--workers", "0", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--logging_steps", "0", "--checkpointing_steps", "1", "--max_steps", "2",
    ]  # fmt: skip
    # W&B's service sockets need a short TMPDIR (see test_train_logging).
    with tempfile.TemporaryDirectory(prefix="wb") as short_tmp:
        env["TMPDIR"] = short_tmp
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (files,) = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*" / "files"))
    files = Path(files)
    for step in (1, 2):
        saved = sorted(p.relative_to(run) for p in (run / f"checkpoint_{step}").rglob("*") if p.is_file())
        assert saved and sorted(p.relative_to(files) for p in (files / f"checkpoint_{step}").rglob("*")) == saved
        for name in saved:
            assert (files / name).read_bytes() == (run / name).read_bytes(), name
    assert (files / "checkpoint.pt").read_bytes() == (run / "checkpoint.pt").read_bytes()


def _train(run: Path, data, **overrides) -> FlamingoTrainer:
    args = train_args(
        **{"learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 1, "run_name": str(run), **overrides}
    )
    with fresh_accelerate_state():
        trainer = FlamingoTrainer(args, tiny_model()[0], None, loader_factory(*data))
        trainer.train()
    return trainer


def _logged_epochs(out: str) -> list[tuple[int, int]]:
    return [(int(step), int(epoch)) for step, epoch in re.findall(r"^step (\d+)/\d+ \(epoch (\d+)\)", out, re.M)]


def test_log_and_trainer_state_name_the_epoch_of_each_step(tmp_path, capsys):
    _, tokenizer = tiny_model()
    data = batches(tokenizer, 2)  # two steps per epoch
    run = tmp_path / "run"
    _train(run, data, num_epochs=2)
    assert _logged_epochs(capsys.readouterr().out) == [(1, 0), (2, 0), (3, 1), (4, 1)]
    # The end of epoch 0: its last step, and the data position already at the start of epoch 1.
    state = json.loads((run / "checkpoint_2" / "trainer_state.json").read_text())
    assert state == {
        "epoch": 1, "batches_done": 0, "global_step": 2, "skipped_steps": 0, "last_step_epoch": 0,
        "consecutive_skipped_steps": 0,
    }  # fmt: skip

    # A checkpoint written before the new fields (the first four only) resumes, with the epoch of its last step.
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoint_2", old / "checkpoint_2")
    legacy = {k: state[k] for k in ("epoch", "batches_done", "global_step", "skipped_steps")}
    (old / "checkpoint_2" / "trainer_state.json").write_text(json.dumps(legacy, indent=2) + "\n")
    resumed = _train(old, data, num_epochs=2, logging_steps=100)
    assert resumed.state == TrainerState(
        epoch=2, batches_done=0, global_step=4, skipped_steps=0, last_step_epoch=1, consecutive_skipped_steps=0
    )
    assert TrainerState.from_dict(legacy).last_step_epoch == 0


def test_the_last_line_says_where_the_exports_and_the_last_checkpoint_are(tmp_path, capsys, monkeypatch):
    _, tokenizer = tiny_model()
    monkeypatch.chdir(tmp_path)
    _train(Path("my run"), batches(tokenizer, 2), logging_steps=0)  # a relative --run_name with a space
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"Training done at step 2: model (.+)  original checkpoint (.+)  last checkpoint (.+)", last)
    assert match, last
    # As a shell reads them when pasted: one absolute path each.
    (model,), (checkpoint,), (state,) = (shlex.split(group) for group in match.groups())
    run = tmp_path / "my run"
    assert (Path(model), Path(checkpoint), Path(state)) == (run / "model", run / "checkpoint.pt", run / "checkpoint_2")
    assert isinstance(FlamingoForConditionalGeneration.from_pretrained(model), FlamingoForConditionalGeneration)
    assert "perceiver.latents" in torch.load(checkpoint, weights_only=True)
    assert json.loads((Path(state) / "trainer_state.json").read_text())["global_step"] == 2
