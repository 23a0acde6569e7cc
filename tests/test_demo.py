"""The README's demo command keeps working."""

from __future__ import annotations

from modeling_flamingo.demo import main


def test_demo_converts_and_generates(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "max logit difference: 0.00e+00" in out
    assert "demo finished" in out
    assert (tmp_path / "converted" / "model.safetensors").is_file()
