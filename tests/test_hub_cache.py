"""`from_pretrained` on an original OpenFlamingo repo id, against a fake hub cache, offline.

The test writes the standard cache layout (`models--org--name/{refs/main, snapshots/<sha>/...}`) for the release
repo (only `checkpoint.pt`), its language model repo and the CLIP repo, and changes nothing but environment
variables: where the caches are, and offline mode.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from convert_helpers import compare_with_original, make_release

from modeling_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor
from modeling_flamingo.convert.hub import converted_path, resolve_pretrained_path

REPO = "openflamingo/OpenFlamingo-3B-vitl-mpt1b"
LM_REPO = "anas-awadalla/mpt-1b-redpajama-200b"
CLIP_REPO = "openai/clip-vit-large-patch14"
COMMITS = {REPO: "a" * 40, LM_REPO: "b" * 40, CLIP_REPO: "c" * 40}


def put_in_cache(cache: Path, repo_id: str, files: list[Path]) -> Path:
    """Place `files` in the hub cache as the `main` snapshot of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMITS[repo_id])
    snapshot = repo / "snapshots" / COMMITS[repo_id]
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copy(file, snapshot / file.name)
    return snapshot


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    release = make_release("mosaic_gpt", tmp_path / "inputs", lm_format="bin")
    home = tmp_path / "hf_home"
    cache = tmp_path / "hub_cache"
    put_in_cache(cache, REPO, [release.checkpoint])
    put_in_cache(cache, LM_REPO, sorted(release.language_model.iterdir()))
    put_in_cache(cache, CLIP_REPO, sorted(release.vision_model.iterdir()))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return release, home, cache


def test_from_pretrained_converts_once_then_loads_the_cache(fake_hub):
    release, home, cache = fake_hub
    target = converted_path(REPO, COMMITS[REPO], {LM_REPO: COMMITS[LM_REPO], CLIP_REPO: COMMITS[CLIP_REPO]})
    assert target.parent == home / "modeling_flamingo" / "converted"
    assert target.name.startswith(f"openflamingo--OpenFlamingo-3B-vitl-mpt1b--{COMMITS[REPO]}--")

    model = FlamingoForConditionalGeneration.from_pretrained(REPO)
    assert (target / "config.json").is_file()
    assert model.config.cross_attn_every_n_layers == 1
    compare_with_original(release, target)
    card = (target / "README.md").read_text()
    for text in (REPO, COMMITS[REPO], LM_REPO, COMMITS[LM_REPO], CLIP_REPO, COMMITS[CLIP_REPO], "sha256"):
        assert text in card

    # The second call loads the cached conversion: it no longer needs the original files at all.
    weights = target / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    shutil.rmtree(cache / "models--openflamingo--OpenFlamingo-3B-vitl-mpt1b" / "snapshots")
    shutil.rmtree(cache / f"models--{LM_REPO.replace('/', '--')}" / "snapshots")
    again = FlamingoForConditionalGeneration.from_pretrained(REPO)
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    assert again.config.media_token_id == model.config.media_token_id
    assert resolve_pretrained_path(REPO) == str(target)

    processor = FlamingoProcessor.from_pretrained(REPO)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.media_token_id


def test_transformers_folders_and_repos_pass_through(fake_hub, tmp_path):
    assert resolve_pretrained_path(str(tmp_path)) == str(tmp_path)
    # A repo that holds a config.json is already in transformers format.
    assert resolve_pretrained_path(LM_REPO) == LM_REPO
    # Unknown repos are left to transformers to report.
    assert resolve_pretrained_path("someone/not-cached") == "someone/not-cached"


def test_legacy_llama_release_needs_the_cli(fake_hub):
    with pytest.raises(OSError, match="--language-model"):
        resolve_pretrained_path("openflamingo/OpenFlamingo-9B-deprecated")


def test_cli_preset_from_the_cache(fake_hub, tmp_path):
    """`--preset` fetches the checkpoint, language model, tokenizer and CLIP repo through the hub cache."""
    from modeling_flamingo.convert.__main__ import main

    release, _, _ = fake_hub
    out = tmp_path / "converted"
    assert main(["--preset", REPO, "--output-dir", str(out), "--quiet"]) == 0
    compare_with_original(release, out, generate=False)


def test_cli_legacy_preset_needs_the_language_model(tmp_path, capsys):
    from modeling_flamingo.convert.__main__ import main

    assert main(["--preset", "openflamingo/OpenFlamingo-9B-deprecated", "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--language-model" in err and not (tmp_path / "o").exists()
