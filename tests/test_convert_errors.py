"""Bad inputs: one clear `error: ...` line on stderr, exit status 1, and no output folder left behind."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import checkpoint_state_dict, make_release
from safetensors.torch import load_file, save_file

from modeling_flamingo.convert.__main__ import main
from modeling_flamingo.testing import make_tiny_tokenizer


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A GPT-NeoX release with two language model shards (safetensors)."""
    return make_release("gpt_neox", tmp_path_factory.mktemp("release"), lm_shards=2)


@pytest.fixture
def state(release):
    """A fresh copy of the release's checkpoint state dict, to spoil."""
    return torch.load(release.checkpoint, weights_only=True)


def convert_fails(release, tmp_path: Path, capsys, *extra: str, **replace: str) -> str:
    """Run the CLI expecting a failure; return its one stderr line after checking nothing was left behind."""
    out = tmp_path / "out"
    args = release.args(out, "--quiet", *extra)
    for flag, value in replace.items():
        args[args.index("--" + flag.replace("_", "-")) + 1] = value
    capsys.readouterr()
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], list(tmp_path.iterdir())
    return lines[0]


def save_checkpoint(state: dict, tmp_path: Path) -> str:
    path = tmp_path / "bad_checkpoint.pt"
    torch.save(state, path)
    return str(path)


class _Payload:
    """A pickle that creates `marker` when unpickled by a full unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_never_runs(release, state, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state["perceiver.payload"] = _Payload(marker)
    message = convert_fails(release, tmp_path, capsys, checkpoint=save_checkpoint(state, tmp_path))
    assert "refusing to unpickle" in message and "weights_only" in message
    assert not marker.exists()
    # The payload is real: a full unpickler runs it.
    other = tmp_path / "proof"
    torch.save({"x": _Payload(other)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert other.exists()


def test_truncated_checkpoint(release, tmp_path, capsys):
    data = release.checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    message = convert_fails(release, tmp_path, capsys, checkpoint=str(path))
    assert "truncated" in message and "truncated.pt" in message


def test_truncated_language_model_shard(release, tmp_path, capsys):
    lm = tmp_path / "lm"
    shutil.copytree(release.language_model, lm)
    shard = lm / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    message = convert_fails(release, tmp_path, capsys, language_model=str(lm))
    assert "truncated" in message and "model-00002-of-00002.safetensors" in message


def test_missing_key(release, state, tmp_path, capsys):
    del state["perceiver.norm.weight"]
    message = convert_fails(release, tmp_path, capsys, checkpoint=save_checkpoint(state, tmp_path))
    assert "missing key perceiver.norm.weight" in message


def test_missing_language_model_key(release, tmp_path, capsys):
    lm = tmp_path / "lm"
    shutil.copytree(release.language_model, lm)
    shard = lm / "model-00001-of-00002.safetensors"
    weights = load_file(shard)
    del weights["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]
    save_file(weights, shard, metadata={"format": "pt"})
    message = convert_fails(release, tmp_path, capsys, language_model=str(lm))
    assert "missing key language_model.gpt_neox.layers.0.decoder_layer.mlp.dense_h_to_4h.weight" in message


def test_unexpected_key(release, state, tmp_path, capsys):
    state["perceiver.surprise.weight"] = torch.zeros(3)
    message = convert_fails(release, tmp_path, capsys, checkpoint=save_checkpoint(state, tmp_path))
    assert "unexpected key perceiver.surprise.weight" in message


def test_shape_mismatch(release, state, tmp_path, capsys):
    state["perceiver.latents"] = state["perceiver.latents"][:-1].clone()
    message = convert_fails(release, tmp_path, capsys, checkpoint=save_checkpoint(state, tmp_path))
    assert "shape mismatch" in message and "perceiver.latents" in message and "[63, 64]" in message


def test_wrong_cross_attention_interval(release, tmp_path, capsys):
    message = convert_fails(release, tmp_path, capsys, cross_attn_every_n_layers="4")
    assert "wrong cross-attention interval" in message and "every 2 layers" in message


def test_tokenizer_does_not_match_embeddings(release, tmp_path, capsys):
    other = tmp_path / "tokenizer"
    make_tiny_tokenizer(vocab_size=300).save_pretrained(other)
    message = convert_fails(release, tmp_path, capsys, "--tokenizer", str(other))
    assert "tokenizer" in message and "303 tokens" in message and "323 rows" in message


def test_v1_duplicates_that_differ(release, tmp_path, capsys):
    state = checkpoint_state_dict(release.original, "gpt_neox", "v1")
    key = "lang_encoder.gated_cross_attn_layers.1.attn.to_q.weight"
    state[key] = state[key] + 1
    message = convert_fails(release, tmp_path, capsys, checkpoint=save_checkpoint(state, tmp_path))
    assert key in message and "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.attn.to_q.weight" in message


def test_existing_output_is_refused(release, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(release.args(out, "--quiet")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_input_path(release, tmp_path, capsys):
    message = convert_fails(release, tmp_path, capsys, language_model=str(tmp_path / "nowhere" / "lm"))
    assert "nowhere" in message
