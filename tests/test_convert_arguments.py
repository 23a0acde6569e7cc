"""The convert CLI's flags as a dataclass parsed by the CLIs' `FlamingoArgumentParser`: both spellings of every flag,
defaults in `--help`, and a bad command line still one `error:` line with this CLI's status 1."""

from __future__ import annotations

import pytest

from modeling_flamingo.convert.__main__ import main


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("joined", [True, False], ids=["--max_shard_size=X", "--max_shard_size X"])
def test_underscore_spellings_reach_the_same_checks(tmp_path, capsys, joined):
    """Every flag spelled with underscores, and a value starting with a dash, reach the converter's own check of the
    shard size (which runs before any input is read) instead of argparse's "unrecognized arguments"."""
    size = ["--max_shard_size=-5GB"] if joined else ["--max_shard_size", "-5GB"]
    argv = ["--checkpoint", "ckpt.pt", "--vision_model", "clip", "--language_model", "lm"]
    argv += ["--cross_attn_every_n_layers", "2", "--output_dir", str(tmp_path / "out"), "--quiet", *size]
    code, err = run(argv, capsys)
    assert (code, err) == (
        1,
        "error: invalid --max-shard-size '-5GB': use a positive size such as 5GB, 500MB or a number of bytes\n",
    )
    assert not (tmp_path / "out").exists()


def test_help_shows_both_spellings_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--output-dir OUTPUT_DIR, --output_dir OUTPUT_DIR" in help_text
    assert "(default: 5GB)" in help_text and "(default: float32)" in help_text and "(default: quick_gelu)" in help_text


def test_a_bad_command_line_keeps_status_1(tmp_path, capsys):
    code, err = run(["--output_dir", str(tmp_path / "out"), "--checkpoint", "c"], capsys)
    assert (code, err) == (1, "error: without --preset, --vision-model --language-model are required (see --help)\n")
