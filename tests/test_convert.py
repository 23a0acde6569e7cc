"""Conversion of release-shaped OpenFlamingo inputs (written from the original model) and parity with the original."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_helpers import checkpoint_state_dict, compare_with_original, make_release
from safetensors import safe_open

from modeling_flamingo.convert.__main__ import main

# One release layout per language model family, spread over the input formats the converter reads.
CASES = {
    # OpenFlamingo-3B: single pytorch_model.bin, remote-code MosaicGPT config.json, HF CLIP folder.
    "mosaic_gpt": {"lm_format": "bin"},
    # OpenFlamingo-9B: sharded .bin with index, remote-code MPT config.json, no lm_head (tied); open_clip file.
    "mpt": {"lm_format": "bin", "lm_shards": 2, "vision": "open_clip"},
    # OpenFlamingo-4B: `embed_out` in the checkpoint and the LM files, sharded safetensors; a whole open_clip CLIP
    # state dict (`visual.` prefix, text tower beside it).
    "gpt_neox": {"lm_shards": 3, "vision": "open_clip_visual"},
    # A v2 LLaMA checkpoint: the LM's head has the hub's rows and is cut to the tokenizer.
    "llama": {},
}


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weight_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _hash(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def neox_release(tmp_path_factory):
    return make_release("gpt_neox", tmp_path_factory.mktemp("neox"))


@pytest.mark.parametrize("family", list(CASES))
def test_convert_matches_original(family, tmp_path):
    release = make_release(family, tmp_path / "in", **CASES[family])
    out = tmp_path / "out"
    assert main(release.args(out, "--quiet")) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
    } <= names
    assert "tokenizer_config.json" in names and not [n for n in names if n.endswith((".bin", ".pt"))]
    config = json.loads((out / "config.json").read_text())
    assert config["media_token_id"] == release.tokenizer.encode("<image>")[-1]
    assert config["eoc_token_id"] == release.tokenizer.encode("<|endofchunk|>")[-1]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eoc_token_id"]
    assert generation["pad_token_id"] == release.tokenizer.pad_token_id
    compare_with_original(release, out)

    from modeling_flamingo import FlamingoProcessor

    processor = FlamingoProcessor.from_pretrained(out)
    assert processor.tokenizer.encode("<image>")[-1] == config["media_token_id"]
    assert len(processor.tokenizer) == config["text_config"]["vocab_size"]


def test_v1_llama_checkpoint(tmp_path):
    """The legacy layout: cross-attention stored twice, no lm_head rows for the added tokens (mean-initialised)."""
    release = make_release("llama", tmp_path / "in", layout="v1", head_rows=320)
    keys = torch.load(release.checkpoint, weights_only=True)
    assert any(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in keys)
    out = tmp_path / "out"
    assert main(release.args(out, "--quiet")) == 0
    compare_with_original(release, out)
    card = (out / "README.md").read_text()
    assert "mean of the 320 pretrained rows" in card
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        head = f.get_tensor("language_model.lm_head.weight")
    torch.testing.assert_close(head[320:], head[:320].double().mean(0).float().expand(3, -1), rtol=0, atol=1e-6)


def test_wrapped_training_checkpoint_gives_the_same_weights(neox_release, tmp_path):
    """`model_state_dict` nesting and `module.` prefixes (a DDP training checkpoint) change nothing."""
    wrapped = tmp_path / "checkpoint_wrapped.pt"
    torch.save(checkpoint_state_dict(neox_release.original, "gpt_neox", "wrapped"), wrapped)
    assert main(neox_release.args(tmp_path / "flat", "--quiet")) == 0
    args = neox_release.args(tmp_path / "wrapped", "--quiet")
    args[args.index("--checkpoint") + 1] = str(wrapped)
    assert main(args) == 0
    assert _weight_hashes(tmp_path / "flat") == _weight_hashes(tmp_path / "wrapped")


def test_cli_subprocess_is_deterministic(neox_release, tmp_path):
    """`python -m modeling_flamingo.convert` in a subprocess writes byte-identical files to an in-process run."""
    assert main(neox_release.args(tmp_path / "a", "--quiet", "--max-shard-size", "2MB")) == 0
    env = dict(os.environ, PYTHONHASHSEED="123")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_flamingo.convert",
            *neox_release.args(tmp_path / "b", "--max-shard-size", "2MB"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    hashes = _weight_hashes(tmp_path / "a")
    assert len(hashes) > 1 and hashes == _weight_hashes(tmp_path / "b")
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "README.md"):
        assert _hash(tmp_path / "a" / name) == _hash(tmp_path / "b" / name), name


def test_sharded_bfloat16_output(neox_release, tmp_path):
    out = tmp_path / "out"
    assert main(neox_release.args(out, "--quiet", "--dtype", "bfloat16", "--max-shard-size", "1MB")) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with safe_open(str(out / shards[0]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    from modeling_flamingo import FlamingoForConditionalGeneration

    model = FlamingoForConditionalGeneration.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    reference = neox_release.original.state_dict()["perceiver.latents"].to(torch.bfloat16)
    assert torch.equal(model.perceiver.latents.detach(), reference)


def test_overwrite(neox_release, tmp_path):
    """`--overwrite` replaces a previous conversion (other folders: tests/test_convert_safety.py)."""
    out = tmp_path / "out"
    assert main(neox_release.args(out, "--quiet", "--max-shard-size", "2MB")) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert main(neox_release.args(out, "--quiet", "--overwrite")) == 0
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folder left


def test_mosaic_gpt_biases_follow_the_weight_files(tmp_path):
    # The hub config.json of MPT-1B says `no_bias: true`; the weight files decide whether biases exist.
    release = make_release("mosaic_gpt", tmp_path / "in")
    config_path = release.language_model / "config.json"
    lm_config = json.loads(config_path.read_text())
    lm_config["no_bias"] = True
    config_path.write_text(json.dumps(lm_config))
    out = tmp_path / "out"
    assert main(release.args(out, "--quiet")) == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["no_bias"] is False
    compare_with_original(release, out, generate=False)
