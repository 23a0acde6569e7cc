"""The command line end to end: tiny model folder + tiny LAION and MMC4 shards -> `python -m
modeling_flamingo.training` -> exports that load; a fresh model from its parts; one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_data_helpers import make_laion_shards, make_mmc4_shards

from modeling_flamingo import FlamingoForConditionalGeneration
from modeling_flamingo.demo import write_release_inputs
from modeling_flamingo.testing import make_tiny_tokenizer
from modeling_flamingo.training.cli import main
from modeling_flamingo.training.model_init import build_fresh_flamingo

from train_helpers import tiny_model, tiny_processor

DATA_FLAGS = [
    "--batch_size_laion", "2", "--batch_size_mmc4", "2",
    "--train_num_samples_laion", "4", "--train-num-samples-mmc4", "4",  # `-` or `_`
    "--workers", "0", "--warmup_steps", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, tokenizer = tiny_model()
    processor = tiny_processor(tokenizer)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "parts").mkdir()
    parts = write_release_inputs(model, tokenizer, make_tiny_tokenizer(), root / "parts")
    return {
        "root": root,
        "model": root / "model",
        "parts": parts,
        "laion": make_laion_shards(root / "laion", num_shards=2, samples_per_shard=3),
        "mmc4": make_mmc4_shards(root / "mmc4", num_shards=2, documents_per_shard=3),
    }


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "modeling_flamingo.training", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_trains_on_laion_and_mmc4_shards_and_exports(inputs, tmp_path):
    run = tmp_path / "run"
    result = _cli(
        "--model", inputs["model"], "--laion_shards", inputs["laion"], "--mmc4-shards", inputs["mmc4"],
        "--run_name", run, "--checkpointing_steps", "1", "--loss_multiplier_laion", "0.2", *DATA_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # The last step of the first (0-based) epoch.
    assert "step 2/2 (epoch 0) loss_laion=" in result.stdout and "loss_mmc4=" in result.stdout
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt", "checkpoint_1", "checkpoint_2", "model", "training_run.json",
    ]  # fmt: skip
    trained = FlamingoForConditionalGeneration.from_pretrained(run / "model")
    base = FlamingoForConditionalGeneration.from_pretrained(inputs["model"])
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert moved and all(n.startswith("perceiver.") or "gated_cross_attn" in n or "wte" in n for n in moved)
    assert torch.load(run / "checkpoint.pt", weights_only=True).keys() >= {"perceiver.latents"}


def test_fresh_model_from_parts_has_closed_gates_and_its_language_models_logits(inputs):
    parts = inputs["parts"]
    model, processor = build_fresh_flamingo(str(parts["clip"]), str(parts["language_model"]), None, 1)
    assert all(b.attn_gate.item() == 0 and b.ff_gate.item() == 0 for b in model.gated_cross_attn_layers)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(parts["language_model"])
    rows = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(len(processor.tokenizer))
    embeddings = model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[:rows], lm.get_input_embeddings().weight[:rows], atol=0, rtol=0)
    with torch.no_grad():  # the added tokens' rows are drawn at random by resize_token_embeddings
        lm.get_input_embeddings().weight.copy_(embeddings)
    ids = processor.tokenizer(["<image>A dog runs after a red ball."], return_tensors="pt").input_ids
    pixels = torch.randn(1, 1, 1, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, lm(ids).logits)
    assert processor.image_processor.crop_size["height"] == 42
    assert model.config.media_token_id == processor.media_token_id


def test_cli_init_from_parts_trains_one_step(inputs, tmp_path):
    parts = inputs["parts"]
    result = _cli(
        "--init-from", "--vision_encoder_path", parts["clip"], "--lm_path", parts["language_model"],
        "--cross_attn_every_n_layers", "2", "--laion_shards", inputs["laion"], "--run_name", tmp_path / "run",
        "--max_steps", "1", *DATA_FLAGS[:2], *DATA_FLAGS[4:6], *DATA_FLAGS[8:],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    model = FlamingoForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert model.config.cross_attn_every_n_layers == 2
    assert any(b.attn_gate.item() != 0 for b in model.gated_cross_attn_layers)  # the gates started to open


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fsdp"], "error: --fsdp is set in the accelerate config here"),
        (["--model", "MODEL"], "error: no training data: give --laion_shards and/or --mmc4_shards"),
        (["--laion_shards", "x.tar"], "error: give exactly one of --model and --init_from"),
        (["--model", "MODEL", "--laion_shards", "x", "--max_steps", "0"], "error: --max_steps must be >= 1; got 0"),
        (["--model", "MODEL", "--laion_shards", "x", "--precision", "fp8"], "error: argument --precision"),
        (["--model", "/no/such/model", "--laion_shards", "LAION"], "error: --model /no/such/model: no such folder"),
    ],
)
def test_cli_bad_input_is_one_error_line_and_writes_nothing(inputs, tmp_path, capsys, extra, message):
    args = [str(inputs["model"]) if a == "MODEL" else inputs["laion"] if a == "LAION" else a for a in extra]
    try:
        status = main([*args, "--run_name", str(tmp_path / "run")])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status != 0
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(message), stderr[-2000:]
    assert not (tmp_path / "run").exists()
