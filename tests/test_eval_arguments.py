"""`openflamingo-eval`'s arguments: what `--data_dir` accepts as a hub dataset id."""

from __future__ import annotations

import pytest

from modeling_flamingo.evaluation.__main__ import main


@pytest.mark.parametrize("value", ["owner/two words", "owner/name:main", "owner/"])
def test_data_dir_neither_folder_nor_repo_id(tmp_path, capsys, value):
    """The converter's rule for a hub id (`modeling_flamingo.convert.sources.looks_like_repo_id`) decides: anything
    else that is not a folder is refused by name, before any download or model load."""
    argv = ["--model", str(tmp_path / "no-model"), "--eval_vizwiz", "--data_dir", value]
    assert main(argv + ["--results_file", str(tmp_path / "r.json")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == [f"error: --data_dir: {value} is neither a folder nor a hub dataset id."]
    assert not (tmp_path / "r.json").exists()
