"""What the converter must never do: delete or overwrite its inputs or unrelated files, write NaN/inf or lossy casts
silently, open files outside a model folder, or leave a user without a one-line error naming the problem."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from convert_helpers import make_release
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_flamingo.convert.__main__ import main


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A GPT-NeoX release with two language model shards (safetensors) and an HF CLIP folder."""
    return make_release("gpt_neox", tmp_path_factory.mktemp("release"), lm_shards=2)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its content (to check nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_inputs(release, root: Path):
    """A private copy of the release's input files under `root` (checkpoint.pt, lm/, clip/), returned as a Release."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(release.checkpoint, root / "checkpoint.pt")
    shutil.copytree(release.language_model, root / "lm")
    shutil.copytree(release.vision_model, root / "clip")
    return type(release)(
        release.family,
        release.original,
        release.tokenizer,
        root / "checkpoint.pt",
        root / "lm",
        root / "clip",
        release.cross_attn_every_n_layers,
    )


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and the non-empty stderr lines of one CLI run."""
    capsys.readouterr()
    code = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, "\n".join(err)


def one_error(args: list[str], capsys) -> str:
    code, err = run_cli(args, capsys)
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------------------------------------------------------
# 1. the output never deletes inputs or unrelated files


@pytest.mark.parametrize("where", ["checkpoint_folder", "parent_of_inputs", "language_model", "inside_lm", "symlink"])
def test_output_over_the_inputs_is_refused_even_with_overwrite(release, tmp_path, capsys, where):
    inputs = copy_inputs(release, tmp_path / "inputs")
    (tmp_path / "unrelated.txt").write_text("someone's notes")
    if where == "symlink":
        (tmp_path / "link").symlink_to(inputs.language_model, target_is_directory=True)
    output = {
        "checkpoint_folder": inputs.checkpoint.parent,
        "parent_of_inputs": tmp_path,
        "language_model": inputs.language_model,
        "inside_lm": inputs.language_model / "converted",
        "symlink": tmp_path / "link",
    }[where]
    before = tree(tmp_path)
    message = one_error(inputs.args(output, "--quiet", "--overwrite"), capsys)
    assert "apart from the inputs" in message and str(output) in message
    assert tree(tmp_path) == before
    assert not (inputs.language_model / "converted").exists()


def test_empty_output_path_is_refused(release, tmp_path, capsys, monkeypatch):
    """`--output-dir ""` would be the current folder: refused, nothing there is touched."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    args = release.args(Path("placeholder"), "--quiet", "--overwrite")
    args[args.index("--output-dir") + 1] = ""
    message = one_error(args, capsys)
    assert "empty output folder path" in message
    assert tree(cwd) == {"keep.txt": b"mine"}


def test_overwrite_replaces_only_a_previous_conversion(release, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a conversion")
    message = one_error(release.args(out, "--quiet", "--overwrite"), capsys)
    assert "notes.txt" in message and "--overwrite only replaces a folder this converter wrote" in message
    assert tree(out) == {"notes.txt": b"not a conversion"}

    # A previous conversion is replaced...
    shutil.rmtree(out)
    assert main(release.args(out, "--quiet")) == 0
    marker = json.loads((out / "conversion.json").read_text())
    assert marker["converter"] == "modeling_flamingo.convert"
    assert sorted(p.name for p in out.iterdir()) == marker["files"]
    config = out / "config.json"
    config.write_text(config.read_text())  # touched: replaced below
    assert main(release.args(out, "--quiet", "--overwrite", "--dtype", "bfloat16")) == 0
    assert json.loads(config.read_text())["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folder left

    # ...but not when something else was added to it, nor a folder whose config is not ours.
    (out / "my_eval_results.json").write_text("{}")
    message = one_error(release.args(out, "--quiet", "--overwrite"), capsys)
    assert "my_eval_results.json" in message
    (out / "my_eval_results.json").unlink()
    config.write_text(json.dumps({"model_type": "llama"}))
    message = one_error(release.args(out, "--quiet", "--overwrite"), capsys)
    assert "no conversion by this converter" in message
    assert json.loads(config.read_text()) == {"model_type": "llama"}


def test_output_under_a_file(release, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    message = one_error(release.args(tmp_path / "afile" / "out", "--quiet"), capsys)
    assert "afile is a file, not a folder" in message
    assert (tmp_path / "afile").read_text() == "x"


# ---------------------------------------------------------------------------------------------------------------
# 2. NaN / inf / lossy casts


def save_state(state: dict, path: Path) -> str:
    torch.save(state, path)
    return str(path)


def with_checkpoint(release, out: Path, checkpoint: str, *extra: str) -> list[str]:
    args = release.args(out, "--quiet", *extra)
    args[args.index("--checkpoint") + 1] = checkpoint
    return args


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_non_finite_checkpoint_values_are_refused(release, tmp_path, capsys, value, kind):
    state = torch.load(release.checkpoint, weights_only=True)
    state["perceiver.latents"][3, 5] = value
    ckpt = save_state(state, tmp_path / "nan.pt")
    out = tmp_path / "out"
    message = one_error(with_checkpoint(release, out, ckpt), capsys)
    assert "perceiver.latents" in message and f"1 {kind}" in message and "--allow-non-finite" in message
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    # The explicit flag writes them as they are.
    assert main(with_checkpoint(release, out, ckpt, "--allow-non-finite")) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        latents = f.get_tensor("perceiver.latents")
    assert latents[3, 5].item() == value if kind == "inf" else latents[3, 5].isnan().item()


def test_corrupted_data_region_inside_a_valid_zip(release, tmp_path, capsys):
    """Bytes of one tensor overwritten inside checkpoint.pt (the zip stays valid: torch does not check CRCs)."""
    state = torch.load(release.checkpoint, weights_only=True)
    target = state["perceiver.latents"].numpy().tobytes()
    raw = bytearray(release.checkpoint.read_bytes())
    with zipfile.ZipFile(release.checkpoint) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and archive.read(i) == target)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert bytes(raw[start : start + len(target)]) == target
    raw[start + 64 : start + 72] = b"\xff" * 8  # two float32 NaNs
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(raw)
    message = one_error(with_checkpoint(release, tmp_path / "out", str(corrupted)), capsys)
    assert "perceiver.latents" in message and "2 NaN" in message


def test_non_finite_language_model_and_vision_weights(release, tmp_path, capsys):
    inputs = copy_inputs(release, tmp_path / "inputs")
    shard = inputs.language_model / "model-00002-of-00002.safetensors"
    weights = load_file(shard)
    key = next(k for k in weights if ".mlp." in k and k.endswith(".weight"))
    weights[key][0, 0] = float("inf")
    save_file(weights, shard, metadata={"format": "pt"})
    message = one_error(inputs.args(tmp_path / "out", "--quiet"), capsys)
    assert key in message and "1 inf" in message and "model-00002-of-00002.safetensors" in message

    shutil.copy(release.language_model / shard.name, shard)
    clip = inputs.vision_model / "model.safetensors"
    weights = load_file(clip)
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    weights[key][1, 1] = float("nan")
    save_file(weights, clip, metadata={"format": "pt"})
    message = one_error(inputs.args(tmp_path / "out", "--quiet"), capsys)
    assert key in message and "1 NaN" in message


def test_float16_overflow_is_refused(release, tmp_path, capsys):
    state = torch.load(release.checkpoint, weights_only=True)
    state["perceiver.latents"][0, 0] = 1e6  # float16 tops out at 65504
    ckpt = save_state(state, tmp_path / "big.pt")
    message = one_error(with_checkpoint(release, tmp_path / "out", ckpt, "--dtype", "float16"), capsys)
    assert "perceiver.latents" in message and "range of torch.float16" in message and "1e+06" in message
    # bfloat16 holds it.
    assert main(with_checkpoint(release, tmp_path / "bf16", ckpt, "--dtype", "bfloat16")) == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_tensor_for_a_float_weight_is_refused(release, tmp_path, capsys, dtype):
    state = torch.load(release.checkpoint, weights_only=True)
    state["perceiver.latents"] = torch.ones_like(state["perceiver.latents"], dtype=dtype)
    ckpt = save_state(state, tmp_path / "int.pt")
    message = one_error(with_checkpoint(release, tmp_path / "out", ckpt), capsys)
    assert "perceiver.latents" in message and f"stored as {dtype}" in message and "refusing to cast" in message


# ---------------------------------------------------------------------------------------------------------------
# 7. safetensors checkpoint, 9. pickle globals named


def test_safetensors_checkpoint(release, tmp_path):
    state = torch.load(release.checkpoint, weights_only=True)
    st = tmp_path / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    assert main(release.args(tmp_path / "from_pt", "--quiet")) == 0
    assert main(with_checkpoint(release, tmp_path / "from_st", str(st))) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "from_pt" / name).read_bytes() == (tmp_path / "from_st" / name).read_bytes()


def test_safetensors_checkpoint_gets_the_same_checks(release, tmp_path, capsys):
    state = torch.load(release.checkpoint, weights_only=True)
    state["perceiver.latents"][0, 0] = float("nan")
    st = tmp_path / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    message = one_error(with_checkpoint(release, tmp_path / "out", str(st)), capsys)
    assert "perceiver.latents" in message and "1 NaN" in message


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 4"])
def test_refused_pickle_names_the_global(release, tmp_path, capsys, how):
    marker = tmp_path / "pwned"
    state = {"payload": _Payload(marker)}
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=4))
    message = one_error(with_checkpoint(release, tmp_path / "out", str(path)), capsys)
    assert "refusing to unpickle" in message and f"unsupported global {os.mkdir.__module__}.mkdir" in message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 10. argparse failures, 11. shard sizes


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "the following arguments are required: --output-dir"),
        (["--output-dir", "o", "--dtype", "float8"], "argument --dtype: invalid choice"),
        (["--output-dir", "o", "--cross-attn-every-n-layers", "two"], "invalid int value: 'two'"),
        (["--output-dir", "o", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--output-dir", "o", "--checkpoint", "c"], "without --preset, --vision-model --language-model are required"),
    ],
)
def test_bad_command_lines_give_one_error_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = one_error(argv, capsys)
    assert expected in message
    assert "usage:" not in capsys.readouterr().out


@pytest.mark.parametrize("joined", [True, False], ids=["--max-shard-size=X", "--max-shard-size X"])
@pytest.mark.parametrize("size", ["-1", "-5GB", "0", "0GB", "five", "", "5XB"])
def test_every_invalid_shard_size_gets_the_same_message(release, tmp_path, capsys, size, joined):
    flag = [f"--max-shard-size={size}"] if joined else ["--max-shard-size", size]
    message = one_error(release.args(tmp_path / "out", "--quiet", *flag), capsys)
    assert message == (
        f"error: invalid --max-shard-size {size!r}: use a positive size such as 5GB, 500MB or a number of bytes"
    )


# ---------------------------------------------------------------------------------------------------------------
# 13. index entries outside the model folder, 14. no local paths in the card


def test_index_entry_outside_the_folder_is_never_opened(release, tmp_path, capsys, monkeypatch):
    """The outside file is a valid copy of the shard: only the name check can stop it, before it is opened."""
    inputs = copy_inputs(release, tmp_path / "inputs")
    lm = inputs.language_model
    index_path = lm / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    outside = tmp_path / "model-00002-of-00002.safetensors"
    shutil.move(lm / outside.name, outside)
    index["weight_map"] = {k: ("../../" + v if v == outside.name else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))

    import safetensors

    opened: list[str] = []
    real_safe_open = safetensors.safe_open

    def recording_safe_open(path, *args, **kwargs):
        opened.append(os.path.realpath(path))
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording_safe_open)
    message = one_error(inputs.args(tmp_path / "out", "--quiet"), capsys)
    assert "'../../model-00002-of-00002.safetensors'" in message and "inside the model folder" in message
    assert str(outside) not in opened


def test_model_card_records_names_and_hashes_not_paths(release, tmp_path):
    import hashlib

    out = tmp_path / "out"
    assert main(release.args(out, "--quiet")) == 0
    card = (out / "README.md").read_text()
    marker = (out / "conversion.json").read_text()
    root = str(release.checkpoint.parent)
    for file in out.iterdir():  # no output file names where the inputs or the output were
        data = file.read_bytes()
        assert root.encode() not in data and str(tmp_path).encode() not in data, file.name
    for path in (
        release.checkpoint,
        release.language_model / "model-00001-of-00002.safetensors",
        release.vision_model / "model.safetensors",
        release.language_model / "tokenizer.json",
    ):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"`{digest}`" in card
        assert digest in marker
    assert "local folder `lm`" in card and "local folder `clip`" in card
    inputs = json.loads(marker)["inputs"]
    assert inputs["language_model"]["local"] == "lm"
    assert set(inputs["language_model"]["sha256"]) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
