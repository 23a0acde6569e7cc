"""`from_pretrained` on an original OpenFlamingo repo id, against a fake hub cache, offline.

The test writes the standard cache layout (`models--org--name/{refs/main, snapshots/<sha>/...}`) for the release
repo (only `checkpoint.pt`), its language model repo and the CLIP repo, and changes nothing but environment
variables: where the caches are, and offline mode.
"""

from __future__ import annotations

import os
import re
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


def read_card_commit_lines(folder: Path) -> str:
    return (folder / "README.md").read_text()


def test_a_moved_language_model_gets_a_new_conversion(fake_hub):
    """The cache key holds every input's commit: new LM weights on `main` give a new conversion, not the stale one."""
    import torch

    release, _, cache = fake_hub
    first = Path(resolve_pretrained_path(REPO))
    lm_cache = cache / f"models--{LM_REPO.replace('/', '--')}"
    new_commit = "d" * 40
    shutil.copytree(lm_cache / "snapshots" / COMMITS[LM_REPO], lm_cache / "snapshots" / new_commit)
    weights_file = lm_cache / "snapshots" / new_commit / "pytorch_model.bin"
    weights = torch.load(weights_file, weights_only=True)
    key = next(k for k in weights if ".mlp." in k and k.endswith("weight"))
    weights[key] = weights[key] * 2
    torch.save(weights, weights_file)
    (lm_cache / "refs" / "main").write_text(new_commit)

    second = Path(resolve_pretrained_path(REPO))
    assert second != first and (first / "config.json").is_file()
    assert second.name.startswith(first.name.rsplit("--", 1)[0])  # same release commit, other inputs
    card = (second / "README.md").read_text()
    assert new_commit in card and COMMITS[LM_REPO] not in card
    model = FlamingoForConditionalGeneration.from_pretrained(REPO)
    before = FlamingoForConditionalGeneration.from_pretrained(first)

    def holds(m) -> bool:
        return any(p.shape == weights[key].shape and torch.equal(p.detach(), weights[key]) for p in m.parameters())

    assert holds(model) and not holds(before)


def test_unfinished_cache_folder_gets_advice_for_from_pretrained(fake_hub):
    target = Path(resolve_pretrained_path(REPO))
    (target / "config.json").unlink()
    with pytest.raises(OSError) as info:
        resolve_pretrained_path(REPO)
    message = str(info.value)
    assert str(target) in message and "delete that folder" in message and "from_pretrained" in message
    assert "--overwrite" not in message
    assert sorted(p.name for p in target.iterdir())  # nothing was deleted


def test_dead_owners_leftovers_in_the_cache_are_removed(fake_hub):
    import socket
    import subprocess
    import sys

    _, home, _ = fake_hub
    root = home / "modeling_flamingo" / "converted"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    leftover = root / f".openflamingo--OpenFlamingo-3B-vitl-mpt1b--{'a' * 40}--0123.partial-{proc.pid}@{host}-k1ll3d"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a shard")
    resolve_pretrained_path(REPO)
    assert not leftover.exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


# Resolves REPO in a child process. `wait` makes it announce (on stdout) that it is about to wait for the cache lock;
# `hold` makes it stop inside the lock, before converting, until a line arrives on stdin.
CHILD = """
import sys
import filelock
import modeling_flamingo.convert.hub as hub

role = sys.argv[1]
if role == "hold":
    real_convert = hub.convert
    def held_convert(*args, **kwargs):
        print("converting", flush=True)
        sys.stdin.readline()
        return real_convert(*args, **kwargs)
    hub.convert = held_convert
else:
    class AnnouncedLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            print("waiting", flush=True)
            return super().acquire(*args, **kwargs)
    filelock.FileLock = AnnouncedLock
print(hub.resolve_pretrained_path(sys.argv[2]), flush=True)
"""


def test_two_processes_convert_once(fake_hub):
    """The second process waits for the first one's lock, then loads its result instead of converting."""
    import subprocess
    import sys

    def start(role):
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, role, REPO],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = start("hold")
    second = None
    try:
        assert first.stdout.readline().strip() == "converting"
        second = start("wait")
        assert second.stdout.readline().strip() == "waiting"
        first.stdin.write("\n")
        first.stdin.flush()
        out1, err1 = first.communicate(timeout=300)
        out2, err2 = second.communicate(timeout=300)
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert out1.strip() == out2.strip() and Path(out1.strip(), "config.json").is_file()
    assert "Converting" in err1 and "Converting" not in err2


def test_unreachable_hub_fails_fast_with_advice(tmp_path):
    """No network and no offline variable: one failed connection, then an error saying so and how to work offline."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "c")
    )
    env.pop("MODELING_FLAMINGO_CACHE", None)
    script = (
        "from modeling_flamingo.convert.hub import resolve_pretrained_path\n"
        f"try:\n    resolve_pretrained_path({REPO!r})\nexcept OSError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "could not be reached" in result.stdout and "HF_HUB_OFFLINE=1" in result.stdout, result
    assert "convert from local files" in result.stdout
    assert "Retry" not in result.stderr, result.stderr

    cli = [sys.executable, "-m", "modeling_flamingo.convert", "--preset", REPO, "--output-dir", str(tmp_path / "o")]
    result = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: ") and "could not be reached" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_with_a_filled_cache_converts_from_it(fake_hub):
    """Without the offline variable, an unreachable hub falls back to the hub cache (after one failed connection)."""
    import socket
    import subprocess
    import sys

    release, home, _ = fake_hub
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    script = f"from modeling_flamingo.convert.hub import resolve_pretrained_path\nprint(resolve_pretrained_path({REPO!r}))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Retry" not in result.stderr
    compare_with_original(release, Path(result.stdout.strip()), generate=False)
