"""A new Flamingo in one command: `openflamingo-train --init_from` on a Qwen2 language model and a SigLIP tower saved
to folders, a few training steps, the exported model evaluated with `openflamingo-eval` and served by the web app's
engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from eval_data import cli_flags, make_coco
from PIL import Image
from train_data_helpers import make_laion_shards, make_mmc4_shards
from transformers import AutoModelForCausalLM, Qwen2Config, SiglipConfig, SiglipModel

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.app.engine import FlamingoEngine, GenerationSettings, load_model
from modeling_flamingo.evaluation.__main__ import main as evaluate
from modeling_flamingo.testing import make_tiny_tokenizer, tiny_siglip_vision_config
from modeling_flamingo.training.cli import main as train

DATA_FLAGS = [
    "--batch_size_laion", "2", "--batch_size_mmc4", "2", "--train_num_samples_laion", "4",
    "--train_num_samples_mmc4", "4", "--workers", "0", "--warmup_steps", "0", "--learning_rate", "1e-3",
    "--logging_steps", "1",
]  # fmt: skip


def tiny_lm(vocab_size: int):
    """A tiny Qwen2, a family the Flamingo code names nowhere, shaped like the small Qwen2.5 models: grouped-query
    attention, biased q/k/v projections, a tied head."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_backbone")
    tokenizer = make_tiny_tokenizer()
    tiny_lm(len(tokenizer)).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    torch.manual_seed(1)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    vision = tiny_siglip_vision_config("siglip", hidden=48).to_dict()
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(root / "siglip")
    return {
        "root": root,
        "lm": root / "lm",
        "siglip": root / "siglip",
        "laion": make_laion_shards(root / "laion", num_shards=2, samples_per_shard=3),
        "mmc4": make_mmc4_shards(root / "mmc4", num_shards=2, documents_per_shard=3),
        "coco": make_coco(root / "data", num_train=4, num_test=3),
    }


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "modeling_flamingo.training", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_one_command_trains_exports_evaluates_and_serves_a_new_flamingo(parts, capsys):
    run = parts["root"] / "run"
    result = _train(
        "--init_from", "--vision_encoder_path", parts["siglip"], "--lm_path", parts["lm"],
        "--tokenizer_path", parts["lm"], "--cross_attn_every_n_layers", "2", "--laion_shards", parts["laion"],
        "--mmc4_shards", parts["mmc4"], "--run_name", run, "--max_steps", "2", *DATA_FLAGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stdout

    model = FlamingoForConditionalGeneration.from_pretrained(run / "model").eval()
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.vision_feature_select_strategy == "full"
    assert model.config.text_config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert all(b.attn_gate.item() != 0 for b in model.gated_cross_attn_layers)  # the gates started to open
    processor = FlamingoProcessor.from_pretrained(run / "model")
    image_processor = processor.image_processor
    assert not image_processor.do_center_crop and list(image_processor.image_mean) == [0.5, 0.5, 0.5]
    # The frozen tower is SigLIP's own, bar the final norm and pooling head that Flamingo does not run.
    siglip = SiglipModel.from_pretrained(parts["siglip"]).vision_model.state_dict()
    tower = model.vision_encoder.state_dict()
    assert tower.keys() == {k for k in siglip if not k.startswith(("post_layernorm.", "head."))}
    assert all(torch.equal(tower[k], siglip[k]) for k in tower)

    results_file = parts["root"] / "eval" / "coco.json"
    argv = ["--model", str(run / "model"), "--eval_coco", *cli_flags(parts["coco"]), "--shots", "0", "2"]
    argv += ["--num_samples", "3", "--query_set_size", "4", "--batch_size", "2", "--results_file", str(results_file)]
    assert evaluate(argv) == 0, capsys.readouterr().err[-3000:]
    results = json.loads(results_file.read_text())
    assert [entry["shots"] for entry in results["coco"]] == [0, 2]

    served, served_processor = load_model(str(run / "model"))
    engine = FlamingoEngine(served, served_processor)
    image = parts["root"] / "query.png"
    Image.new("RGB", (40, 56), "blue").save(image)
    prompt = "<image>A dog runs"
    batch = processor(images=[[Image.open(image).convert("RGB")]], text=[prompt], return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
    expected = processor.batch_decode(expected, skip_special_tokens=True, prompt_length=batch["input_ids"].shape[1])
    assert engine.generate(prompt, [image], GenerationSettings(max_new_tokens=4)) == expected[0]


def test_a_vision_encoder_path_that_is_no_vision_tower_is_one_error_line(parts, tmp_path, capsys):
    status = train(
        ["--init_from", "--vision_encoder_path", str(parts["lm"]), "--lm_path", str(parts["lm"])]
        + ["--laion_shards", parts["laion"], "--run_name", str(tmp_path / "run")]
    )
    assert status == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: Vision tower {parts['lm']}: a 'qwen2' model is not supported; give a CLIP, SigLIP or "
                     "SigLIP2 model (folder or hub id)."]  # fmt: skip
    assert not (tmp_path / "run").exists()
